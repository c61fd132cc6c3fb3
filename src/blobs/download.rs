//! One upstream download per digest, and the streams that follow it.
//!
//! The download's task only receives: each chunk goes to a window of recent bytes in memory and
//! to a spool thread that appends it to the temp file and hashes it. A follower that keeps up is
//! served from the window (no read back from disk); one that falls behind reads the temp file.
//!
//! What is received never goes past the blob's size (upstream's `Content-Length`, or the total of
//! a resume's `Content-Range`), a resume must continue exactly where the body broke off, and a
//! follower never receives the blob's last byte before the digest verified.

use super::{BlobBody, BlobMeta, BlobStore, CHUNK};
use crate::cluster::{Claim, Cluster, Lock};
use crate::error::Error;
use crate::metrics::Outcome;
use crate::registry::{ByteRange, ContentRange};
use crate::registry::{Digest, RepoName, Verifier};
use crate::upstream::{Exchange, Upstream};
use bytes::Bytes;
use futures_util::{Stream, StreamExt};
use parking_lot::Mutex;
use std::collections::VecDeque;
use std::io::{Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use tokio::io::{AsyncReadExt, AsyncSeekExt};
use tokio::sync::{mpsc, watch};
use tracing::Instrument;

/// How often one download may resume after its upstream body broke off.
const MAX_RESUMES: u32 = 3;

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

#[derive(Debug)]
pub(super) struct Download {
    temp: PathBuf,
    /// The upstream (by identity) and repository the blob is fetched from: another may read
    /// the download only under the rule for stored blobs.
    origin: (usize, RepoName),
    /// Fetched with credentials, or from a source (the bucket, another replica) that was.
    pub(super) private: AtomicBool,
    /// Upstream showed the blob in the repository that started the download: a private
    /// source may be used without asking it.
    confirmed: AtomicBool,
    progress: watch::Sender<Progress>,
    /// The most recent bytes received.
    recent: Mutex<Recent>,
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

/// What a download has received, and the spool thread that writes and hashes it.
struct Writer {
    spool: Spool,
    received: u64,
    /// The blob's size, once known: nothing is received past it.
    size: Option<u64>,
    /// The most a blob of unknown size may take (`cache_max_disk`).
    max: u64,
}

/// What a download request found.
#[derive(Debug)]
pub enum Joined {
    /// A body following the download.
    Body(BlobBody),
    /// A download started for another repository is under way; joining it needs access to
    /// be confirmed first.
    OtherRepository,
}

impl BlobStore {
    /// The size of a blob being downloaded, once upstream said it.
    pub fn downloading_size(&self, digest: &Digest) -> Option<u64> {
        let downloads = self.downloads.lock();
        downloads.get(digest).and_then(|d| d.progress.borrow().size)
    }

    /// Joins the download of `digest`, or starts it (fetching from `name` upstream). A download
    /// under way for another repository is joined only when `shared_ok`. Returns once
    /// upstream's headers arrived, with the body following the download; a range is served
    /// as soon as its bytes are on disk.
    pub async fn fetch(
        self: &Arc<Self>,
        upstream: &Arc<Upstream>,
        name: &RepoName,
        digest: &Digest,
        range: Option<ByteRange>,
        shared_ok: bool,
    ) -> Result<Joined, Error> {
        // The blob a joined download stored can be evicted or purged before this request
        // opens it: then it is fetched again (once), never answered as unknown.
        for _ in 0..2 {
            if let Some(joined) = self
                .fetch_once(upstream, name, digest, range, shared_ok)
                .await?
            {
                return Ok(joined);
            }
        }
        // Removed from the store twice while being fetched: as before this retry, unknown.
        Err(Error::BlobUnknown)
    }

    /// [`fetch`](Self::fetch), once: `None` when the stored result was gone when opened.
    async fn fetch_once(
        self: &Arc<Self>,
        upstream: &Arc<Upstream>,
        name: &RepoName,
        digest: &Digest,
        range: Option<ByteRange>,
        shared_ok: bool,
    ) -> Result<Option<Joined>, Error> {
        // The upstream client's address identifies the upstream: names could be configured alike.
        let origin = (Arc::as_ptr(upstream) as usize, name.clone());
        let Some(download) = self.download(upstream, origin, digest, shared_ok).await? else {
            return Ok(Some(Joined::OtherRepository));
        };
        self.follow_download(download, digest, range).await
    }

    /// For another replica (cluster-internal): the blob from this store, or following this
    /// replica's download of it; `None` when it has neither (no download is started).
    pub async fn local_body(
        self: &Arc<Self>,
        digest: &Digest,
        range: Option<ByteRange>,
    ) -> Result<Option<BlobBody>, Error> {
        let running = self.downloads.lock().get(digest).cloned();
        let joined = match running {
            Some(download) => self.follow_download(download, digest, range).await?,
            None => self.open_stored(digest, range).await?.map(Joined::Body),
        };
        Ok(match joined {
            Some(Joined::Body(body)) => Some(body),
            _ => None,
        })
    }

    /// A body following `download` once upstream's headers arrived; `None` when the stored
    /// result was gone when opened.
    async fn follow_download(
        self: &Arc<Self>,
        download: Arc<Download>,
        digest: &Digest,
        range: Option<ByteRange>,
    ) -> Result<Option<Joined>, Error> {
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
        let file = match tokio::fs::File::open(&download.temp).await {
            Ok(f) => f,
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
        Ok(Some(Joined::Body(BlobBody {
            size: progress.size,
            range: bounds,
            source: Outcome::Miss,
            stream: Box::pin(follow(download, file, rx, start, end).await?),
        })))
    }

    /// Waits for the download to end, then serves the stored blob (or the download's error);
    /// `None` when it was gone from the store by then.
    async fn when_stored(
        self: &Arc<Self>,
        rx: &mut watch::Receiver<Progress>,
        digest: &Digest,
        range: Option<ByteRange>,
    ) -> Result<Option<Joined>, Error> {
        let done = rx
            .wait_for(|p| p.outcome.is_some())
            .await
            .map_err(|_| Error::storage("download vanished"))?
            .clone();
        done.outcome.unwrap_or(Ok(()))?;
        // Still reported as a miss: this request's download stored it.
        Ok(self.open_stored(digest, range).await?.map(|mut body| {
            body.source = Outcome::Miss;
            Joined::Body(body)
        }))
    }

    /// The running download of `digest`, or a new one. `None` when the running one was started
    /// with credentials for another upstream or repository and `shared_ok` is not set.
    async fn download(
        self: &Arc<Self>,
        upstream: &Arc<Upstream>,
        origin: (usize, RepoName),
        digest: &Digest,
        shared_ok: bool,
    ) -> Result<Option<Arc<Download>>, Error> {
        let joinable = |d: &Arc<Download>| {
            let private = self.restricted || d.private.load(Ordering::Relaxed);
            (shared_ok || !private || d.origin == origin).then(|| Arc::clone(d))
        };
        if let Some(d) = self.downloads.lock().get(digest) {
            return Ok(joinable(d));
        }
        // Creating a file is blocking I/O: do it off the async workers and outside the lock.
        let layout = self.layout.clone();
        let temp = tokio::task::spawn_blocking(move || layout.temp_file()).await??;
        let (file, temp_path) = temp.into_parts();
        let download = {
            let mut downloads = self.downloads.lock();
            if let Some(d) = downloads.get(digest) {
                let d = joinable(d);
                drop(downloads);
                tokio::task::spawn_blocking(move || drop((file, temp_path)));
                return Ok(d);
            }
            let (progress, _) = watch::channel(Progress::default());
            let download = Arc::new(Download {
                temp: temp_path.to_path_buf(),
                origin: origin.clone(),
                private: AtomicBool::new(upstream.has_credentials()),
                confirmed: AtomicBool::new(shared_ok),
                progress,
                recent: Mutex::default(),
            });
            downloads.insert(digest.clone(), Arc::clone(&download));
            download
        };
        let (store, upstream, name, digest, d) = (
            Arc::clone(self),
            Arc::clone(upstream),
            origin.1.clone(),
            digest.clone(),
            Arc::clone(&download),
        );
        // Logged inside the span of the request that started it (its request id).
        let task = async move {
            let mut lock = None;
            let outcome = store
                .run_download(&upstream, &name, &digest, &d, file, temp_path, &mut lock)
                .await;
            let share = match &outcome {
                Ok(share) => *share,
                Err(e) => {
                    tracing::warn!(%digest, repo = %name, error = %crate::error::Chain(e), "blob download failed; nothing stored");
                    None
                }
            };
            store.downloads.lock().remove(&digest);
            d.progress
                .send_modify(|p| p.outcome = Some(outcome.map(|_| ())));
            // Shared with the other replicas before the cluster lock goes: one that claims it
            // next finds the object.
            if let Some(private) = share
                && let Some(objects) = &store.shared
                && store.upload(objects, &digest, private).await
                && let Some(cluster) = store.cluster()
                && let Some(size) = store.stored_size(&digest)
            {
                cluster.blob_stored(&digest.to_string(), size).await;
            }
            drop(lock);
        };
        tokio::spawn(task.in_current_span());
        Ok(Some(download))
    }

    /// Shares a stored blob through object storage. One fetched with credentials is marked
    /// private there first (`<digest>.private`), so a replica that reads it serves it only where
    /// upstream shows it; a public one drops a marker left from before.
    async fn upload(
        &self,
        objects: &crate::objects::ObjectStorage,
        digest: &Digest,
        private: bool,
    ) -> bool {
        let marker = super::shared_private_key(digest);
        let marked = if private {
            objects.put_bytes(&marker, Bytes::new()).await
        } else {
            objects.delete(&marker).await
        };
        marked
            && objects
                .put_file(&super::shared_key(digest), &self.path(digest))
                .await
    }

    /// Downloads, verifies and stores the blob. `Ok(Some(private))` when it came (at least
    /// partly) from upstream, and so is for object storage; `lock` holds the cluster lock this
    /// replica took for it, if any.
    #[allow(clippy::too_many_arguments)]
    async fn run_download(
        self: &Arc<Self>,
        upstream: &Upstream,
        name: &RepoName,
        digest: &Digest,
        download: &Arc<Download>,
        file: std::fs::File,
        temp: tempfile::TempPath,
        lock: &mut Option<Lock>,
    ) -> Result<Option<bool>, Error> {
        let mut source = self
            .open_source(upstream, name, digest, download, None, lock)
            .await?;
        let size = source.size;
        if size.is_some_and(|s| s > self.limits.max) {
            return Err(crate::proxy::failure::invalid(
                "blob is larger than cache_max_disk; not fetched",
            ));
        }
        download.progress.send_modify(|p| {
            p.size = size;
            p.started = true;
        });
        let mut writer = Writer {
            spool: Spool::start(
                file,
                digest.algorithm(),
                Arc::clone(self),
                Arc::clone(download),
            ),
            received: 0,
            size,
            max: self.limits.max,
        };
        let (mut from_shared, mut from_upstream) = (false, false);
        let mut resumes = 0;
        loop {
            from_shared |= source.from == From::Shared;
            from_upstream |= source.from == From::Upstream;
            let counted = (source.from == From::Upstream).then_some(upstream);
            let Some(broken) = self
                .copy_body(&mut writer, source.body, source.skip, counted, download)
                .await?
            else {
                break;
            };
            if resumes == MAX_RESUMES {
                return Err(Error::from(crate::upstream::Error::unreachable(
                    "body broke off",
                    format!(
                        "blob body broke off at {} bytes {MAX_RESUMES} times; last: {broken}",
                        writer.received
                    ),
                )));
            }
            // Followers keep streaming: resume where the body broke off instead of failing them.
            resumes += 1;
            tracing::warn!(%digest, received = writer.received, resumes, error = %broken, "blob stream broke off; resuming with a range request");
            source = self
                .open_source(upstream, name, digest, download, Some(&mut writer), lock)
                .await?;
            if let Some(size) = writer.size {
                download.progress.send_modify(|p| p.size = Some(size));
            }
        }
        let private = self
            .commit(digest, writer, temp, download, from_shared)
            .await?;
        Ok(from_upstream.then_some(private))
    }

    /// Where the blob's bytes come from, from the start (`writer` is `None`) or from where the
    /// last body broke off: object storage if another replica stored it; else, in a cluster,
    /// the replica downloading it (streamed while it downloads) unless this replica takes the
    /// cluster lock; else upstream.
    async fn open_source(
        &self,
        upstream: &Upstream,
        name: &RepoName,
        digest: &Digest,
        download: &Download,
        writer: Option<&mut Writer>,
        lock: &mut Option<Lock>,
    ) -> Result<Source, Error> {
        let source = self
            .open_source_unchecked(upstream, name, digest, writer, lock)
            .await?;
        // Bytes fetched with credentials, from the bucket or another replica (with access
        // control, any such bytes): upstream must show them in this repository first (one
        // HEAD), as for a stored blob.
        let foreign = self.restricted && source.from != From::Upstream;
        if (source.private || foreign) && !download.confirmed.load(Ordering::Relaxed) {
            upstream
                .head_blob(name, digest)
                .await
                .map_err(crate::proxy::failure::blob)?;
            download.confirmed.store(true, Ordering::Relaxed);
        }
        if source.private {
            download.private.store(true, Ordering::Relaxed);
        }
        Ok(source)
    }

    /// [`Self::open_source`] before the access check.
    async fn open_source_unchecked(
        &self,
        upstream: &Upstream,
        name: &RepoName,
        digest: &Digest,
        mut writer: Option<&mut Writer>,
        lock: &mut Option<Lock>,
    ) -> Result<Source, Error> {
        let offset = writer.as_ref().map_or(0, |w| w.received);
        // A holder that cannot be reached is waited for until its lock expired (it died).
        let deadline = std::time::Instant::now() + crate::cluster::LOCK_TTL * 3;
        loop {
            if let Some(source) = self.shared_body(digest, offset, writer.as_deref()).await {
                return Ok(source);
            }
            let peers = self.peers.get();
            let claim = match peers {
                Some(peers) if lock.is_none() => peers.cluster.claim(&lock_key(digest)).await,
                _ => Claim::Alone,
            };
            match (claim, peers) {
                (Claim::Held(owner), Some(peers)) if std::time::Instant::now() < deadline => {
                    match peers.body(&owner, digest, writer.as_deref_mut()).await {
                        Ok(source) => return Ok(source),
                        Err(e) => {
                            tracing::debug!(%digest, owner, error = %e, "cannot follow the replica downloading a blob; waiting");
                            tokio::time::sleep(std::time::Duration::from_millis(200)).await;
                            continue;
                        }
                    }
                }
                (Claim::Owned(held), _) => *lock = Some(held),
                _ => {}
            }
            return match writer {
                None => {
                    let exchange = upstream
                        .get_blob(name, digest, None)
                        .await
                        .map_err(crate::proxy::failure::blob)?;
                    Ok(Source {
                        size: content_length(&exchange.response),
                        body: upstream_body(exchange),
                        skip: 0,
                        from: From::Upstream,
                        private: false,
                    })
                }
                Some(writer) => {
                    let (exchange, skip) = resume(upstream, name, digest, writer).await?;
                    Ok(Source {
                        size: writer.size,
                        body: upstream_body(exchange),
                        skip,
                        from: From::Upstream,
                        private: false,
                    })
                }
            };
        }
    }

    /// A blob's bytes from object storage from `offset`, when another replica stored it there
    /// (and its size fits what is known).
    async fn shared_body(
        &self,
        digest: &Digest,
        offset: u64,
        writer: Option<&Writer>,
    ) -> Option<Source> {
        let objects = self.shared.as_ref()?;
        let (size, stream) = objects
            .get_stream_from(&super::shared_key(digest), offset)
            .await?;
        if writer
            .and_then(|w| w.size)
            .is_some_and(|known| known != size)
        {
            return None;
        }
        // The marker is written before the blob: absent now means public. Unknown counts as
        // private.
        let private = objects.exists(&super::shared_private_key(digest)).await != Some(false);
        Some(Source {
            body: Box::pin(stream.map(|r| r.map_err(|e| e.to_string()))),
            size: Some(size),
            skip: 0,
            from: From::Shared,
            private,
        })
    }

    /// Receives one response body into the window and the spool. `Some(error)` when the body
    /// broke off.
    /// `upstream` counts the bytes fetched from it (`None`: they come from object storage).
    async fn copy_body(
        self: &Arc<Self>,
        writer: &mut Writer,
        mut body: Body,
        mut skip: u64,
        upstream: Option<&Upstream>,
        download: &Download,
    ) -> Result<Option<String>, Error> {
        while let Some(chunk) = body.next().await {
            let mut chunk = match chunk {
                Ok(chunk) => chunk,
                Err(e) => return Ok(Some(e)),
            };
            if skip > 0 {
                let drop_len = skip.min(chunk.len() as u64);
                skip -= drop_len;
                chunk = chunk.slice(usize::try_from(drop_len).unwrap_or(chunk.len())..);
            }
            if chunk.is_empty() {
                continue;
            }
            let end = writer.received.saturating_add(chunk.len() as u64);
            if writer.size.is_some_and(|size| end > size) || end > writer.max {
                return Err(crate::proxy::failure::invalid(
                    "blob body is longer than its announced size",
                ));
            }
            if let Some(upstream) = upstream {
                upstream.metrics.fetched(chunk.len() as u64);
            }
            download.recent.lock().push(chunk.clone());
            download.progress.send_modify(|p| p.received = end);
            writer.received = end;
            if writer.spool.chunks.send(chunk).await.is_err() {
                // The spool thread stopped on an error: that error is the download's.
                return Err(writer.spool.failure().await);
            }
        }
        Ok(None)
    }

    /// Verifies a complete download and moves it into the store.
    async fn commit(
        self: &Arc<Self>,
        digest: &Digest,
        writer: Writer,
        temp: tempfile::TempPath,
        download: &Download,
        from_shared: bool,
    ) -> Result<bool, Error> {
        let Writer {
            spool,
            received: written,
            size,
            ..
        } = writer;
        if let Some(size) = size
            && size != written
        {
            return Err(crate::proxy::failure::invalid(format!(
                "blob truncated at {written} of {size} bytes"
            )));
        }
        let (file, got) = spool.finish().await?;
        if got != *digest {
            // A damaged object costs this download, never a wrong byte, and only once.
            if from_shared && let Some(objects) = &self.shared {
                tracing::warn!(%digest, %got, "a blob in object storage does not match its digest; deleting it");
                objects.delete(&super::shared_key(digest)).await;
                if let Some(cluster) = self.cluster() {
                    cluster.blob_deleted(&digest.to_string()).await;
                }
            }
            return Err(crate::proxy::failure::invalid(format!(
                "blob content has digest {got}, not {digest}"
            )));
        }
        // Content also fetched without credentials is public, whoever fetches it again.
        let private = download.private.load(Ordering::Relaxed)
            && self.index.lock().get(digest).is_none_or(|m| m.private);
        let path = self.path(digest);
        let marker = self.private_marker(digest);
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
        .await??;
        let previous = self.index.lock().insert(
            digest.clone(),
            Arc::new(BlobMeta::new(written, true, private)),
        );
        if previous.is_none() {
            self.total.fetch_add(written, Ordering::Relaxed);
        }
        if self.needs_eviction() {
            self.evict.notify_one();
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

/// Where a blob's bytes come from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum From {
    Upstream,
    /// Object storage.
    Shared,
    /// The replica downloading it.
    Peer,
}

/// One body to receive: its bytes, the blob's size if known, and how many leading bytes to
/// skip (a resume answered with the whole blob).
struct Source {
    body: Body,
    size: Option<u64>,
    skip: u64,
    from: From,
    /// Fetched with credentials (by whoever stored or is downloading it).
    private: bool,
}

/// The cluster lock of a blob's download.
fn lock_key(digest: &Digest) -> String {
    format!("pullthrough:lock:blob:{digest}")
}

/// The other replicas: Redis, the secret of internal requests, and a client for them.
#[derive(Debug)]
pub struct Peers {
    pub cluster: Arc<Cluster>,
    pub secret: crate::config::Secret,
    pub client: reqwest::Client,
    /// Most bytes of blobs in object storage (`storage_max_bytes`; 0: no limit).
    pub storage_max: u64,
}

impl Peers {
    /// The blob's bytes from the replica `owner`, which downloads or holds it, from where
    /// `writer` is (the start when `None`).
    async fn body(
        &self,
        owner: &str,
        digest: &Digest,
        writer: Option<&mut Writer>,
    ) -> Result<Source, String> {
        let url = format!(
            "{}/_pullthrough/cluster/blobs/{digest}",
            owner.trim_end_matches('/')
        );
        let mut request = self.client.get(url).bearer_auth(&self.secret.0);
        if let Some(w) = &writer {
            request = request.header(reqwest::header::RANGE, format!("bytes={}-", w.received));
        }
        let response = request.send().await.map_err(|e| e.to_string())?;
        let status = response.status();
        if !status.is_success() {
            return Err(format!("answered {status}"));
        }
        let private = response
            .headers()
            .get(super::PRIVATE_HEADER)
            .is_none_or(|v| v.as_bytes() != b"0");
        let (size, skip) = match writer {
            None if status == reqwest::StatusCode::OK => (content_length(&response), 0),
            None => return Err(format!("answered {status} to a whole-blob request")),
            Some(writer) => {
                let skip = fit(&response, writer).map_err(|e| e.to_string())?;
                (writer.size, skip)
            }
        };
        Ok(Source {
            body: Box::pin(
                response
                    .bytes_stream()
                    .map(|r| r.map_err(|e| e.to_string())),
            ),
            size,
            skip,
            from: From::Peer,
            private,
        })
    }
}

/// A blob body as it arrives, from upstream or object storage; an error says why it broke off.
type Body = std::pin::Pin<Box<dyn Stream<Item = Result<Bytes, String>> + Send>>;

fn upstream_body(exchange: Exchange) -> Body {
    Box::pin(exchange.into_body().map(|r| r.map_err(|e| e.to_string())))
}

/// `Content-Length` of a response, if it is a plain number.
fn content_length(response: &reqwest::Response) -> Option<u64> {
    let value = response
        .headers()
        .get(reqwest::header::CONTENT_LENGTH)?
        .to_str()
        .ok()?;
    if value.is_empty() || !value.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    value.parse().ok()
}

/// Asks upstream for the rest of the blob. The answer must fit exactly: a 206 for precisely
/// the missing bytes (and the known size), or a 200 of the whole blob whose prefix is skipped.
/// Returns the response and how many of its leading bytes to skip.
async fn resume(
    upstream: &Upstream,
    name: &RepoName,
    digest: &Digest,
    writer: &mut Writer,
) -> Result<(Exchange, u64), Error> {
    let written = writer.received;
    let range = match writer.size {
        Some(size) => format!("bytes={written}-{}", size.saturating_sub(1)),
        None => format!("bytes={written}-"),
    };
    let exchange = upstream
        .get_blob(name, digest, Some(&range))
        .await
        .map_err(crate::proxy::failure::blob)?;
    let skip = fit(&exchange.response, writer)?;
    Ok((exchange, skip))
}

/// Checks a range answer against what `writer` has: a 206 for precisely the missing bytes (and
/// the known size), or a 200 of the whole blob whose prefix is to be skipped (returned).
fn fit(response: &reqwest::Response, writer: &mut Writer) -> Result<u64, Error> {
    let written = writer.received;
    let unusable =
        || crate::proxy::failure::invalid("upstream answered a resume with an unusable range");
    let length = content_length(response);
    match response.status().as_u16() {
        206 => {
            let content_range = response
                .headers()
                .get(reqwest::header::CONTENT_RANGE)
                .and_then(|v| v.to_str().ok())
                .and_then(ContentRange::parse)
                .ok_or_else(unusable)?;
            let (first, last) = content_range.range.ok_or_else(unusable)?;
            let total = match (writer.size, content_range.total) {
                (Some(size), Some(total)) if size != total => return Err(unusable()),
                (Some(size), _) => size,
                (None, Some(total)) => total,
                (None, None) => return Err(unusable()),
            };
            let fits = first == written
                && last.checked_add(1) == Some(total)
                && length.is_none_or(|l| Some(l) == (last - first).checked_add(1));
            if !fits {
                return Err(unusable());
            }
            writer.size = Some(total);
            Ok(0)
        }
        200 => {
            if let (Some(size), Some(length)) = (writer.size, length)
                && size != length
            {
                return Err(unusable());
            }
            writer.size = writer.size.or(length);
            Ok(written)
        }
        _ => Err(unusable()),
    }
}

/// Streams a download from `start` as it grows, up to `end` (exclusive; the whole blob when
/// `None`): from its window of recent bytes while they are held, else from the temp file. The
/// blob's last byte waits for verification; a failed download ends the stream with an error,
/// which aborts the client's transfer.
async fn follow(
    download: Arc<Download>,
    mut file: tokio::fs::File,
    rx: watch::Receiver<Progress>,
    start: u64,
    end: Option<u64>,
) -> std::io::Result<impl Stream<Item = std::io::Result<Bytes>> + Send + use<>> {
    if start > 0 {
        file.seek(SeekFrom::Start(start)).await?;
    }
    // `at`: the file's position, which trails `sent` while the window serves.
    Ok(futures_util::stream::unfold(
        (file, rx, start, start, false),
        move |(mut file, mut rx, sent, mut at, finished)| {
            let download = Arc::clone(&download);
            async move {
                if finished || end.is_some_and(|end| sent >= end) {
                    return None;
                }
                loop {
                    let progress = rx.borrow_and_update().clone();
                    if let Some(Err(e)) = &progress.outcome {
                        let e = std::io::Error::other(e.to_string());
                        return Some((Err(e), (file, rx, sent, at, true)));
                    }
                    let limit = end.map_or(progress.sendable(), |end| end.min(progress.sendable()));
                    if sent < limit {
                        if let Some(bytes) = download.recent.lock().read(sent, limit) {
                            let sent = sent + bytes.len() as u64;
                            return Some((Ok(bytes), (file, rx, sent, at, false)));
                        }
                        let on_disk = limit.min(progress.written);
                        if sent < on_disk {
                            let read = read_at(&mut file, &mut at, sent, on_disk).await;
                            return Some(match read {
                                Ok(bytes) => {
                                    let sent = sent + bytes.len() as u64;
                                    (Ok(bytes), (file, rx, sent, at, false))
                                }
                                Err(e) => (Err(e), (file, rx, sent, at, true)),
                            });
                        }
                    }
                    if progress.outcome.is_some() && sent >= limit {
                        return None;
                    }
                    if rx.changed().await.is_err() {
                        // The download task is gone without an outcome: treat as failure.
                        let e = std::io::Error::other("blob download stopped");
                        return Some((Err(e), (file, rx, sent, at, true)));
                    }
                }
            }
        },
    ))
}

/// Reads up to [`CHUNK`] bytes of `file` from `offset` to `limit` (exclusive); `at` is the
/// file's position before and after.
async fn read_at(
    file: &mut tokio::fs::File,
    at: &mut u64,
    offset: u64,
    limit: u64,
) -> std::io::Result<Bytes> {
    if *at != offset {
        file.seek(SeekFrom::Start(offset)).await?;
        *at = offset;
    }
    let want = usize::try_from(limit - offset)
        .unwrap_or(usize::MAX)
        .min(CHUNK);
    let mut buf = vec![0u8; want];
    file.read_exact(&mut buf).await?;
    *at += want as u64;
    Ok(Bytes::from(buf))
}
