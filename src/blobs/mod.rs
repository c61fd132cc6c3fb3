//! The blob store: content-addressed files under `blobs/<alg>/<2 hex>/<hex>`, written only
//! after their digest verified (temp file + fsync + rename). It knows files, not where bytes
//! come from: whoever fetches a blob (`proxy`) hands its bytes to one [`Incoming`] per digest,
//! and every request for the digest, the first included, follows the growing temp file. The
//! last byte is held back until the digest verifies, so a corrupt or truncated blob ends in an
//! aborted transfer, never in a complete wrong blob. Least recently used blobs are evicted between watermarks and
//! to keep a minimum of free space on the filesystem. Stored files are checked for their size
//! on every open, re-hashed by a background scrub at a bounded rate, and optionally hashed on
//! every serve (`verify_on_serve`); a file that fails any check is dropped and fetched again.

mod incoming;
mod verify;

pub use incoming::{Begun, Download, Incoming, Origin, WriteError};

use crate::clock::now_ms;
use crate::disk::Layout;
use crate::error::Error;
use crate::metrics::{Metrics, Outcome};
use crate::registry::{Algorithm, ByteRange, Digest, Verifier};
use bytes::Bytes;
use futures_util::{Stream, StreamExt};
use parking_lot::Mutex;
use std::collections::HashMap;
use std::io::SeekFrom;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncSeekExt};
use tokio::sync::Notify;

/// The size of the reads a blob body is sent in (the HTTP/2 send buffer is sized from it).
pub(crate) const CHUNK: usize = 256 * 1024;
/// The suffix of a stored blob's "fetched with credentials" marker.
const PRIVATE_SUFFIX: &str = ".private";

/// What the store knows about a stored blob.
#[derive(Debug)]
struct BlobMeta {
    size: u64,
    last_access: AtomicU64,
    readers: AtomicUsize,
    /// Hashed since this process started (files found at startup are re-verified).
    verified: AtomicBool,
    /// Fetched with credentials: served for a repository only where upstream showed it. Kept
    /// across restarts as an empty `<hex>.private` file beside the blob.
    private: bool,
}

impl BlobMeta {
    fn new(size: u64, verified: bool, private: bool) -> BlobMeta {
        BlobMeta {
            size,
            last_access: AtomicU64::new(now_ms()),
            readers: AtomicUsize::new(0),
            verified: AtomicBool::new(verified),
            private,
        }
    }
}

/// Limits for the store's size, and how it checks what it holds.
#[derive(Debug, Clone, Copy)]
pub struct DiskLimits {
    /// Most bytes of blobs.
    pub max: u64,
    /// Eviction starts above `max * high`.
    pub high: f64,
    /// ...and stops below `max * low`.
    pub low: f64,
    /// Free bytes eviction keeps on the filesystem (0: no such rule).
    pub min_free: u64,
    /// Bytes per second the scrub hashes (0: no scrub).
    pub scrub_rate: u64,
    /// Pause between scrub passes.
    pub scrub_interval: Duration,
    /// Hash every serve from the store.
    pub verify_on_serve: bool,
}

/// Content-addressed blob files, and the blobs being written.
#[derive(Debug)]
pub struct BlobStore {
    layout: Layout,
    index: Mutex<HashMap<Digest, Arc<BlobMeta>>>,
    total: AtomicU64,
    downloads: Mutex<HashMap<Digest, Arc<Download>>>,
    limits: DiskLimits,
    evict: Notify,
    metrics: Arc<Metrics>,
}

/// A blob body about to be sent.
pub struct BlobBody {
    /// Total size of the blob, if known.
    pub size: Option<u64>,
    /// The bytes sent: `(start, end inclusive)` of a 206, or the whole blob.
    pub range: Option<(u64, u64)>,
    /// Hit (the store) or miss (a download).
    pub source: Outcome,
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
    pub fn open(
        layout: Layout,
        limits: DiskLimits,
        metrics: Arc<Metrics>,
    ) -> std::io::Result<Arc<BlobStore>> {
        let store = Arc::new(BlobStore {
            layout,
            index: Mutex::default(),
            total: AtomicU64::new(0),
            downloads: Mutex::default(),
            limits,
            evict: Notify::new(),
            metrics,
        });
        store.scan()?;
        Ok(store)
    }

