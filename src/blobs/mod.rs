//! The blob store: content-addressed files under `blobs/<alg>/<2 hex>/<hex>`, written only
//! after their digest verified (temp file + fsync + rename). One upstream download per digest:
//! it runs as its own task (so a departing client does not stop it), and every request for the
//! digest, the first included, follows the growing temp file. The last byte is held back until
//! the digest verifies, so a corrupt or truncated upstream blob ends in an aborted transfer,
//! never in a complete wrong blob. Least recently used blobs are evicted between watermarks.

mod download;
mod range;

pub use range::ByteRange;

use crate::disk::Layout;
use crate::error::Error;
use crate::manifests::now_ms;
use crate::registry::{Algorithm, Digest, Verifier};
use bytes::Bytes;
use download::Download;
use futures_util::{Stream, StreamExt};
use std::collections::HashMap;
use std::io::SeekFrom;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncSeekExt};
use tokio::sync::Notify;

const CHUNK: usize = 256 * 1024;

/// What the store knows about a stored blob.
#[derive(Debug)]
struct BlobMeta {
    size: u64,
    last_access: AtomicU64,
    readers: AtomicUsize,
    /// Hashed since this process started (files found at startup are re-verified).
    verified: AtomicBool,
}

impl BlobMeta {
    fn new(size: u64, verified: bool) -> BlobMeta {
        BlobMeta {
            size,
            last_access: AtomicU64::new(now_ms()),
            readers: AtomicUsize::new(0),
            verified: AtomicBool::new(verified),
        }
    }
}

/// Limits for the store's size.
#[derive(Debug, Clone, Copy)]
pub struct DiskLimits {
    /// Most bytes of blobs.
    pub max: u64,
    /// Eviction starts above `max * high`.
    pub high: f64,
    /// ...and stops below `max * low`.
    pub low: f64,
}

/// Content-addressed blob files with single-flight downloads.
#[derive(Debug)]
pub struct BlobStore {
    layout: Layout,
    index: Mutex<HashMap<Digest, Arc<BlobMeta>>>,
    total: AtomicU64,
    downloads: Mutex<HashMap<Digest, Arc<Download>>>,
    limits: DiskLimits,
    evict: Notify,
}

/// Where a blob answer comes from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Source {
    /// The store.
    Hit,
    /// A download (this request's own, or one it joined).
    Miss,
}

/// A blob body about to be sent.
pub struct BlobBody {
    /// Total size of the blob, if known.
    pub size: Option<u64>,
    /// The bytes sent: `(start, end inclusive)` of a 206, or the whole blob.
    pub range: Option<(u64, u64)>,
    /// Hit or miss.
    pub source: Source,
    /// The bytes.
    pub stream: std::pin::Pin<Box<dyn Stream<Item = std::io::Result<Bytes>> + Send>>,
}

impl std::fmt::Debug for BlobBody {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("BlobBody")
            .field("size", &self.size)
            .field("range", &self.range)
            .field("source", &self.source)
            .finish()
    }
}

impl BlobStore {
    /// Opens the store: indexes the files present (verifying them in the background).
    pub fn open(layout: Layout, limits: DiskLimits) -> std::io::Result<Arc<BlobStore>> {
        let store = Arc::new(BlobStore {
            layout,
            index: Mutex::default(),
            total: AtomicU64::new(0),
            downloads: Mutex::default(),
            limits,
            evict: Notify::new(),
        });
        store.scan()?;
        Ok(store)
    }

    /// Starts the background verifier and evictor.
    pub fn spawn_maintenance(self: &Arc<Self>) {
        let verifier = Arc::clone(self);
        tokio::task::spawn_blocking(move || verifier.verify_all());
        let evictor = Arc::downgrade(self);
        tokio::spawn(async move {
            loop {
                let Some(store) = evictor.upgrade() else {
                    return;
                };
                let notified = store.evict.notified();
                let _ = tokio::time::timeout(Duration::from_secs(30), notified).await;
                let store2 = Arc::clone(&store);
                drop(store);
                let _ = tokio::task::spawn_blocking(move || store2.evict_if_needed()).await;
            }
        });
    }

    fn path(&self, digest: &Digest) -> PathBuf {
        let hex = digest.hex();
        self.layout
            .root()
            .join("blobs")
            .join(digest.algorithm().as_str())
            .join(&hex[..2])
            .join(hex)
    }

    /// Bytes held by the store.
    pub fn total_bytes(&self) -> u64 {
        self.total.load(Ordering::Relaxed)
    }

    fn scan(&self) -> std::io::Result<()> {
        for (alg, algorithm) in [("sha256", Algorithm::Sha256), ("sha512", Algorithm::Sha512)] {
            let dir = self.layout.root().join("blobs").join(alg);
            let Ok(fans) = std::fs::read_dir(&dir) else {
                continue;
            };
            for fan in fans {
                let fan = fan?.path();
                let Ok(files) = std::fs::read_dir(&fan) else {
                    continue;
                };
                for file in files {
                    let file = file?;
                    let name = file.file_name().to_string_lossy().into_owned();
                    let parsed = format!("{}:{name}", algorithm.as_str())
                        .parse::<Digest>()
                        .ok()
                        .filter(|d| self.path(d) == file.path());
                    match (parsed, file.metadata()) {
                        (Some(digest), Ok(meta)) if meta.is_file() => {
                            self.total.fetch_add(meta.len(), Ordering::Relaxed);
                            self.index
                                .lock()
                                .expect("index lock poisoned")
                                .insert(digest, Arc::new(BlobMeta::new(meta.len(), false)));
                        }
                        _ => {
                            tracing::warn!(path = %file.path().display(), "removing a stray file from the blob store");
                            let _ = std::fs::remove_file(file.path());
                        }
                    }
                }
            }
        }
        tracing::info!(
            blobs = self.index.lock().expect("index lock poisoned").len(),
            bytes = self.total_bytes(),
            "blob store loaded"
        );
        Ok(())
    }

