//! Cluster-wide single flight: a lock per fetch (`SET NX PX`), renewed while its holder
//! lives and released only by it.

use super::Cluster;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

/// How long a lock lives without renewal: a dead holder is replaced after this.
pub const LOCK_TTL: Duration = Duration::from_secs(6);

/// How often a holder renews its locks.
const RENEW_EVERY: Duration = Duration::from_secs(2);

/// Extends a lock only for its holder.
const RENEW: &str = r"if redis.call('get', KEYS[1]) == ARGV[1] then return redis.call('pexpire', KEYS[1], ARGV[2]) else return 0 end";

/// Releases a lock only for its holder.
const RELEASE: &str = r"if redis.call('get', KEYS[1]) == ARGV[1] then return redis.call('del', KEYS[1]) else return 0 end";
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
