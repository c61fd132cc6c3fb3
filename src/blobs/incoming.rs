//! Blobs being written: one [`Incoming`] per digest, fed by whoever fetches it, and the
//! streams that follow it.
//!
//! The feeder only hands chunks over: each goes to a window of recent bytes in memory and to a
//! spool thread that appends it to the temp file and hashes it. A follower that keeps up is
//! served from the window (no read back from disk); one that falls behind reads the temp file.
//!
//! What is received never goes past the blob's size (once known), and a follower never receives
//! the blob's last byte before the digest verified. The file is renamed into the store only
//! once it did.

use super::{BlobBody, BlobMeta, BlobStore, CHUNK};
use crate::error::Error;
use crate::metrics::Outcome;
use crate::registry::{ByteRange, Digest, RepoName, Verifier};
use bytes::Bytes;
use futures_util::Stream;
use parking_lot::Mutex;
use std::collections::VecDeque;
use std::io::{Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use tokio::sync::{mpsc, watch};

/// How many of the most recent bytes a download keeps in memory for its followers. A follower
/// further behind (a slow client) reads the temp file instead of holding memory.
const WINDOW: u64 = 8 * 1024 * 1024;

/// How many chunks may wait for the spool thread before the download waits for the disk.
const SPOOL_QUEUE: usize = 32;

/// Progress of one download, published to its followers.
#[derive(Debug, Clone, Default)]
pub(super) struct Progress {
    /// The blob's size, once upstream said it.
    size: Option<u64>,
    /// Upstream answered with a body.
    started: bool,
    /// Bytes received so far (never more than `size`): the most recent are in the window.
    received: u64,
    /// Bytes in the temp file so far (never more than `received`).
    written: u64,
    /// Set when the download ended.
    outcome: Option<Result<(), Error>>,
}

impl Progress {
    /// How many bytes from the start a follower may send now: what is received, less the
    /// blob's last byte until the download verified.
    fn sendable(&self) -> u64 {
        match (&self.outcome, self.size) {
            (Some(Ok(())), _) => self.received,
            (_, Some(size)) => self.received.min(size.saturating_sub(1)),
            (_, None) => self.received.saturating_sub(1),
        }
    }
}

/// Who started a download: the upstream (by identity) and the repository it is fetched from.
/// The store keeps it for whoever decides who may join; it does not read it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Origin {
    /// The fetching upstream client's address (names could be configured alike).
    pub upstream: usize,
    /// The repository the blob is fetched from.
    pub repository: RepoName,
}

/// A blob being written, as its followers see it.
#[derive(Debug)]
pub struct Download {
    temp: PathBuf,
    origin: Origin,
    /// Fetched with credentials, or from a source (the bucket, another replica) that was.
    private: AtomicBool,
    progress: watch::Sender<Progress>,
    /// The most recent bytes received.
    recent: Mutex<Recent>,
}

impl Download {
    /// Who started it.
    pub fn origin(&self) -> &Origin {
        &self.origin
    }

    /// Whether any of its bytes were fetched with credentials.
    pub fn is_private(&self) -> bool {
        self.private.load(Ordering::Relaxed)
    }
}