    /// Hashes every blob found at startup; deletes those that do not match their name.
    fn verify_all(&self) {
        let pending: Vec<Digest> = self
            .index
            .lock()
            .expect("index lock poisoned")
            .iter()
            .filter(|(_, m)| !m.verified.load(Ordering::Relaxed))
            .map(|(d, _)| d.clone())
            .collect();
        for digest in pending {
            self.verify_file(&digest);
        }
    }

    /// Verifies one stored file (once per process); false if it was bad and is now gone.
    fn verify_file(&self, digest: &Digest) -> bool {
        let Some(meta) = self
            .index
            .lock()
            .expect("index lock poisoned")
            .get(digest)
            .cloned()
        else {
            return false;
        };
        if meta.verified.load(Ordering::Acquire) {
            return true;
        }
        let ok = hash_file(&self.path(digest), digest.algorithm()).is_ok_and(|d| d == *digest);
        if ok {
            meta.verified.store(true, Ordering::Release);
        } else {
            tracing::warn!(%digest, "deleting a stored blob that does not match its digest");
            self.remove(digest);
        }
        ok
    }

    fn remove(&self, digest: &Digest) {
        if let Some(meta) = self
            .index
            .lock()
            .expect("index lock poisoned")
            .remove(digest)
        {
            self.total.fetch_sub(meta.size, Ordering::Relaxed);
        }
        let _ = std::fs::remove_file(self.path(digest));
    }

    /// A stored blob, verified, or `None`.
    async fn stored(self: &Arc<Self>, digest: &Digest) -> Option<Arc<BlobMeta>> {
        let meta = self
            .index
            .lock()
            .expect("index lock poisoned")
            .get(digest)
            .cloned()?;
        if !meta.verified.load(Ordering::Acquire) {
            let store = Arc::clone(self);
            let d = digest.clone();
            if !tokio::task::spawn_blocking(move || store.verify_file(&d))
                .await
                .unwrap_or(false)
            {
                return None;
            }
        }
        Some(meta)
    }

    /// The size of a stored blob, once its file verified (files found at startup are hashed
    /// before their first use).
    pub async fn verified_size(self: &Arc<Self>, digest: &Digest) -> Option<u64> {
        self.stored(digest).await.map(|m| m.size)
    }

    /// Serves a stored blob, or `None` if it is not stored.
    pub async fn open_stored(
        self: &Arc<Self>,
        digest: &Digest,
        range: Option<ByteRange>,
    ) -> Result<Option<BlobBody>, Error> {
        let Some(meta) = self.stored(digest).await else {
            return Ok(None);
        };
        let bounds = range.map(|r| r.resolve(meta.size)).transpose()?;
        let mut file = match tokio::fs::File::open(self.path(digest)).await {
            Ok(f) => f,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                self.remove(digest);
                return Ok(None);
            }
            Err(e) => return Err(e.into()),
        };
        let (start, end) = bounds.unwrap_or((0, meta.size.saturating_sub(1)));
        if start > 0 {
            file.seek(SeekFrom::Start(start)).await?;
        }
        let len = if meta.size == 0 { 0 } else { end - start + 1 };
        meta.last_access.store(now_ms(), Ordering::Relaxed);
        meta.readers.fetch_add(1, Ordering::AcqRel);
        let guard = ReaderGuard(Arc::clone(&meta));
        let stream =
            tokio_util::io::ReaderStream::with_capacity(file.take(len), CHUNK).map(move |chunk| {
                let _ = &guard;
                chunk
            });
        Ok(Some(BlobBody {
            size: Some(meta.size),
            range: bounds,
            source: Source::Hit,
            stream: Box::pin(stream),
        }))
    }

    /// Evicts least recently used blobs (never one being read) until below the low watermark.
    fn evict_if_needed(&self) {
        let high = (self.limits.max as f64 * self.limits.high) as u64;
        let low = (self.limits.max as f64 * self.limits.low) as u64;
        if self.total_bytes() <= high {
            return;
        }
        let mut candidates: Vec<(u64, Digest, u64)> = self
            .index
            .lock()
            .expect("index lock poisoned")
            .iter()
            .filter(|(_, m)| m.readers.load(Ordering::Acquire) == 0)
            .map(|(d, m)| (m.last_access.load(Ordering::Relaxed), d.clone(), m.size))
            .collect();
        candidates.sort_by_key(|(last_access, _, _)| *last_access);
        let (mut freed, mut count) = (0u64, 0usize);
        for (_, digest, size) in candidates {
            if self.total_bytes() <= low {
                break;
            }
            let in_use = self
                .index
                .lock()
                .expect("index lock poisoned")
                .get(&digest)
                .is_some_and(|m| m.readers.load(Ordering::Acquire) > 0);
            if in_use {
                continue;
            }
            self.remove(&digest);
            freed += size;
            count += 1;
        }
        tracing::info!(
            blobs = count,
            bytes = freed,
            total = self.total_bytes(),
            "evicted least recently used blobs"
        );
    }
}

struct ReaderGuard(Arc<BlobMeta>);

impl Drop for ReaderGuard {
    fn drop(&mut self) {
        self.0.readers.fetch_sub(1, Ordering::AcqRel);
    }
}

fn hash_file(path: &Path, algorithm: Algorithm) -> std::io::Result<Digest> {
    use std::io::Read;
    let mut file = std::fs::File::open(path)?;
    let mut verifier = Verifier::new(algorithm);
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = file.read(&mut buf)?;
        if n == 0 {
            return Ok(verifier.finish());
        }
        verifier.update(&buf[..n]);
    }
}
