//! Coordination of replicas through Redis (`redis_url`): cluster-wide single flight.
//!
//! One upstream fetch per blob, manifest or tag revalidation across every replica: the replica
//! that starts it holds a lock (`SET NX PX`), renewed while it lives and released (only by its
//! holder) when the result is in object storage. The lock's value names the holder's
//! `advertise_url`, so another replica can stream a blob from it while it downloads; a holder
//! that dies stops renewing, its lock expires, and another replica takes over.
//!
//! Redis is never a dependency of a pull: when it fails, every claim answers [`Claim::Alone`]
//! (each replica goes on as an independent cache over the shared storage), the failure is
//! logged once per spell, and Redis is asked again after a short rest.

mod bucket;
mod eviction;
mod limits;
mod locks;
mod peers;
mod purges;

pub use bucket::Bucket;
pub use locks::{Claim, LOCK_TTL, Lock};
pub use peers::{PRIVATE_HEADER, Peers};
pub use purges::{ApplyPurge, Purged};

/// What this replica shares with others: the bucket (`storage_url`) and the peers
/// (`redis_url`); neither for a single node.
#[derive(Debug, Default)]
pub struct Replicas {
    /// Blobs in object storage.
    pub bucket: Option<Arc<Bucket>>,
    /// The other replicas.
    pub peers: Option<Peers>,
}

impl Replicas {
    /// The replicas' coordination, in a cluster.
    pub fn cluster(&self) -> Option<&Arc<Cluster>> {
        self.peers.as_ref().map(|p| &p.cluster)
    }
}

use crate::resting::Resting;
use redis::aio::{ConnectionManager, ConnectionManagerConfig};
use std::sync::Arc;
use std::sync::atomic::AtomicU64;
use std::time::Duration;

/// How long Redis is left alone after it failed.
const REST_AFTER_FAILURE: Duration = Duration::from_secs(5);

/// Replicas sharing one Redis.
pub struct Cluster {
    conn: ConnectionManager,
    /// This replica's address for internal requests (`advertise_url`).
    me: String,
    next_token: AtomicU64,
    /// Left alone after a failure; requests and failures counted.
    resting: Resting,
}

impl std::fmt::Debug for Cluster {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Cluster").field("me", &self.me).finish()
    }
}

impl Cluster {
    /// Replicas coordinated through `url` (`redis://host:port/db`); this one reachable at
    /// `me`. Nothing is contacted yet.
    pub fn new(url: &str, me: String) -> Result<Cluster, String> {
        let client = redis::Client::open(url).map_err(|e| e.to_string())?;
        let config = ConnectionManagerConfig::new()
            .set_connection_timeout(Some(Duration::from_secs(1)))
            .set_response_timeout(Some(Duration::from_secs(1)))
            .set_number_of_retries(1)
            .set_max_delay(Duration::from_millis(200));
        let conn =
            ConnectionManager::new_lazy_with_config(client, config).map_err(|e| e.to_string())?;
        Ok(Cluster {
            conn,
            me,
            next_token: AtomicU64::new(0),
            resting: Resting::new(REST_AFTER_FAILURE),
        })
    }

    /// Requests made, requests failed, and whether this replica goes on alone now.
    pub fn counts(&self) -> (u64, u64, bool) {
        let (requests, failures) = self.resting.counts();
        (requests, failures, !self.available())
    }

    /// Whether Redis is being asked (not resting after a failure).
    pub fn available(&self) -> bool {
        self.resting.available()
    }

    fn failed(&self, what: &str, e: &redis::RedisError) {
        if self.resting.failed() {
            tracing::warn!(what, error = %e, "Redis failed; this replica goes on alone for {}s", REST_AFTER_FAILURE.as_secs());
        }
    }

    /// Runs a Lua script with `keys` and `args`, counted.
    async fn eval(&self, code: &str, keys: &[&str], args: &[&str]) -> redis::RedisResult<i64> {
        self.resting.request();
        let script = redis::Script::new(code);
        let mut invocation = script.prepare_invoke();
        for key in keys {
            invocation.key(*key);
        }
        for arg in args {
            invocation.arg(*arg);
        }
        invocation.invoke_async(&mut self.conn.clone()).await
    }

    /// Runs `command`, once more if the first try failed: a connection Redis dropped (it
    /// restarted) fails one command before the manager reconnects.
    async fn query<T: redis::FromRedisValue>(&self, command: &redis::Cmd) -> redis::RedisResult<T> {
        self.resting.request();
        let mut conn = self.conn.clone();
        match command.query_async(&mut conn).await {
            Ok(value) => Ok(value),
            Err(_) => command.query_async(&mut conn).await,
        }
    }
}