/// Why a blob was not stored.
#[derive(Debug, thiserror::Error)]
pub enum WriteError {
    /// More bytes than the blob's size.
    #[error("blob body is longer than its announced size")]
    TooLong,
    /// Larger than the whole store may hold.
    #[error("blob is larger than cache_max_disk; not fetched")]
    TooLarge,
    /// Fewer bytes than the blob's size.
    #[error("blob truncated at {written} of {size} bytes")]
    Truncated {
        /// Bytes received.
        written: u64,
        /// The blob's size.
        size: u64,
    },
    /// The bytes have another digest.
    #[error("blob content has digest {got}, not {want}")]
    Mismatch {
        /// What the bytes hash to.
        got: Digest,
        /// The digest asked for.
        want: Digest,
    },
    /// The disk failed.
    #[error(transparent)]
    Storage(#[from] Error),
}

/// What asking for a download found.
#[derive(Debug)]
pub enum Begun {
    /// One is under way: follow it (if its origin may be joined).
    Running(Arc<Download>),
    /// None was: this caller feeds the new one, and ends it with [`BlobStore::end`].
    Started(Incoming),
    /// None was, and the store holds it (stored by one that ended after the caller looked, or
    /// asked for again): serve the stored blob.
    Stored,
}

/// The feeding end of a download: what was received, and the spool thread that writes and
/// hashes it.
#[derive(Debug)]
pub struct Incoming {
    store: Arc<BlobStore>,
    digest: Digest,
    download: Arc<Download>,
    temp: tempfile::TempPath,
    spool: Spool,
    received: u64,
    /// The blob's size, once known: nothing is received past it.
    size: Option<u64>,
}

/// The last [`WINDOW`] bytes received (at least the last chunk), in order.
#[derive(Debug, Default)]
struct Recent {
    /// Offset of the first byte held.
    start: u64,
    len: u64,
    chunks: VecDeque<Bytes>,
}

impl Recent {
    fn push(&mut self, chunk: Bytes) {
        self.len += chunk.len() as u64;
        self.chunks.push_back(chunk);
        while self.len > WINDOW && self.chunks.len() > 1 {
            let Some(front) = self.chunks.pop_front() else {
                break;
            };
            self.start += front.len() as u64;
            self.len -= front.len() as u64;
        }
    }

    /// The held bytes from `offset`, up to `limit` (exclusive) and the end of their chunk; `None`
    /// when `offset` is no longer (or not yet) held.
    fn read(&self, offset: u64, limit: u64) -> Option<Bytes> {
        let mut at = self.start;
        if offset < at {
            return None;
        }
        for chunk in &self.chunks {
            let end = at + chunk.len() as u64;
            if offset < end {
                let from = usize::try_from(offset - at).ok()?;
                let to = usize::try_from(limit.min(end).checked_sub(at)?).ok()?;
                return (from < to).then(|| chunk.slice(from..to));
            }
            at = end;
        }
        None
    }
}

impl BlobStore {
    /// The size of a blob being downloaded, once its feeder said it.
    pub fn downloading_size(&self, digest: &Digest) -> Option<u64> {
        let downloads = self.downloads.lock();
        downloads.get(digest).and_then(|d| d.progress.borrow().size)
    }

    /// Whether this store holds `digest` (stored, or downloading) as fetched with credentials.
    pub fn held_private(&self, digest: &Digest) -> bool {
        if let Some(d) = self.downloads.lock().get(digest) {
            return d.is_private();
        }
        self.is_private(digest)
    }

    /// The download of `digest` under way, or a new one for the caller to feed (its temp file
    /// created). `private`: the new one is fetched with credentials.
    pub async fn begin(
        self: &Arc<Self>,
        digest: &Digest,
        origin: Origin,
        private: bool,
    ) -> Result<Begun, Error> {
        if let Some(d) = self.downloads.lock().get(digest) {
            return Ok(Begun::Running(Arc::clone(d)));
        }
        // A download stores its blob before it ends, so one that ended since the caller looked
        // in the store is found there (looked at after the downloads, never before).
        if self.contains(digest) {
            return Ok(Begun::Stored);
        }
        // Creating a file is blocking I/O: do it off the async workers and outside the lock.
        let layout = self.layout.clone();
        let temp = tokio::task::spawn_blocking(move || layout.temp_file()).await??;
        let (file, temp) = temp.into_parts();
        let download = {
            let mut downloads = self.downloads.lock();
            let begun = match downloads.get(digest) {
                Some(d) => Some(Begun::Running(Arc::clone(d))),
                None => self.contains(digest).then_some(Begun::Stored),
            };
            if let Some(begun) = begun {
                drop(downloads);
                tokio::task::spawn_blocking(move || drop((file, temp)));
                return Ok(begun);
            }
            let (progress, _) = watch::channel(Progress::default());
            let download = Arc::new(Download {
                temp: temp.to_path_buf(),
                origin,
                private: AtomicBool::new(private),
                progress,
                recent: Mutex::default(),
            });
            downloads.insert(digest.clone(), Arc::clone(&download));
            download
        };
        let spool = Spool::start(
            file,
            digest.algorithm(),
            Arc::clone(self),
            Arc::clone(&download),
        );
        Ok(Begun::Started(Incoming {
            store: Arc::clone(self),
            digest: digest.clone(),
            download,
            temp,
            spool,
            received: 0,
            size: None,
        }))
    }

