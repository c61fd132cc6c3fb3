//! The blob store: content-addressed files under `blobs/<alg>/<2 hex>/<hex>`, written only
//! after their digest verified (temp file + fsync + rename). One upstream download per digest:
//! it runs as its own task (so a departing client does not stop it), and every request for the
//! digest, the first included, follows the growing temp file. The last byte is held back until
//! the digest verifies, so a corrupt or truncated upstream blob ends in an aborted transfer,
//! never in a complete wrong blob. Least recently used blobs are evicted between watermarks.

use crate::disk::Layout;
use crate::error::Error;
use crate::metrics::Counters;
use crate::registry::{Algorithm, Digest, RepoName, Verifier};
use crate::upstream::Upstream;
use bytes::Bytes;
use futures_util::{Stream, StreamExt};
use std::collections::HashMap;
use std::io::SeekFrom;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncSeekExt, AsyncWriteExt};
use tokio::sync::{Notify, watch};

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

/// Progress of one download, published to its followers.
#[derive(Debug, Clone, Default)]
struct Progress {
    /// Upstream's `Content-Length`, once its headers arrived.
    size: Option<u64>,
    /// Upstream answered with a body.
    started: bool,
    /// Bytes written to the temp file so far.
    written: u64,
    /// Set when the download ended.
    outcome: Option<Result<(), Error>>,
}

#[derive(Debug)]
struct Download {
    temp: PathBuf,
    progress: watch::Sender<Progress>,
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

/// A parsed single `Range: bytes=` request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ByteRange {
    /// `a-b` or `a-`.
    From(u64, Option<u64>),
    /// `-n`: the last n bytes.
    Suffix(u64),
}

impl ByteRange {
    /// Parses a `Range` header; `None` for anything but one well-formed byte range (then the
    /// whole blob is served, as RFC 9110 allows).
    pub fn parse(value: &str) -> Option<ByteRange> {
        let spec = value.trim().strip_prefix("bytes=")?.trim();
        if spec.contains(',') {
            return None;
        }
        let (a, b) = spec.split_once('-')?;
        let (a, b) = (a.trim(), b.trim());
        if a.is_empty() {
            return b.parse().ok().filter(|n| *n > 0).map(ByteRange::Suffix);
        }
        let start = a.parse().ok()?;
        if b.is_empty() {
            return Some(ByteRange::From(start, None));
        }
        let end = b.parse().ok()?;
        (end >= start).then_some(ByteRange::From(start, Some(end)))
    }

    /// Inclusive bounds within a blob of `size`, or 416 if unsatisfiable.
    pub fn resolve(self, size: u64) -> Result<(u64, u64), Error> {
        match self {
            ByteRange::From(start, _) if start >= size => Err(Error::RangeInvalid { size }),
            ByteRange::From(start, end) => Ok((start, end.unwrap_or(u64::MAX).min(size - 1))),
            ByteRange::Suffix(_) if size == 0 => Err(Error::RangeInvalid { size }),
            ByteRange::Suffix(n) => Ok((size - n.min(size), size - 1)),
        }
    }
}