    /// Starts the background verifier, scrub and evictor.
    pub fn spawn_maintenance(self: &Arc<Self>) {
        let verifier = Arc::clone(self);
        tokio::task::spawn_blocking(move || verifier.verify_all());
        if self.limits.scrub_rate > 0 {
            verify::spawn_scrub(Arc::downgrade(self));
        }
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
                let _ = tokio::task::spawn_blocking(move || store2.evict_if_needed(0)).await;
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

    /// A stored blob's file and size (not checked against its digest here).
    pub fn stored_file(&self, digest: &Digest) -> Option<(PathBuf, u64)> {
        let size = self.index.lock().get(digest).map(|m| m.size)?;
        Some((self.path(digest), size))
    }

    /// The stored blobs used since `since` (milliseconds since the epoch).
    pub fn used_since(&self, since: u64) -> Vec<String> {
        self.index
            .lock()
            .iter()
            .filter(|(_, meta)| meta.last_access.load(Ordering::Relaxed) >= since)
            .map(|(digest, _)| digest.to_string())
            .collect()
    }

    /// Whether the store holds `digest` (not checked against its digest here).
    pub fn contains(&self, digest: &Digest) -> bool {
        self.index.lock().contains_key(digest)
    }

    /// Drops a blob from the store. Readers of its file keep reading; a download under way
    /// stores it again when it ends.
    pub async fn purge(self: &Arc<Self>, digest: &Digest) {
        self.remove_async(digest).await;
    }

    /// Blobs held by the store.
    pub fn count(&self) -> u64 {
        self.index.lock().len() as u64
    }

    /// Downloads under way.
    pub fn downloads(&self) -> u64 {
        self.downloads.lock().len() as u64
    }

    /// Bytes held by the store.
    pub fn total_bytes(&self) -> u64 {
        self.total.load(Ordering::Relaxed)
    }

    fn scan(&self) -> std::io::Result<()> {
        // A store from before private markers existed: every blob it holds may be private.
        let markers = self.layout.root().join("blobs").join(".private-markers");
        let legacy = !markers.exists();
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
                    if let Some(blob) = name.strip_suffix(PRIVATE_SUFFIX) {
                        // A marker: read with its blob; one without a blob goes.
                        if !fan.join(blob).is_file() {
                            let _ = std::fs::remove_file(file.path());
                        }
                        continue;
                    }
                    let parsed = format!("{}:{name}", algorithm.as_str())
                        .parse::<Digest>()
                        .ok()
                        .filter(|d| self.path(d) == file.path());
                    match (parsed, file.metadata()) {
                        (Some(digest), Ok(meta)) if meta.is_file() => {
                            self.total.fetch_add(meta.len(), Ordering::Relaxed);
                            let marker = self.private_marker(&digest);
                            if legacy {
                                std::fs::write(&marker, b"")?;
                            }
                            let private = marker.is_file();
                            self.index.lock().insert(
                                digest,
                                Arc::new(BlobMeta::new(meta.len(), false, private)),
                            );
                        }
                        _ => {
                            tracing::warn!(path = %file.path().display(), "removing a stray file from the blob store");
                            let _ = std::fs::remove_file(file.path());
                        }
                    }
                }
            }
        }
        if legacy {
            std::fs::create_dir_all(self.layout.root().join("blobs"))?;
            std::fs::write(
                &markers,
                b"blobs fetched with credentials have a .private marker\n",
            )?;
        }
        tracing::info!(
            blobs = self.index.lock().len(),
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
        let Some(meta) = self.index.lock().get(digest).cloned() else {
            return false;
        };
        if meta.verified.load(Ordering::Acquire) {
            return true;
        }
        self.rehash(digest)
    }

    /// Hashes a stored file now, whatever was known of it; false if it was bad and is now gone.
    fn rehash(&self, digest: &Digest) -> bool {
        self.rehash_at(digest, 0)
    }

    /// [`Self::rehash`] reading at most `rate` bytes per second (0: as fast as the disk goes).
    fn rehash_at(&self, digest: &Digest, rate: u64) -> bool {
        let Some(meta) = self.index.lock().get(digest).cloned() else {
            return false;
        };
        let hashed = hash_file(&self.path(digest), digest.algorithm(), rate);
        let ok = matches!(&hashed, Ok((d, len)) if d == digest && *len == meta.size);
        if ok {
            meta.verified.store(true, Ordering::Release);
        } else if self
            .index
            .lock()
            .get(digest)
            .is_some_and(|m| Arc::ptr_eq(m, &meta))
        {
            tracing::warn!(%digest, "deleting a stored blob that does not match its digest");
            self.remove(digest);
        }
        ok
    }

    /// Drops a blob from the index and deletes its file (blocking).
    fn remove(&self, digest: &Digest) {
        if let Some(meta) = self.index.lock().remove(digest) {
            self.total.fetch_sub(meta.size, Ordering::Relaxed);
        }
        let _ = std::fs::remove_file(self.path(digest));
        let _ = std::fs::remove_file(self.private_marker(digest));
    }

    /// The marker that says a stored blob was fetched with credentials.
    fn private_marker(&self, digest: &Digest) -> PathBuf {
        let mut path = self.path(digest).into_os_string();
        path.push(PRIVATE_SUFFIX);
        PathBuf::from(path)
    }

    /// Whether a stored blob was fetched with credentials (and so may be private).
    pub fn is_private(&self, digest: &Digest) -> bool {
        self.index.lock().get(digest).is_some_and(|m| m.private)
    }

    /// [`Self::remove`] off the async workers.
    async fn remove_async(self: &Arc<Self>, digest: &Digest) {
        let (store, digest) = (Arc::clone(self), digest.clone());
        let _ = tokio::task::spawn_blocking(move || store.remove(&digest)).await;
    }

    /// A stored blob, verified, or `None`.
    async fn stored(self: &Arc<Self>, digest: &Digest) -> Option<Arc<BlobMeta>> {
        let meta = self.index.lock().get(digest).cloned()?;
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
        let size = meta.size;
        let bounds = range
            .map(|r| r.resolve(size).ok_or(Error::RangeInvalid { size }))
            .transpose()?;
        let mut file = match tokio::fs::File::open(self.path(digest)).await {
            Ok(f) => f,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                tracing::warn!(%digest, "a stored blob's file is gone; fetching it again");
                self.remove_async(digest).await;
                return Ok(None);
            }
            Err(e) => return Err(e.into()),
        };
        // A file of the wrong size (truncated, appended to) is dropped and fetched again.
        let on_disk = file.metadata().await?.len();
        if on_disk != meta.size {
            tracing::warn!(%digest, expected = meta.size, on_disk, "a stored blob has the wrong size; dropping it");
            self.remove_async(digest).await;
            return Ok(None);
        }
        if self.limits.verify_on_serve && bounds.is_some() {
            // A range is only part of the file: hash all of it before serving any.
            let (store, d) = (Arc::clone(self), digest.clone());
            let good = tokio::task::spawn_blocking(move || store.rehash(&d))
                .await
                .unwrap_or(false);
            if !good {
                return Ok(None);
            }
        }
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
        let stream: verify::BoxStream = if self.limits.verify_on_serve && bounds.is_none() {
            Box::pin(verify::verified(stream, Arc::clone(self), digest.clone()))
        } else {
            Box::pin(stream)
        };
        Ok(Some(BlobBody {
            size: Some(meta.size),
            range: bounds,
            source: Outcome::Hit,
            stream,
        }))
    }

    /// Whether the store is above its high watermark.
    fn over_high_watermark(&self) -> bool {
        self.total_bytes() as f64 > self.limits.max as f64 * self.limits.high
    }

    /// Free bytes on the data directory's filesystem (`None` if it cannot be read).
    fn free_space(&self) -> Option<u64> {
        let stat = rustix::fs::statvfs(self.layout.root()).ok()?;
        stat.f_bavail.checked_mul(stat.f_frsize)
    }

    /// Whether eviction is needed: above the high watermark, or below the free-space minimum.
    fn needs_eviction(&self) -> bool {
        self.over_high_watermark()
            || (self.limits.min_free > 0
                && self.free_space().is_some_and(|f| f < self.limits.min_free))
    }

    /// Evicts least recently used blobs (never one being read) until below the low watermark
    /// and with the free-space minimum (plus `extra`) available.
    fn evict_if_needed(&self, extra: u64) {
        if extra == 0 && !self.needs_eviction() {
            return;
        }
        let low = (self.limits.max as f64 * self.limits.low) as u64;
        let want_free = self.limits.min_free.saturating_add(extra);
        // The watermarks apply only when the store is above the high one; room for a download
        // (`extra`) or the free minimum alone stops as soon as there is enough.
        let over_high = self.over_high_watermark();
        let done = |store: &Self| {
            (!over_high || store.total_bytes() <= low)
                && (want_free == 0 || store.free_space().is_none_or(|f| f >= want_free))
        };
        let mut candidates: Vec<(u64, Digest, u64)> = self
            .index
            .lock()
            .iter()
            .filter(|(_, m)| m.readers.load(Ordering::Acquire) == 0)
            .map(|(d, m)| (m.last_access.load(Ordering::Relaxed), d.clone(), m.size))
            .collect();
        candidates.sort_by_key(|(last_access, _, _)| *last_access);
        let (mut freed, mut count) = (0u64, 0usize);
        for (_, digest, size) in candidates {
            if done(self) {
                break;
            }
            let in_use = self
                .index
                .lock()
                .get(&digest)
                .is_some_and(|m| m.readers.load(Ordering::Acquire) > 0);
            if in_use {
                continue;
            }
            self.remove(&digest);
            self.metrics.evicted(size);
            freed += size;
            count += 1;
        }
        if count > 0 {
            tracing::info!(
                blobs = count,
                bytes = freed,
                total = self.total_bytes(),
                free = self.free_space(),
                "evicted least recently used blobs"
            );
        }
    }

    /// Warns when the filesystem has less free space than `cache_min_free_disk`: every blob
    /// would be evicted right after its download.
    pub fn warn_if_short_of_space(&self) {
        let min_free = self.limits.min_free;
        if let Some(free) = self.free_space()
            && min_free > 0
            && free < min_free
        {
            tracing::warn!(
                free,
                cache_min_free_disk = min_free,
                data_dir = %self.layout.root().display(),
                "the data directory's filesystem has less free space than cache_min_free_disk; blobs will be evicted as soon as they are stored"
            );
        }
    }
}