    /// Ends the download of `digest`: it is no longer joined, and its followers learn the
    /// outcome (on success, the blob is in the store).
    pub fn end(&self, digest: &Digest, download: &Download, outcome: Result<(), Error>) {
        self.downloads.lock().remove(digest);
        download.progress.send_modify(|p| p.outcome = Some(outcome));
    }

    /// For another replica (cluster-internal): the blob from this store, or following this
    /// replica's download of it; `None` when it has neither.
    pub async fn local_body(
        self: &Arc<Self>,
        digest: &Digest,
        range: Option<ByteRange>,
    ) -> Result<Option<BlobBody>, Error> {
        let running = self.downloads.lock().get(digest).cloned();
        match running {
            Some(download) => self.follow(download, digest, range).await,
            None => self.open_stored(digest, range).await,
        }
    }

    /// A body following `download` once its size is known (or it failed); `None` when the
    /// stored result was gone when opened.
    pub async fn follow(
        self: &Arc<Self>,
        download: Arc<Download>,
        digest: &Digest,
        range: Option<ByteRange>,
    ) -> Result<Option<BlobBody>, Error> {
        let mut rx = download.progress.subscribe();
        // Wait for upstream's headers (or failure).
        let progress = rx
            .wait_for(|p| p.started || p.outcome.is_some())
            .await
            .map_err(|_| Error::storage("download vanished"))?
            .clone();
        if let Some(Err(e)) = progress.outcome {
            return Err(e);
        }
        if progress.size == Some(0) {
            // Nothing to hold back in an empty body: answer only once it verified.
            return self.when_stored(&mut rx, digest, range).await;
        }
        let bounds = match (range, progress.size) {
            (Some(range), Some(size)) => {
                Some(range.resolve(size).ok_or(Error::RangeInvalid { size })?)
            }
            // No size to resolve the range against: serve it from the stored file.
            (Some(_), None) => return self.when_stored(&mut rx, digest, range).await,
            (None, _) => None,
        };
        let temp = download.temp.clone();
        let opened = tokio::task::spawn_blocking(move || std::fs::File::open(temp)).await?;
        let file = match opened {
            Ok(f) => Arc::new(f),
            // Already renamed into the store (the index may not know it yet): serve it from
            // there once the download has ended.
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                return self.when_stored(&mut rx, digest, range).await;
            }
            Err(e) => return Err(e.into()),
        };
        let (start, end) = match bounds {
            Some((start, end)) => (start, Some(end + 1)),
            None => (0, None),
        };
        Ok(Some(BlobBody {
            size: progress.size,
            range: bounds,
            source: Outcome::Miss,
            stream: Box::pin(follow(download, file, rx, start, end)),
        }))
    }

    /// Waits for the download to end, then serves the stored blob (or the download's error);
    /// `None` when it was gone from the store by then.
    async fn when_stored(
        self: &Arc<Self>,
        rx: &mut watch::Receiver<Progress>,
        digest: &Digest,
        range: Option<ByteRange>,
    ) -> Result<Option<BlobBody>, Error> {
        let done = rx
            .wait_for(|p| p.outcome.is_some())
            .await
            .map_err(|_| Error::storage("download vanished"))?
            .clone();
        done.outcome.unwrap_or(Ok(()))?;
        // Still reported as a miss: this request's download stored it.
        Ok(self.open_stored(digest, range).await?.map(|mut body| {
            body.source = Outcome::Miss;
            body
        }))
    }
}

impl Incoming {
    /// The download its followers follow.
    pub fn download(&self) -> &Arc<Download> {
        &self.download
    }

    /// Bytes received so far.
    pub fn received(&self) -> u64 {
        self.received
    }

    /// The blob's size, once known.
    pub fn size(&self) -> Option<u64> {
        self.size
    }

    /// Records that some of the bytes were fetched with credentials.
    pub fn mark_private(&self) {
        self.download.private.store(true, Ordering::Relaxed);
    }

