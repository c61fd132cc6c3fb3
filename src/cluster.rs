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

use crate::clock::now_ms;
use crate::resting::Resting;
use redis::aio::{ConnectionManager, ConnectionManagerConfig};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

/// How long a lock lives without renewal: a dead holder is replaced after this.
pub const LOCK_TTL: Duration = Duration::from_secs(6);

/// How often a holder renews its locks.
const RENEW_EVERY: Duration = Duration::from_secs(2);

/// How long Redis is left alone after it failed.
const REST_AFTER_FAILURE: Duration = Duration::from_secs(5);

/// Extends a lock only for its holder.
const RENEW: &str = r"if redis.call('get', KEYS[1]) == ARGV[1] then return redis.call('pexpire', KEYS[1], ARGV[2]) else return 0 end";

/// Releases a lock only for its holder.
const RELEASE: &str = r"if redis.call('get', KEYS[1]) == ARGV[1] then return redis.call('del', KEYS[1]) else return 0 end";

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

/// What a claim on a key found.
#[derive(Debug)]
pub enum Claim {
    /// This replica holds the lock until the [`Lock`] is dropped.
    Owned(Lock),
    /// Another replica holds it: its `advertise_url`.
    Held(String),
    /// Redis cannot be asked: go on alone.
    Alone,
}

/// A held lock, renewed in the background until dropped, then released.
#[derive(Debug)]
pub struct Lock {
    cluster: Arc<Cluster>,
    key: String,
    value: String,
    renew: tokio::task::JoinHandle<()>,
}

impl Drop for Lock {
    fn drop(&mut self) {
        self.renew.abort();
        let (cluster, key, value) = (
            Arc::clone(&self.cluster),
            std::mem::take(&mut self.key),
            std::mem::take(&mut self.value),
        );
        if let Ok(runtime) = tokio::runtime::Handle::try_current() {
            runtime.spawn(async move {
                if let Err(e) = cluster.eval(RELEASE, &[&key], &[&value]).await {
                    cluster.failed("release", &e);
                }
            });
        }
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

    /// Tries to take the lock on `key`. A lock this replica holds already (another of its own
    /// operations) answers [`Claim::Alone`]: waiting on itself could only stall, and its own
    /// single flight already joins concurrent requests.
    pub async fn claim(self: &Arc<Self>, key: &str) -> Claim {
        // A second try only when the lock was released between the SET and the GET.
        for _ in 0..2 {
            if !self.available() {
                return Claim::Alone;
            }
            let token = self.next_token.fetch_add(1, Ordering::Relaxed);
            let nanos = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| d.as_nanos());
            let value = format!("{nanos:x}.{token:x} {}", self.me);
            let ttl = u64::try_from(LOCK_TTL.as_millis()).unwrap_or(u64::MAX);
            let mut set = redis::cmd("SET");
            set.arg(key).arg(&value).arg("NX").arg("PX").arg(ttl);
            let set: redis::RedisResult<Option<String>> = self.query(&set).await;
            let owned = match set {
                Ok(Some(_)) => true,
                Ok(None) => {
                    let current: redis::RedisResult<Option<String>> =
                        self.query(redis::cmd("GET").arg(key)).await;
                    match current {
                        // A retried SET whose first try had applied: this claim holds it.
                        Ok(Some(current)) if current == value => true,
                        Ok(Some(current)) => {
                            return match current.split_once(' ') {
                                Some((_, owner)) if owner != self.me => {
                                    Claim::Held(owner.to_owned())
                                }
                                // This replica's own, or not a lock of ours.
                                _ => Claim::Alone,
                            };
                        }
                        Ok(None) => continue,
                        Err(e) => {
                            self.failed("claim", &e);
                            return Claim::Alone;
                        }
                    }
                }
                Err(e) => {
                    self.failed("claim", &e);
                    return Claim::Alone;
                }
            };
            if owned {
                let renew = tokio::spawn(renew(Arc::clone(self), key.to_owned(), value.clone()));
                return Claim::Owned(Lock {
                    cluster: Arc::clone(self),
                    key: key.to_owned(),
                    value,
                    renew,
                });
            }
        }
        Claim::Alone
    }

