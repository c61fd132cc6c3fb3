//! The cluster's account of blobs in object storage (size and last access of each, and their
//! total), for the bucket's least-recently-used eviction.

use super::Cluster;
use crate::clock::now_ms;

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