    /// The bytes start to arrive, for a blob of `size` if known: followers may start. A size
    /// learned later (a resume's `Content-Range`) is given again; it must agree.
    pub fn announce(&mut self, size: Option<u64>) -> Result<(), WriteError> {
        if size.is_some_and(|s| s > self.store.limits.max) {
            return Err(WriteError::TooLarge);
        }
        match (self.size, size) {
            (Some(known), Some(new)) if known != new => return Err(WriteError::TooLong),
            (None, Some(new)) if new < self.received => return Err(WriteError::TooLong),
            _ => {}
        }
        self.size = self.size.or(size);
        let size = self.size;
        self.download.progress.send_modify(|p| {
            p.size = size;
            p.started = true;
        });
        Ok(())
    }

    /// Appends `chunk` (to the window, the temp file and the hash).
    pub async fn push(&mut self, chunk: Bytes) -> Result<(), WriteError> {
        let end = self.received.saturating_add(chunk.len() as u64);
        if self.size.is_some_and(|size| end > size) || end > self.store.limits.max {
            return Err(WriteError::TooLong);
        }
        self.download.recent.lock().push(chunk.clone());
        self.download.progress.send_modify(|p| p.received = end);
        self.received = end;
        if self.spool.chunks.send(chunk).await.is_err() {
            // The spool thread stopped on an error: that error is the download's.
            return Err(self.spool.failure().await.into());
        }
        Ok(())
    }

    /// Verifies a complete blob and moves it into the store; whether it is stored as private
    /// (fetched with credentials, and never also without).
    pub async fn commit(self) -> Result<bool, WriteError> {
        let Incoming {
            store,
            digest,
            download,
            temp,
            spool,
            received: written,
            size,
        } = self;
        if let Some(size) = size
            && size != written
        {
            return Err(WriteError::Truncated { written, size });
        }
        let (file, got) = spool.finish().await?;
        if got != digest {
            return Err(WriteError::Mismatch { got, want: digest });
        }
        // Content also fetched without credentials is public, whoever fetches it again.
        let private =
            download.is_private() && store.index.lock().get(&digest).is_none_or(|m| m.private);
        let path = store.path(&digest);
        let marker = store.private_marker(&digest);
        let parent = path.parent().map(Path::to_path_buf);
        tokio::task::spawn_blocking(move || -> std::io::Result<()> {
            file.sync_all()?;
            drop(file);
            if let Some(parent) = parent {
                std::fs::create_dir_all(parent)?;
            }
            // The marker goes first: a crash between the two leaves a private blob marked.
            if private {
                std::fs::write(&marker, b"")?;
            } else {
                let _ = std::fs::remove_file(&marker);
            }
            temp.persist(&path).map_err(|e| e.error)
        })
        .await
        .map_err(Error::from)?
        .map_err(Error::from)?;
        let previous = store.index.lock().insert(
            digest.clone(),
            Arc::new(BlobMeta::new(written, true, private)),
        );
        if previous.is_none() {
            store.total.fetch_add(written, Ordering::Relaxed);
        }
        if store.needs_eviction() {
            store.evict.notify_one();
        }
        Ok(private)
    }
}

/// The thread that appends a download's chunks to its temp file and hashes them: the download's
/// task only hands chunks over, and hashing (a third of a cold pull's CPU) runs beside the
/// receiving. At most [`SPOOL_QUEUE`] chunks wait for it, so a slow disk holds the download back
/// rather than filling memory. A full disk is answered once per download by evicting enough for
/// the rest of the blob and writing the chunk again.
struct Spool {
    chunks: mpsc::Sender<Bytes>,
    done: tokio::sync::oneshot::Receiver<Result<(std::fs::File, Digest), Error>>,
}