    /// The holder of `key` (its `advertise_url`); `Some(None)` when nobody holds it, `None`
    /// when Redis cannot be asked.
    pub async fn holder(&self, key: &str) -> Option<Option<String>> {
        if !self.available() {
            return None;
        }
        let got: redis::RedisResult<Option<String>> = self.query(redis::cmd("GET").arg(key)).await;
        match got {
            Ok(value) => Some(value.and_then(|v| v.split_once(' ').map(|(_, me)| me.to_owned()))),
            Err(e) => {
                self.failed("get", &e);
                None
            }
        }
    }

    /// Waits until nobody holds `key` (or Redis cannot be asked), for at most `limit`.
    pub async fn released(&self, key: &str, limit: Duration) {
        let deadline = Instant::now() + limit;
        while Instant::now() < deadline {
            match self.holder(key).await {
                Some(Some(_)) => tokio::time::sleep(Duration::from_millis(50)).await,
                _ => return,
            }
        }
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

async fn renew(cluster: Arc<Cluster>, key: String, value: String) {
    let ttl = LOCK_TTL.as_millis().to_string();
    loop {
        tokio::time::sleep(RENEW_EVERY).await;
        match cluster.eval(RENEW, &[&key], &[&value, &ttl]).await {
            Ok(1) => {}
            Ok(_) => {
                tracing::warn!(
                    key,
                    "a cluster lock was lost (expired while Redis was away?)"
                );
                return;
            }
            Err(e) => cluster.failed("renew", &e),
        }
    }
}

/// How often a replica shares its upstream budget and 429 pause, and takes the others'.
const LIMITS_EVERY: Duration = Duration::from_millis(500);

impl Cluster {
    /// Shares `upstream`'s rate-limit state with the other replicas while this one runs: a
    /// 429 pause (and its `Retry-After`) and the budget upstream last reported apply to every
    /// replica, within half a second.
    pub fn share_limits(self: &Arc<Self>, host: &str, upstream: Arc<crate::upstream::Upstream>) {
        let (pause_key, budget_key) = (
            format!("pullthrough:pause:{host}"),
            format!("pullthrough:budget:{host}"),
        );
        let cluster = Arc::downgrade(self);
        tokio::spawn(async move {
            let mut shared_seen = None;
            loop {
                tokio::time::sleep(LIMITS_EVERY).await;
                let Some(cluster) = cluster.upgrade() else {
                    return;
                };
                if !cluster.available() {
                    continue;
                }
                cluster
                    .sync_limits(&pause_key, &budget_key, &upstream, &mut shared_seen)
                    .await;
            }
        });
    }

    async fn sync_limits(
        &self,
        pause_key: &str,
        budget_key: &str,
        upstream: &crate::upstream::Upstream,
        shared_seen: &mut Option<u64>,
    ) {
        let limits = &upstream.limits;
        // The later pause wins: this replica's goes out, or the others' comes in.
        let theirs: Option<(u64, bool)> = match self
            .query::<Option<String>>(redis::cmd("GET").arg(pause_key))
            .await
        {
            Ok(value) => value.and_then(|v| {
                let mut parts = v.split(' ');
                let until = parts.next()?.parse::<u64>().ok()?;
                Some((until, parts.next() == Some("1")))
            }),
            Err(e) => return self.failed("pause", &e),
        };
        match (limits.pause_deadline(), theirs) {
            (Some((until, abuse)), theirs) if theirs.is_none_or(|(t, _)| t < until) => {
                let ttl = until.saturating_sub(now_ms()).max(1);
                let mut set = redis::cmd("SET");
                set.arg(pause_key)
                    .arg(format!("{until} {}", u8::from(abuse)))
                    .arg("PX")
                    .arg(ttl);
                if let Err(e) = self.query::<()>(&set).await {
                    self.failed("pause", &e);
                }
            }
            (_, Some((until, abuse))) => limits.adopt_pause(until, abuse),
            _ => {}
        }
        // The budget: the newest observation wins, in both directions.
        let mine = limits.snapshot();
        let theirs: Option<crate::upstream::ratelimit::RateLimit> = self
            .query::<Option<String>>(redis::cmd("GET").arg(budget_key))
            .await
            .ok()
            .flatten()
            .and_then(|v| serde_json::from_str(&v).ok());
        match theirs {
            Some(theirs) if theirs.observed_at > mine.observed_at => limits.adopt(theirs),
            _ if mine.observed_at.is_some() && mine.observed_at != *shared_seen => {
                if let Ok(json) = serde_json::to_string(&mine) {
                    let mut set = redis::cmd("SET");
                    set.arg(budget_key).arg(json).arg("EX").arg(24 * 3600);
                    if self.query::<()>(&set).await.is_ok() {
                        *shared_seen = mine.observed_at;
                    }
                }
            }
            _ => {}
        }
    }
}

/// The stream of purges, for the other replicas.
const PURGES: &str = "pullthrough:purges";

/// A purge done through one replica's cache API.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Purged {
    /// `tag`, `manifest` or `blob`.
    pub kind: String,
    /// The upstream (its host, as the cache API names it).
    pub upstream: String,
    /// The repository (empty for a blob).
    pub name: String,
    /// The tag or digest.
    pub reference: String,
}

/// Applies a purge another replica announced.
pub type ApplyPurge =
    Arc<dyn Fn(Purged) -> std::pin::Pin<Box<dyn Future<Output = ()> + Send>> + Send + Sync>;

impl Cluster {
    /// Tells the other replicas about a purge (they drop their copies within half a second).
    pub async fn announce(&self, purged: &Purged) {
        if !self.available() {
            return;
        }
        let mut add = redis::cmd("XADD");
        add.arg(PURGES)
            .arg("MAXLEN")
            .arg("~")
            .arg(10_000)
            .arg("*")
            .arg("origin")
            .arg(&self.me)
            .arg("kind")
            .arg(&purged.kind)
            .arg("upstream")
            .arg(&purged.upstream)
            .arg("name")
            .arg(&purged.name)
            .arg("reference")
            .arg(&purged.reference);
        if let Err(e) = self.query::<String>(&add).await {
            self.failed("announce", &e);
        }
    }