struct ReaderGuard(Arc<BlobMeta>);

impl Drop for ReaderGuard {
    fn drop(&mut self) {
        self.0.readers.fetch_sub(1, Ordering::AcqRel);
    }
}

/// Hashes a file, reading at most `rate` bytes per second (0: unlimited); returns the digest
/// and the length read.
fn hash_file(path: &Path, algorithm: Algorithm, rate: u64) -> std::io::Result<(Digest, u64)> {
    use std::io::Read;
    let mut file = std::fs::File::open(path)?;
    let mut verifier = Verifier::new(algorithm);
    let mut buf = vec![0u8; 1 << 20];
    let started = std::time::Instant::now();
    let mut len = 0u64;
    loop {
        let n = file.read(&mut buf)?;
        if n == 0 {
            return Ok((verifier.finish(), len));
        }
        verifier.update(&buf[..n]);
        len += n as u64;
        if rate > 0 {
            // Sleep until the bytes read so far fit the rate.
            let due = Duration::from_secs_f64(len as f64 / rate as f64);
            if let Some(ahead) = due.checked_sub(started.elapsed()) {
                std::thread::sleep(ahead);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::registry::RepoName;

    /// A store in a temp dir, with `max` bytes.
    pub(super) fn store(dir: &Path, max: u64) -> Arc<BlobStore> {
        let limits = DiskLimits {
            max,
            high: 0.9,
            low: 0.5,
            min_free: 0,
            scrub_rate: 0,
            scrub_interval: Duration::from_secs(3600),
            verify_on_serve: false,
        };
        let layout = Layout::open(dir).unwrap();
        BlobStore::open(layout, limits, Metrics::new(vec!["test".into()])).unwrap()
    }

    pub(super) fn digest_of(bytes: &[u8]) -> Digest {
        let mut v = Verifier::new(Algorithm::Sha256);
        v.update(bytes);
        v.finish()
    }

    pub(super) fn origin() -> incoming::Origin {
        incoming::Origin {
            upstream: 1,
            repository: RepoName::parse("library/alpine", false).unwrap(),
        }
    }

    pub(super) async fn collect(body: BlobBody) -> std::io::Result<Vec<u8>> {
        let mut out = Vec::new();
        let mut stream = body.stream;
        while let Some(chunk) = stream.next().await {
            out.extend_from_slice(&chunk?);
        }
        Ok(out)
    }

    /// Stores `bytes` through an [`Incoming`], as a fetch would.
    pub(super) async fn put(store: &Arc<BlobStore>, bytes: &[u8]) -> Digest {
        let digest = digest_of(bytes);
        let Begun::Started(mut incoming) = store.begin(&digest, origin(), false).await.unwrap()
        else {
            panic!("a download was already under way, or the blob stored");
        };
        incoming.announce(Some(bytes.len() as u64)).unwrap();
        incoming.push(Bytes::copy_from_slice(bytes)).await.unwrap();
        let download = Arc::clone(incoming.download());
        assert!(!incoming.commit().await.unwrap());
        store.end(&digest, &download, Ok(()));
        digest
    }

    #[tokio::test]
    async fn a_stored_blob_serves_whole_and_in_ranges() {
        let dir = tempfile::tempdir().unwrap();
        let store = store(dir.path(), 1 << 20);
        let digest = put(&store, b"0123456789").await;
        assert!(store.contains(&digest));
        assert_eq!(store.count(), 1);
        assert_eq!(store.total_bytes(), 10);
        assert_eq!(store.verified_size(&digest).await, Some(10));
        let whole = store.open_stored(&digest, None).await.unwrap().unwrap();
        assert_eq!(whole.source, Outcome::Hit);
        assert_eq!(collect(whole).await.unwrap(), b"0123456789");
        let cases = [
            ("bytes=2-4", Some((2, 4)), &b"234"[..]),
            ("bytes=7-", Some((7, 9)), b"789"),
            ("bytes=-2", Some((8, 9)), b"89"),
            ("bytes=5-99", Some((5, 9)), b"56789"),
        ];
        for (header, bounds, want) in cases {
            let range = ByteRange::parse(header);
            let body = store.open_stored(&digest, range).await.unwrap().unwrap();
            assert_eq!(body.range, bounds, "{header}");
            assert_eq!(collect(body).await.unwrap(), want, "{header}");
        }
        let past = store
            .open_stored(&digest, ByteRange::parse("bytes=10-"))
            .await;
        assert!(matches!(past, Err(Error::RangeInvalid { size: 10 })));
    }

    #[tokio::test]
    async fn a_file_of_the_wrong_size_is_dropped_not_served() {
        let dir = tempfile::tempdir().unwrap();
        let store = store(dir.path(), 1 << 20);
        let digest = put(&store, b"0123456789").await;
        let (path, _) = store.stored_file(&digest).unwrap();
        std::fs::write(&path, b"012345").unwrap();
        assert!(store.open_stored(&digest, None).await.unwrap().is_none());
        assert!(!store.contains(&digest));
        assert!(!path.exists());
    }

    #[tokio::test]
    async fn a_reopened_store_finds_and_reverifies_its_files() {
        let dir = tempfile::tempdir().unwrap();
        let (good, bad) = {
            let store = store(dir.path(), 1 << 20);
            (put(&store, b"good").await, put(&store, b"bad!").await)
        };
        // Same size, other bytes: found at startup, caught before its first use.
        let path = store(dir.path(), 1 << 20).stored_file(&bad).unwrap().0;
        std::fs::write(&path, b"BAD!").unwrap();
        let store = store(dir.path(), 1 << 20);
        assert_eq!(store.count(), 2);
        assert_eq!(store.verified_size(&good).await, Some(4));
        assert_eq!(store.verified_size(&bad).await, None);
        assert!(!store.contains(&bad));
    }

    #[tokio::test]
    async fn eviction_takes_the_least_recently_used_first_and_never_one_being_read() {
        let dir = tempfile::tempdir().unwrap();
        // High watermark 90 bytes, low 50.
        let store = store(dir.path(), 100);
        let oldest = put(&store, &[1; 25]).await;
        let read = put(&store, &[2; 25]).await;
        let newest = put(&store, &[3; 25]).await;
        // `oldest` is being read; `read` was used before `newest`.
        let reader = store.open_stored(&oldest, None).await.unwrap().unwrap();
        for (digest, at) in [(&read, 1), (&newest, 2)] {
            store.index.lock()[digest]
                .last_access
                .store(at, Ordering::Relaxed);
        }
        let fourth = put(&store, &[4; 25]).await;
        store.evict_if_needed(0);
        assert!(
            store.contains(&oldest),
            "a blob being read is never evicted"
        );
        assert!(!store.contains(&read));
        assert!(!store.contains(&newest));
        assert!(store.contains(&fourth));
        assert_eq!(collect(reader).await.unwrap(), vec![1; 25]);
    }
}