impl Spool {
    fn start(
        mut file: std::fs::File,
        algorithm: crate::registry::Algorithm,
        store: Arc<BlobStore>,
        download: Arc<Download>,
    ) -> Spool {
        let (chunks, mut rx) = mpsc::channel::<Bytes>(SPOOL_QUEUE);
        let (finished, done) = tokio::sync::oneshot::channel();
        // A thread of its own, not one of tokio's blocking pool: a download lives as long as its
        // transfer, and many at once must not take the threads every file open waits for.
        let spool = move || -> Result<(std::fs::File, Digest), Error> {
            let mut verifier = Verifier::new(algorithm);
            let mut written = 0u64;
            let mut evicted_for_space = false;
            while let Some(chunk) = rx.blocking_recv() {
                match file.write_all(&chunk) {
                    Err(e) if e.kind() == std::io::ErrorKind::StorageFull && !evicted_for_space => {
                        evicted_for_space = true;
                        let size = download.progress.borrow().size;
                        let needed = size.map_or(chunk.len() as u64, |s| s.saturating_sub(written));
                        tracing::warn!(
                            needed,
                            "disk full while downloading a blob; evicting and retrying"
                        );
                        store.evict_if_needed(needed.max(1));
                        // Drop whatever part of the chunk reached the file, then write it again.
                        file.set_len(written)?;
                        file.seek(SeekFrom::Start(written))?;
                        file.write_all(&chunk)?;
                    }
                    written_chunk => written_chunk?,
                }
                verifier.update(&chunk);
                written += chunk.len() as u64;
                download.progress.send_modify(|p| p.written = written);
            }
            Ok((file, verifier.finish()))
        };
        let started = std::thread::Builder::new()
            .name("pullthrough-spool".into())
            .stack_size(256 * 1024)
            .spawn(move || {
                let _ = finished.send(spool());
            });
        if let Err(e) = started {
            tracing::error!(error = %e, "cannot start a blob spool thread");
        }
        Spool { chunks, done }
    }

    /// Why the thread stopped before it was told to finish.
    async fn failure(&mut self) -> Error {
        match (&mut self.done).await {
            Ok(Err(e)) => e,
            Ok(Ok(_)) | Err(_) => Error::storage("blob spool stopped"),
        }
    }

    /// The temp file, with everything given written, and its digest.
    async fn finish(self) -> Result<(std::fs::File, Digest), Error> {
        let Spool { chunks, done } = self;
        drop(chunks);
        done.await
            .map_err(|_| Error::storage("blob spool stopped"))?
    }
}

impl std::fmt::Debug for Spool {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Spool")
    }
}

/// Streams a download from `start` as it grows, up to `end` (exclusive; the whole blob when
/// `None`): from its window of recent bytes while they are held, else from the temp file. The
/// blob's last byte waits for verification; a failed download ends the stream with an error,
/// which aborts the client's transfer.
fn follow(
    download: Arc<Download>,
    file: Arc<std::fs::File>,
    rx: watch::Receiver<Progress>,
    start: u64,
    end: Option<u64>,
) -> impl Stream<Item = std::io::Result<Bytes>> + Send + use<> {
    futures_util::stream::unfold((rx, start, false), move |(mut rx, sent, finished)| {
        let (download, file) = (Arc::clone(&download), Arc::clone(&file));
        async move {
            if finished || end.is_some_and(|end| sent >= end) {
                return None;
            }
            loop {
                let progress = rx.borrow_and_update().clone();
                if let Some(Err(e)) = &progress.outcome {
                    let e = std::io::Error::other(e.to_string());
                    return Some((Err(e), (rx, sent, true)));
                }
                let limit = end.map_or(progress.sendable(), |end| end.min(progress.sendable()));
                if sent < limit {
                    if let Some(bytes) = download.recent.lock().read(sent, limit) {
                        let sent = sent + bytes.len() as u64;
                        return Some((Ok(bytes), (rx, sent, false)));
                    }
                    let on_disk = limit.min(progress.written);
                    if sent < on_disk {
                        return Some(match read_at(file, sent, on_disk).await {
                            Ok(bytes) => {
                                let sent = sent + bytes.len() as u64;
                                (Ok(bytes), (rx, sent, false))
                            }
                            Err(e) => (Err(e), (rx, sent, true)),
                        });
                    }
                }
                if progress.outcome.is_some() && sent >= limit {
                    return None;
                }
                if rx.changed().await.is_err() {
                    // The download task is gone without an outcome: treat as failure.
                    let e = std::io::Error::other("blob download stopped");
                    return Some((Err(e), (rx, sent, true)));
                }
            }
        }
    })
}