    /// Applies the purges other replicas announce, from now on, while this replica runs.
    pub fn follow_purges(self: &Arc<Self>, apply: ApplyPurge) {
        let cluster = Arc::downgrade(self);
        tokio::spawn(async move {
            let mut last: Option<String> = None;
            let mut first = true;
            loop {
                // The start of the stream is taken at once: purges announced from the moment
                // this replica serves apply to it.
                if !std::mem::take(&mut first) {
                    tokio::time::sleep(LIMITS_EVERY).await;
                }
                let Some(cluster) = cluster.upgrade() else {
                    return;
                };
                if !cluster.available() {
                    continue;
                }
                let Some(from) = &last else {
                    // Start after whatever is in the stream now.
                    let newest: redis::RedisResult<redis::streams::StreamRangeReply> = cluster
                        .query(
                            redis::cmd("XREVRANGE")
                                .arg(PURGES)
                                .arg("+")
                                .arg("-")
                                .arg("COUNT")
                                .arg(1),
                        )
                        .await;
                    match newest {
                        Ok(reply) => {
                            last = Some(
                                reply
                                    .ids
                                    .first()
                                    .map_or_else(|| "0-0".to_owned(), |e| e.id.clone()),
                            );
                        }
                        Err(e) => cluster.failed("purges", &e),
                    }
                    continue;
                };
                let read: redis::RedisResult<Option<redis::streams::StreamReadReply>> = cluster
                    .query(
                        redis::cmd("XREAD")
                            .arg("COUNT")
                            .arg(1000)
                            .arg("STREAMS")
                            .arg(PURGES)
                            .arg(from),
                    )
                    .await;
                let entries = match read {
                    Ok(reply) => reply.map(|r| r.keys).unwrap_or_default(),
                    Err(e) => {
                        cluster.failed("purges", &e);
                        continue;
                    }
                };
                for entry in entries.into_iter().flat_map(|k| k.ids) {
                    last = Some(entry.id.clone());
                    let field = |f: &str| entry.get::<String>(f).unwrap_or_default();
                    if field("origin") == cluster.me {
                        continue;
                    }
                    apply(Purged {
                        kind: field("kind"),
                        upstream: field("upstream"),
                        name: field("name"),
                        reference: field("reference"),
                    })
                    .await;
                }
            }
        });
    }
}

/// Blobs in object storage: last access (a sorted set), sizes (a hash) and their total.
const BLOB_ACCESS: &str = "pullthrough:blobs:access";
const BLOB_SIZES: &str = "pullthrough:blobs:sizes";
const BLOB_BYTES: &str = "pullthrough:blobs:bytes";

/// Records an uploaded blob's size (once) and access time.
const ADD_BLOB: &str = r"
if redis.call('hset', KEYS[1], ARGV[1], ARGV[2]) == 1 then redis.call('incrby', KEYS[2], ARGV[2]) end
redis.call('zadd', KEYS[3], ARGV[3], ARGV[1])
return 1";

/// Forgets a blob deleted from object storage.
const FORGET_BLOB: &str = r"
local size = redis.call('hget', KEYS[1], ARGV[1])
if size then redis.call('hdel', KEYS[1], ARGV[1]); redis.call('decrby', KEYS[2], size) end
redis.call('zrem', KEYS[3], ARGV[1])
return 1";

impl Cluster {
    /// Runs a script over the blob index.
    async fn script(&self, code: &str, args: &[&str]) -> bool {
        match self
            .eval(code, &[BLOB_SIZES, BLOB_BYTES, BLOB_ACCESS], args)
            .await
        {
            Ok(_) => true,
            Err(e) => {
                self.failed("blob index", &e);
                false
            }
        }
    }

