//! Blobs in object storage shared by the replicas (`storage_url`): their keys, the marker of
//! a blob fetched with credentials, and, in a cluster, the least-recently-used eviction that
//! keeps the bucket under `storage_max_bytes`.

use super::{Claim, Cluster};
use crate::blobs::BlobStore;
use crate::clock::now_ms;
use crate::objects::ObjectStorage;
use crate::registry::Digest;
use bytes::Bytes;
use futures_util::StreamExt;
use futures_util::stream::BoxStream;
use std::path::Path;
use std::sync::{Arc, Weak};
use std::time::Duration;

/// How often a replica brings blob access times up to date in Redis, and checks whether object
/// storage is over `storage_max_bytes`.
const EVICTION_EVERY: Duration = Duration::from_secs(5);

/// Blobs shared through object storage.
#[derive(Debug)]
pub struct Bucket {
    objects: Arc<ObjectStorage>,
    /// The cluster's account of what the bucket holds, in a cluster.
    cluster: Option<Arc<Cluster>>,
    /// Most bytes of blobs (`storage_max_bytes`; 0: no limit).
    max: u64,
}

/// A blob's bytes from the bucket: its whole size, the bytes from the offset asked for, and
/// whether it was fetched with credentials.
pub struct Stored {
    /// The blob's whole size.
    pub size: u64,
    /// Its bytes from the offset asked for.
    pub body: BoxStream<'static, Result<Bytes, String>>,
    /// Fetched with credentials (a marker beside it, or the bucket could not say).
    pub private: bool,
}

impl std::fmt::Debug for Stored {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Stored")
            .field("size", &self.size)
            .field("private", &self.private)
            .finish()
    }
}

impl Bucket {
    /// The blobs of `objects`; `cluster` keeps their account for eviction under `max` bytes.
    pub fn new(objects: Arc<ObjectStorage>, cluster: Option<Arc<Cluster>>, max: u64) -> Bucket {
        Bucket {
            objects,
            cluster,
            max,
        }
    }

    /// The object storage itself (for its counters).
    pub fn objects(&self) -> &Arc<ObjectStorage> {
        &self.objects
    }

    /// The blob from byte `offset`, when another replica stored it here.
    pub async fn body_from(&self, digest: &Digest, offset: u64) -> Option<Stored> {
        let (size, stream) = self.objects.get_stream_from(&key(digest), offset).await?;
        // The marker is written before the blob: absent now means public. Unknown counts as
        // private.
        let private = self.objects.exists(&private_key(digest)).await != Some(false);
        Some(Stored {
            size,
            body: stream.map(|r| r.map_err(|e| e.to_string())).boxed(),
            private,
        })
    }

    /// Shares a stored blob of `size` bytes at `path`. One fetched with credentials is marked
    /// private first (`<digest>.private`), so a replica that reads it serves it only where
    /// upstream shows it; a public one drops a marker left from before.
    pub async fn upload(&self, digest: &Digest, path: &Path, size: u64, private: bool) {
        let marker = private_key(digest);
        let marked = if private {
            self.objects.put_bytes(&marker, Bytes::new()).await
        } else {
            self.objects.delete(&marker).await
        };
        if marked
            && self.objects.put_file(&key(digest), path).await
            && let Some(cluster) = &self.cluster
        {
            cluster.blob_stored(&digest.to_string(), size).await;
        }
    }

    /// Deletes a blob (purged, or found damaged); `false` when the bucket failed.
    pub async fn delete(&self, digest: &Digest) -> bool {
        if !self.objects.delete(&key(digest)).await {
            return false;
        }
        self.objects.delete(&private_key(digest)).await;
        if let Some(cluster) = &self.cluster {
            cluster.blob_deleted(&digest.to_string()).await;
        }
        true
    }

    /// In a cluster, keeps the bucket under `storage_max_bytes` while `store` lives (see
    /// `evict`).
    pub fn spawn_eviction(self: &Arc<Self>, store: Weak<BlobStore>) {
        if let Some(cluster) = &self.cluster {
            tokio::spawn(evict(Arc::downgrade(self), Arc::clone(cluster), store));
        }
    }
}

/// A blob's key in object storage.
fn key(digest: &Digest) -> String {
    format!("blobs/{}/{}", digest.algorithm().as_str(), digest.hex())
}

/// The marker of a blob fetched with credentials, in object storage (written before the blob).
fn private_key(digest: &Digest) -> String {
    format!("{}.private", key(digest))
}

/// Keeps object storage under `storage_max_bytes`, least recently used (across the cluster)
/// first, down to 90 % of it; one replica at a time (a Redis lock). Blobs being downloaded
/// are not in the store's index yet, so never deleted under a download.
async fn evict(bucket: Weak<Bucket>, cluster: Arc<Cluster>, store: Weak<BlobStore>) {
    // Blobs used since the last round: read off the store's access times, so a hit does no
    // extra work for the cluster.
    let mut since = now_ms();
    loop {
        tokio::time::sleep(EVICTION_EVERY).await;
        let round = now_ms();
        let (Some(bucket), Some(store)) = (bucket.upgrade(), store.upgrade()) else {
            return;
        };
        let used = store.used_since(since);
        drop(store);
        since = round;
        cluster.blobs_used(&used).await;
        if bucket.max == 0 {
            continue;
        }
        let Some(bytes) = cluster.shared_bytes().await else {
            continue;
        };
        if bytes <= bucket.max {
            continue;
        }
        let Claim::Owned(_lock) = cluster.claim("pullthrough:lock:evict").await else {
            continue;
        };
        bucket.evict_down(&cluster, bytes).await;
    }
}

impl Bucket {
    /// One eviction pass from `bytes` down to 90 % of the limit, round by round from what
    /// Redis counts now; any Redis or bucket failure ends the pass.
    async fn evict_down(&self, cluster: &Cluster, mut bytes: u64) {
        let target = self.max / 10 * 9;
        while bytes > target {
            let Some(coldest) = cluster.coldest(32).await else {
                return;
            };
            if coldest.is_empty() {
                return;
            }
            for (digest, size) in coldest {
                if bytes <= target {
                    break;
                }
                // Forgotten only once deleted: an object still there stays counted.
                if let Ok(parsed) = digest.parse::<Digest>() {
                    if !self.objects.delete(&key(&parsed)).await {
                        return;
                    }
                    self.objects.delete(&private_key(&parsed)).await;
                    tracing::info!(%digest, size, "evicted from object storage (least recently used in the cluster)");
                }
                if !cluster.blob_deleted(&digest).await {
                    return;
                }
                bytes = bytes.saturating_sub(size);
            }
            match cluster.shared_bytes().await {
                Some(now) => bytes = now,
                None => return,
            }
        }
    }
}