/// Reads up to [`CHUNK`] bytes of `file` from `offset` to `limit` (exclusive), on a blocking
/// thread, at that offset (`pread`) and straight into the chunk handed on: no file position to
/// keep, and no copy through the buffer of a `tokio::fs::File`.
async fn read_at(file: Arc<std::fs::File>, offset: u64, limit: u64) -> std::io::Result<Bytes> {
    use std::os::unix::fs::FileExt as _;
    let want = usize::try_from(limit.saturating_sub(offset))
        .unwrap_or(usize::MAX)
        .min(CHUNK);
    tokio::task::spawn_blocking(move || {
        let mut buf = vec![0u8; want];
        file.read_exact_at(&mut buf, offset)?;
        Ok(Bytes::from(buf))
    })
    .await
    .map_err(std::io::Error::other)?
}

#[cfg(test)]
mod tests {
    use super::super::tests::{collect, digest_of, origin, put, store};
    use super::*;
    use futures_util::StreamExt;

    async fn started(store: &Arc<BlobStore>, digest: &Digest) -> Incoming {
        match store.begin(digest, origin(), false).await.unwrap() {
            Begun::Started(incoming) => incoming,
            Begun::Running(_) => panic!("a download was already under way"),
            Begun::Stored => panic!("the blob was already stored"),
        }
    }

    #[tokio::test]
    async fn a_download_that_ended_after_the_caller_looked_is_found_stored() {
        let dir = tempfile::tempdir().unwrap();
        let store = store(dir.path(), 1 << 20);
        let bytes = b"stored as the caller looked";
        let digest = digest_of(bytes);
        // The caller found neither the blob nor its download...
        assert!(!store.contains(&digest));
        let mut incoming = started(&store, &digest).await;
        let download = Arc::clone(incoming.download());
        incoming.announce(Some(bytes.len() as u64)).unwrap();
        incoming.push(Bytes::from_static(bytes)).await.unwrap();
        assert!(!incoming.commit().await.unwrap());
        store.end(&digest, &download, Ok(()));
        // ... and begins once that download ended: no second download.
        assert!(matches!(
            store.begin(&digest, origin(), false).await.unwrap(),
            Begun::Stored
        ));
        assert_eq!(store.downloads(), 0);
        assert_eq!(store.count(), 1);
    }

    #[test]
    fn a_follower_may_send_all_but_the_last_byte_until_verified() {
        let progress = |size, received, outcome| Progress {
            size,
            started: true,
            received,
            written: received,
            outcome,
        };
        let cases = [
            (progress(Some(10), 4, None), 4),
            (progress(Some(10), 10, None), 9),
            (progress(None, 10, None), 9),
            (progress(None, 0, None), 0),
            (progress(Some(10), 10, Some(Ok(()))), 10),
            (progress(Some(10), 10, Some(Err(Error::BlobUnknown))), 9),
        ];
        for (progress, want) in cases {
            assert_eq!(progress.sendable(), want, "{progress:?}");
        }
    }

    #[test]
    fn the_window_holds_the_recent_bytes_in_order() {
        let mut recent = Recent::default();
        recent.push(Bytes::from_static(b"0123"));
        recent.push(Bytes::from_static(b"4567"));
        assert_eq!(recent.read(0, 8).as_deref(), Some(&b"0123"[..]));
        assert_eq!(recent.read(2, 8).as_deref(), Some(&b"23"[..]));
        assert_eq!(recent.read(5, 7).as_deref(), Some(&b"56"[..]));
        assert_eq!(recent.read(8, 9), None, "not received yet");
        assert_eq!(recent.read(4, 4), None, "nothing up to the limit");
        // Past the window, the oldest chunks go (never the last one).
        let big = Bytes::from(vec![7u8; WINDOW as usize]);
        recent.push(big);
        assert_eq!(recent.read(0, 8), None, "no longer held");
        assert_eq!(recent.read(8, 10).as_deref(), Some(&[7u8, 7][..]));
    }