    /// Records a blob uploaded to object storage, for the cluster-wide eviction.
    pub async fn blob_stored(&self, digest: &str, size: u64) {
        if self.available() {
            let (size, now) = (size.to_string(), now_ms().to_string());
            self.script(ADD_BLOB, &[digest, &size, &now]).await;
        }
    }

    /// Forgets a blob deleted from object storage; whether Redis took it.
    pub async fn blob_deleted(&self, digest: &str) -> bool {
        self.available() && self.script(FORGET_BLOB, &[digest]).await
    }

    /// Records that blobs were served now (their last access, for the eviction).
    pub async fn blobs_used(&self, digests: &[String]) {
        if digests.is_empty() || !self.available() {
            return;
        }
        let now = now_ms();
        // A thousand per command: a busy replica's round stays a few small requests.
        for some in digests.chunks(1000) {
            let mut add = redis::cmd("ZADD");
            // Only blobs the index knows (uploaded): XX.
            add.arg(BLOB_ACCESS).arg("XX");
            for digest in some {
                add.arg(now).arg(digest);
            }
            if let Err(e) = self.query::<i64>(&add).await {
                return self.failed("blob access", &e);
            }
        }
    }

    /// Bytes of the blobs in object storage, as the index counts them (`None`: Redis cannot
    /// be asked).
    pub async fn shared_bytes(&self) -> Option<u64> {
        if !self.available() {
            return None;
        }
        let got: Option<i64> = self.query(redis::cmd("GET").arg(BLOB_BYTES)).await.ok()?;
        Some(u64::try_from(got.unwrap_or(0)).unwrap_or(0))
    }

    /// The `n` least recently used blobs in object storage, with their sizes (`None`: Redis
    /// cannot be asked, or answered something else).
    pub async fn coldest(&self, n: usize) -> Option<Vec<(String, u64)>> {
        if !self.available() {
            return None;
        }
        let digests: Vec<String> = self
            .query(
                redis::cmd("ZRANGE")
                    .arg(BLOB_ACCESS)
                    .arg(0)
                    .arg(n.saturating_sub(1)),
            )
            .await
            .ok()?;
        if digests.is_empty() {
            return Some(Vec::new());
        }
        let sizes: Vec<Option<u64>> = self
            .query(redis::cmd("HMGET").arg(BLOB_SIZES).arg(&digests))
            .await
            .ok()?;
        (sizes.len() == digests.len()).then(|| {
            digests
                .into_iter()
                .zip(sizes)
                .map(|(d, s)| (d, s.unwrap_or(0)))
                .collect()
        })
    }
}