fn now_ms() -> u64 {
    crate::manifests::now_ms()
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

    /// The size of a stored blob.
    pub fn stored_size(&self, digest: &Digest) -> Option<u64> {
        self.index
            .lock()
            .expect("index lock poisoned")
            .get(digest)
            .map(|m| m.size)
    }

    /// The size of a blob being downloaded, once upstream said it.
    pub fn downloading_size(&self, digest: &Digest) -> Option<u64> {
        let downloads = self.downloads.lock().expect("downloads lock poisoned");
        downloads.get(digest).and_then(|d| d.progress.borrow().size)
    }

    fn scan(&self) -> std::io::Result<()> {
        let mut found = 0u64;
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
                            let size = meta.len();
                            self.total.fetch_add(size, Ordering::Relaxed);
                            found += size;
                            let meta = BlobMeta {
                                size,
                                last_access: AtomicU64::new(now_ms()),
                                readers: AtomicUsize::new(0),
                                verified: AtomicBool::new(false),
                            };
                            self.index
                                .lock()
                                .expect("index lock poisoned")
                                .insert(digest, Arc::new(meta));
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
            bytes = found,
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

    /// Whether the store has `digest` (verified).
    pub async fn contains(self: &Arc<Self>, digest: &Digest) -> bool {
        self.stored(digest).await.is_some()
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

    /// Joins the download of `digest`, or starts it (fetching from `name` upstream). Returns
    /// once upstream's headers arrived, with the body following the download.
    pub async fn fetch(
        self: &Arc<Self>,
        upstream: &Arc<Upstream>,
        name: &RepoName,
        digest: &Digest,
        range: Option<ByteRange>,
    ) -> Result<BlobBody, Error> {
        let download = self.download(upstream, name, digest)?;
        let mut rx = download.progress.subscribe();
        // Wait for upstream's headers (or failure).
        let progress = rx
            .wait_for(|p| p.started || p.outcome.is_some())
            .await
            .map_err(|_| Error::Storage("download vanished".into()))?
            .clone();
        if let Some(Err(e)) = progress.outcome {
            return Err(e);
        }
        if let Some(range) = range {
            // A range is served from the verified file: wait for the end of the download.
            let done = rx
                .wait_for(|p| p.outcome.is_some())
                .await
                .map_err(|_| Error::Storage("download vanished".into()))?
                .clone();
            done.outcome.unwrap_or(Ok(()))?;
            return match self.open_stored(digest, Some(range)).await? {
                Some(mut body) => {
                    body.source = Source::Miss;
                    Ok(body)
                }
                None => Err(Error::BlobUnknown),
            };
        }
        let file = match tokio::fs::File::open(&download.temp).await {
            Ok(f) => f,
            // Already renamed into the store: serve it from there.
            Err(_) => {
                return match self.open_stored(digest, None).await? {
                    Some(mut body) => {
                        body.source = Source::Miss;
                        Ok(body)
                    }
                    None => Err(Error::BlobUnknown),
                };
            }
        };
        let stream = follow(file, rx);
        Ok(BlobBody {
            size: progress.size,
            range: None,
            source: Source::Miss,
            stream: Box::pin(stream),
        })
    }

    fn download(
        self: &Arc<Self>,
        upstream: &Arc<Upstream>,
        name: &RepoName,
        digest: &Digest,
    ) -> Result<Arc<Download>, Error> {
        let mut downloads = self.downloads.lock().expect("downloads lock poisoned");
        if let Some(d) = downloads.get(digest) {
            return Ok(Arc::clone(d));
        }
        let temp = self.layout.temp_file()?;
        let (file, temp_path) = temp.into_parts();
        let (progress, _) = watch::channel(Progress::default());
        let download = Arc::new(Download {
            temp: temp_path.to_path_buf(),
            progress,
        });
        downloads.insert(digest.clone(), Arc::clone(&download));
        let (store, upstream, name, digest, d) = (
            Arc::clone(self),
            Arc::clone(upstream),
            name.clone(),
            digest.clone(),
            Arc::clone(&download),
        );
        tokio::spawn(async move {
            let outcome = store
                .run_download(
                    &upstream,
                    &name,
                    &digest,
                    &d,
                    tokio::fs::File::from_std(file),
                    temp_path,
                )
                .await;
            if let Err(e) = &outcome {
                tracing::warn!(%digest, repo = %name, error = %e, "blob download failed; nothing stored");
            }
            store
                .downloads
                .lock()
                .expect("downloads lock poisoned")
                .remove(&digest);
            d.progress.send_modify(|p| p.outcome = Some(outcome));
        });
        Ok(download)
    }

    async fn run_download(
        self: &Arc<Self>,
        upstream: &Upstream,
        name: &RepoName,
        digest: &Digest,
        download: &Download,
        mut file: tokio::fs::File,
        temp: tempfile::TempPath,
    ) -> Result<(), Error> {
        let response = upstream
            .get_blob(name, digest, None)
            .await
            .map_err(Error::blob)?;
        let size = response
            .headers()
            .get(reqwest::header::CONTENT_LENGTH)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.parse::<u64>().ok());
        download.progress.send_modify(|p| {
            p.size = size;
            p.started = true;
        });
        let mut verifier = Verifier::new(digest.algorithm());
        let mut written = 0u64;
        let mut body = response.bytes_stream();
        while let Some(chunk) = body.next().await {
            let chunk = chunk.map_err(|e| {
                Error::Upstream(crate::upstream::Error::Unreachable(format!(
                    "blob body: {e}"
                )))
            })?;
            file.write_all(&chunk).await?;
            // tokio's File writes in the background: flush so followers can read what we publish.
            file.flush().await?;
            verifier.update(&chunk);
            written += chunk.len() as u64;
            Counters::add(&upstream.counters.blob_bytes_fetched, chunk.len() as u64);
            download.progress.send_modify(|p| p.written = written);
        }
        file.flush().await?;
        if size.is_some_and(|s| s != written) {
            return Err(Error::Upstream(crate::upstream::Error::BadResponse(
                format!(
                    "blob truncated at {written} of {} bytes",
                    size.unwrap_or_default()
                ),
            )));
        }
        let got = verifier.finish();
        if got != *digest {
            return Err(Error::Upstream(crate::upstream::Error::BadResponse(
                format!("blob content has digest {got}, not {digest}"),
            )));
        }
        file.sync_all().await?;
        drop(file);
        let path = self.path(digest);
        let parent = path.parent().map(Path::to_path_buf);
        tokio::task::spawn_blocking(move || -> std::io::Result<()> {
            if let Some(parent) = parent {
                std::fs::create_dir_all(parent)?;
            }
            temp.persist(&path).map_err(|e| e.error)
        })
        .await
        .map_err(|e| Error::Storage(e.to_string()))??;
        let meta = BlobMeta {
            size: written,
            last_access: AtomicU64::new(now_ms()),
            readers: AtomicUsize::new(0),
            verified: AtomicBool::new(true),
        };
        let previous = self
            .index
            .lock()
            .expect("index lock poisoned")
            .insert(digest.clone(), Arc::new(meta));
        if previous.is_none() {
            self.total.fetch_add(written, Ordering::Relaxed);
        }
        if self.total_bytes() as f64 > self.limits.max as f64 * self.limits.high {
            self.evict.notify_one();
        }
        Ok(())
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

/// Streams a download's temp file as it grows. The final byte waits for verification; a failed
/// download ends the stream with an error, which aborts the client's transfer.
fn follow(
    file: tokio::fs::File,
    rx: watch::Receiver<Progress>,
) -> impl Stream<Item = std::io::Result<Bytes>> + Send {
    futures_util::stream::unfold(
        (file, rx, 0u64, false),
        |(mut file, mut rx, sent, finished)| async move {
            if finished {
                return None;
            }
            loop {
                let progress = rx.borrow_and_update().clone();
                let limit = match &progress.outcome {
                    Some(Err(e)) => {
                        return Some((
                            Err(std::io::Error::other(e.to_string())),
                            (file, rx, sent, true),
                        ));
                    }
                    Some(Ok(())) => progress.written,
                    None => progress.written.saturating_sub(1),
                };
                if sent < limit {
                    let want = usize::try_from(limit - sent)
                        .unwrap_or(usize::MAX)
                        .min(CHUNK);
                    let mut buf = vec![0u8; want];
                    return match file.read_exact(&mut buf).await {
                        Ok(_) => {
                            Some((Ok(Bytes::from(buf)), (file, rx, sent + want as u64, false)))
                        }
                        Err(e) => Some((Err(e), (file, rx, sent, true))),
                    };
                }
                if progress.outcome.is_some() {
                    return None;
                }
                if rx.changed().await.is_err() {
                    // The download task is gone without an outcome: treat as failure.
                    return Some((
                        Err(std::io::Error::other("blob download stopped")),
                        (file, rx, sent, true),
                    ));
                }
            }
        },
    )
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_and_resolves_ranges() {
        let cases = [
            ("bytes=0-9", Some(ByteRange::From(0, Some(9)))),
            ("bytes=5-", Some(ByteRange::From(5, None))),
            ("bytes=-3", Some(ByteRange::Suffix(3))),
            ("bytes=9-5", None),
            ("bytes=0-1,3-4", None),
            ("items=0-1", None),
            ("bytes=-0", None),
            ("bytes=a-b", None),
        ];
        for (input, want) in cases {
            assert_eq!(ByteRange::parse(input), want, "{input}");
        }
        assert_eq!(ByteRange::From(0, Some(99)).resolve(10).unwrap(), (0, 9));
        assert_eq!(ByteRange::Suffix(3).resolve(10).unwrap(), (7, 9));
        assert_eq!(ByteRange::Suffix(30).resolve(10).unwrap(), (0, 9));
        assert!(matches!(
            ByteRange::From(10, None).resolve(10),
            Err(Error::RangeInvalid { size: 10 })
        ));
    }
}