    #[tokio::test]
    async fn followers_stream_a_download_and_get_its_last_byte_once_it_verified() {
        let dir = tempfile::tempdir().unwrap();
        let store = store(dir.path(), 1 << 20);
        let bytes = b"hello, followers".to_vec();
        let digest = digest_of(&bytes);
        let mut incoming = started(&store, &digest).await;
        let download = Arc::clone(incoming.download());
        assert!(matches!(
            store.begin(&digest, origin(), false).await.unwrap(),
            Begun::Running(_)
        ));
        incoming.announce(Some(bytes.len() as u64)).unwrap();
        assert_eq!(store.downloading_size(&digest), Some(16));
        let whole = store.follow(Arc::clone(&download), &digest, None).await;
        let mut whole = whole.unwrap().unwrap().stream;
        let range = ByteRange::parse("bytes=7-");
        let tail = store.follow(Arc::clone(&download), &digest, range).await;
        let tail = tail.unwrap().unwrap();
        assert_eq!(tail.range, Some((7, 15)));
        incoming.push(Bytes::copy_from_slice(&bytes)).await.unwrap();
        // Everything but the last byte, before the digest is known.
        let first = whole.next().await.unwrap().unwrap();
        assert_eq!(&first[..], &bytes[..15]);
        assert!(!incoming.commit().await.unwrap());
        store.end(&digest, &download, Ok(()));
        let mut rest = Vec::new();
        while let Some(chunk) = whole.next().await {
            rest.extend_from_slice(&chunk.unwrap());
        }
        assert_eq!(rest, b"s");
        assert_eq!(collect(tail).await.unwrap(), b"followers");
        assert_eq!(store.downloads(), 0);
        assert!(store.contains(&digest));
    }

    #[tokio::test]
    async fn a_follower_behind_the_window_reads_the_temp_file_as_it_grows() {
        let dir = tempfile::tempdir().unwrap();
        let store = store(dir.path(), 64 << 20);
        let bytes: Vec<u8> = (0..4 * WINDOW as usize).map(|i| (i % 251) as u8).collect();
        let digest = digest_of(&bytes);
        let mut incoming = started(&store, &digest).await;
        let download = Arc::clone(incoming.download());
        incoming.announce(Some(bytes.len() as u64)).unwrap();
        let follower = store.follow(Arc::clone(&download), &digest, None).await;
        let mut follower = follower.unwrap().unwrap().stream;
        // A range that starts and ends in the first window's worth, at odd offsets.
        let (from, to) = (WINDOW as usize + 12_345, 2 * WINDOW as usize + 6_789);
        let range = ByteRange::parse(&format!("bytes={from}-{to}"));
        let ranged = store.follow(Arc::clone(&download), &digest, range).await;
        let mut ranged = ranged.unwrap().unwrap().stream;
        // All received (queued for the spool thread in 32 chunks) before the followers read:
        // their first bytes are no longer in the window, so they read them from the temp file
        // as the spool thread writes them.
        for chunk in bytes.chunks(1 << 20) {
            incoming.push(Bytes::copy_from_slice(chunk)).await.unwrap();
        }
        async fn read(
            stream: &mut std::pin::Pin<Box<dyn Stream<Item = std::io::Result<Bytes>> + Send>>,
            len: usize,
        ) -> Vec<u8> {
            let mut got = Vec::new();
            while got.len() < len {
                let next = tokio::time::timeout(std::time::Duration::from_secs(10), stream.next());
                got.extend_from_slice(&next.await.expect("woken").unwrap().unwrap());
            }
            got
        }
        let got = read(&mut ranged, to + 1 - from).await;
        assert!(got == bytes[from..=to], "the range's bytes, in order");
        assert!(ranged.next().await.is_none(), "nothing past the range");
        let got = read(&mut follower, bytes.len() - 1).await;
        assert!(got == bytes[..bytes.len() - 1], "the bytes, in order");
        assert!(!incoming.commit().await.unwrap());
        store.end(&digest, &download, Ok(()));
        let last = follower.next().await.unwrap().unwrap();
        assert_eq!(last.as_ref(), &bytes[bytes.len() - 1..]);
        assert!(follower.next().await.is_none());
    }

    #[tokio::test]
    async fn bytes_that_do_not_match_their_digest_are_never_stored_or_served_whole() {
        let dir = tempfile::tempdir().unwrap();
        let store = store(dir.path(), 1 << 20);
        let digest = digest_of(b"the real bytes");
        let mut incoming = started(&store, &digest).await;
        let download = Arc::clone(incoming.download());
        incoming.announce(Some(14)).unwrap();
        let follower = store.follow(Arc::clone(&download), &digest, None).await;
        let follower = follower.unwrap().unwrap();
        incoming
            .push(Bytes::from_static(b"the fake bytes"))
            .await
            .unwrap();
        let e = incoming.commit().await.unwrap_err();
        assert!(matches!(e, WriteError::Mismatch { .. }), "{e}");
        store.end(&digest, &download, Err(Error::BlobUnknown));
        let got = collect(follower).await;
        assert!(got.is_err(), "the follower's transfer is aborted");
        assert!(!store.contains(&digest));
        assert_eq!(store.count(), 0);
        assert!(
            std::fs::read_dir(dir.path().join("tmp"))
                .unwrap()
                .next()
                .is_none()
        );
    }

    #[tokio::test]
    async fn a_body_must_be_exactly_its_size() {
        let dir = tempfile::tempdir().unwrap();
        let store = store(dir.path(), 100);
        let digest = digest_of(b"0123456789");
        // Longer than announced: refused at the chunk that goes past it.
        let mut incoming = started(&store, &digest).await;
        incoming.announce(Some(10)).unwrap();
        incoming.push(Bytes::from_static(b"01234")).await.unwrap();
        let e = incoming.push(Bytes::from_static(b"567890")).await;
        assert!(matches!(e, Err(WriteError::TooLong)));
        drop(incoming);
        store.downloads.lock().clear();
        // Shorter: refused at commit.
        let mut incoming = started(&store, &digest).await;
        incoming.announce(Some(10)).unwrap();
        incoming.push(Bytes::from_static(b"01234")).await.unwrap();
        let e = incoming.commit().await.unwrap_err();
        assert!(
            matches!(
                e,
                WriteError::Truncated {
                    written: 5,
                    size: 10
                }
            ),
            "{e}"
        );
        store.downloads.lock().clear();
        // Larger than the store, announced or not.
        let mut incoming = started(&store, &digest).await;
        assert!(matches!(
            incoming.announce(Some(101)),
            Err(WriteError::TooLarge)
        ));
        incoming.announce(None).unwrap();
        let e = incoming.push(Bytes::from(vec![0u8; 101])).await;
        assert!(matches!(e, Err(WriteError::TooLong)));
        // A resume that claims another size.
        let mut incoming = {
            store.downloads.lock().clear();
            started(&store, &digest).await
        };
        incoming.announce(Some(10)).unwrap();
        assert!(matches!(
            incoming.announce(Some(11)),
            Err(WriteError::TooLong)
        ));
        assert!(incoming.announce(Some(10)).is_ok());
        assert_eq!(store.count(), 0);
    }

    #[tokio::test]
    async fn content_also_fetched_without_credentials_is_public() {
        let dir = tempfile::tempdir().unwrap();
        let store = store(dir.path(), 1 << 20);
        let digest = digest_of(b"shared");
        let mut incoming = match store.begin(&digest, origin(), true).await.unwrap() {
            Begun::Started(incoming) => incoming,
            Begun::Running(_) | Begun::Stored => unreachable!(),
        };
        let download = Arc::clone(incoming.download());
        assert!(store.held_private(&digest));
        incoming.announce(Some(6)).unwrap();
        incoming.push(Bytes::from_static(b"shared")).await.unwrap();
        assert!(incoming.commit().await.unwrap());
        store.end(&digest, &download, Ok(()));
        assert!(store.is_private(&digest));
        // Stored again without credentials: public from then on, across restarts.
        store.purge(&digest).await;
        assert_eq!(put(&store, b"shared").await, digest);
        assert!(!store.is_private(&digest));
        drop(store);
        let store = super::super::tests::store(dir.path(), 1 << 20);
        assert!(!store.is_private(&digest));
    }
}
