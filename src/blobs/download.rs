//! One upstream download per digest, and the streams that follow its growing temp file.
//!
//! What is written never goes past the blob's size (upstream's `Content-Length`, or the total of
//! a resume's `Content-Range`), a resume must continue exactly where the body broke off, and a
//! follower never receives the blob's last byte before the digest verified.

use super::{BlobBody, BlobMeta, BlobStore, ByteRange, CHUNK, ContentRange};
use crate::error::Error;
use crate::metrics::Outcome;
use crate::registry::{Digest, RepoName, Verifier};
use crate::upstream::{Exchange, Upstream};
use bytes::Bytes;
use futures_util::{Stream, StreamExt};
use std::io::SeekFrom;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::Ordering;
use tokio::io::{AsyncReadExt, AsyncSeekExt, AsyncWriteExt};
use tokio::sync::watch;
use tracing::Instrument;

/// How often one download may resume after its upstream body broke off.
const MAX_RESUMES: u32 = 3;

/// Progress of one download, published to its followers.
#[derive(Debug, Clone, Default)]
pub(super) struct Progress {
    /// The blob's size, once upstream said it.
    size: Option<u64>,
    /// Upstream answered with a body.
    started: bool,
    /// Bytes written to the temp file so far (never more than `size`).
    written: u64,
    /// Set when the download ended.
    outcome: Option<Result<(), Error>>,
}

impl Progress {
    /// How many bytes from the start a follower may send now: what is written, less the blob's
    /// last byte until the download verified.
    fn sendable(&self) -> u64 {
        match (&self.outcome, self.size) {
            (Some(Ok(())), _) => self.written,
            (_, Some(size)) => self.written.min(size.saturating_sub(1)),
            (_, None) => self.written.saturating_sub(1),
        }
    }
}

#[derive(Debug)]
pub(super) struct Download {
    temp: PathBuf,
    /// The upstream (by identity) and repository the blob is fetched from: another may read
    /// the download only under the rule for stored blobs.
    origin: (usize, RepoName),
    /// Fetched with credentials.
    private: bool,
    progress: watch::Sender<Progress>,
}

/// The temp file a download writes, and what it has verified so far.
struct Writer {
    file: tokio::fs::File,
    verifier: Hashing,
    written: u64,
    /// The blob's size, once known: nothing is written past it.
    size: Option<u64>,
    /// The most a blob of unknown size may take (`cache_max_disk`).
    max: u64,
    /// An `ENOSPC` was already answered by an eviction.
    evicted_for_space: bool,
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
        if progress.size == Some(0) {
            // Nothing to hold back in an empty body: answer only once it verified.
            return self.when_stored(&mut rx, digest, range).await;
        }
        let bounds = match (range, progress.size) {
            (Some(range), Some(size)) => Some(range.resolve(size)?),
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
            stream: Box::pin(follow(file, rx, start, end).await?),
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
            .map_err(|_| Error::Storage("download vanished".into()))?
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
            (shared_ok || !d.private || d.origin == origin).then(|| Arc::clone(d))
        };
        if let Some(d) = self.downloads.lock().get(digest) {
            return Ok(joinable(d));
        }
        // Creating a file is blocking I/O: do it off the async workers and outside the lock.
        let layout = self.layout.clone();
        let temp = tokio::task::spawn_blocking(move || layout.temp_file())
            .await
            .map_err(|e| Error::Storage(e.to_string()))??;
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
                private: upstream.has_credentials(),
                progress,
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
            let file = tokio::fs::File::from_std(file);
            let outcome = store
                .run_download(&upstream, &name, &digest, &d, file, temp_path)
                .await;
            if let Err(e) = &outcome {
                tracing::warn!(%digest, repo = %name, error = %e, "blob download failed; nothing stored");
            }
            store.downloads.lock().remove(&digest);
            d.progress.send_modify(|p| p.outcome = Some(outcome));
        };
        tokio::spawn(task.in_current_span());
        Ok(Some(download))
    }

    async fn run_download(
        self: &Arc<Self>,
        upstream: &Upstream,
        name: &RepoName,
        digest: &Digest,
        download: &Download,
        file: tokio::fs::File,
        temp: tempfile::TempPath,
    ) -> Result<(), Error> {
        let mut exchange = upstream
            .get_blob(name, digest, None)
            .await
            .map_err(Error::blob)?;
        let size = content_length(&exchange);
        if size.is_some_and(|s| s > self.limits.max) {
            return Err(Error::upstream_invalid(
                "blob is larger than cache_max_disk; not fetched",
            ));
        }
        download.progress.send_modify(|p| {
            p.size = size;
            p.started = true;
        });
        let mut writer = Writer {
            file,
            verifier: Hashing::start(digest.algorithm()),
            written: 0,
            size,
            max: self.limits.max,
            evicted_for_space: false,
        };
        // Bytes at the start of the response that we already have (a resume answered with 200).
        let mut skip = 0u64;
        let mut resumes = 0;
        loop {
            let Some(broken) = self
                .copy_body(&mut writer, exchange, skip, upstream, download)
                .await?
            else {
                break;
            };
            if resumes == MAX_RESUMES {
                return Err(Error::Upstream(crate::upstream::Error::Unreachable(
                    format!(
                        "blob body broke off at {} bytes {MAX_RESUMES} times; last: {broken}",
                        writer.written
                    ),
                )));
            }
            // Followers keep streaming: resume where the body broke off instead of failing them.
            resumes += 1;
            tracing::warn!(%digest, written = writer.written, resumes, error = %broken, "blob stream broke off; resuming with a range request");
            (exchange, skip) = resume(upstream, name, digest, &mut writer).await?;
            if let Some(size) = writer.size {
                download.progress.send_modify(|p| p.size = Some(size));
            }
        }
        self.commit(digest, writer, temp, download).await
    }

    /// Copies one response body into the temp file. `Some(error)` when the body broke off.
    async fn copy_body(
        self: &Arc<Self>,
        writer: &mut Writer,
        exchange: Exchange,
        mut skip: u64,
        upstream: &Upstream,
        download: &Download,
    ) -> Result<Option<reqwest::Error>, Error> {
        let mut body = exchange.response.bytes_stream();
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
            let end = writer.written.saturating_add(chunk.len() as u64);
            if writer.size.is_some_and(|size| end > size) || end > writer.max {
                return Err(Error::upstream_invalid(
                    "blob body is longer than its announced size",
                ));
            }
            self.write_chunk(writer, &chunk).await?;
            upstream.metrics.fetched(chunk.len() as u64);
            let written = writer.written;
            download.progress.send_modify(|p| p.written = written);
        }
        Ok(None)
    }

    /// Appends `chunk` to the temp file. A full disk is answered once per download by evicting
    /// enough for the rest of the blob and writing the chunk again.
    async fn write_chunk(
        self: &Arc<Self>,
        writer: &mut Writer,
        chunk: &Bytes,
    ) -> Result<(), Error> {
        let mut written = write_flushed(&mut writer.file, chunk).await;
        if let Err(e) = &written
            && e.kind() == std::io::ErrorKind::StorageFull
            && !writer.evicted_for_space
        {
            writer.evicted_for_space = true;
            let needed = writer
                .size
                .map_or(chunk.len() as u64, |s| s.saturating_sub(writer.written));
            tracing::warn!(
                needed,
                "disk full while downloading a blob; evicting and retrying"
            );
            self.make_room(needed).await;
            // Drop whatever part of the chunk reached the file, then write it again.
            writer.file.set_len(writer.written).await?;
            writer.file.seek(SeekFrom::Start(writer.written)).await?;
            written = write_flushed(&mut writer.file, chunk).await;
        }
        written?;
        writer.verifier.update(chunk.clone()).await?;
        writer.written += chunk.len() as u64;
        Ok(())
    }

    /// Verifies a complete download and moves it into the store.
    async fn commit(
        self: &Arc<Self>,
        digest: &Digest,
        writer: Writer,
        temp: tempfile::TempPath,
        download: &Download,
    ) -> Result<(), Error> {
        let Writer {
            mut file,
            verifier,
            written,
            size,
            ..
        } = writer;
        file.flush().await?;
        if let Some(size) = size
            && size != written
        {
            return Err(Error::upstream_invalid(format!(
                "blob truncated at {written} of {size} bytes"
            )));
        }
        let got = verifier.finish().await?;
        if got != *digest {
            return Err(Error::upstream_invalid(format!(
                "blob content has digest {got}, not {digest}"
            )));
        }
        file.sync_all().await?;
        drop(file);
        // Content also fetched without credentials is public, whoever fetches it again.
        let private = download.private && self.index.lock().get(digest).is_none_or(|m| m.private);
        let path = self.path(digest);
        let marker = self.private_marker(digest);
        let parent = path.parent().map(Path::to_path_buf);
        tokio::task::spawn_blocking(move || -> std::io::Result<()> {
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
        .map_err(|e| Error::Storage(e.to_string()))??;
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
        Ok(())
    }
}

async fn write_flushed(file: &mut tokio::fs::File, chunk: &[u8]) -> std::io::Result<()> {
    file.write_all(chunk).await?;
    // tokio's File writes in the background: flush so followers can read what we publish.
    file.flush().await
}

/// A download's digest, computed on a blocking thread beside the writes: hashing (a third of a
/// cold pull's CPU) runs while the next bytes arrive instead of between them. At most 32 chunks
/// wait for it, so a slow hash holds the download back rather than filling memory.
struct Hashing {
    chunks: tokio::sync::mpsc::Sender<Bytes>,
    digest: tokio::sync::oneshot::Receiver<Digest>,
}

impl Hashing {
    fn start(algorithm: crate::registry::Algorithm) -> Hashing {
        let (chunks, mut rx) = tokio::sync::mpsc::channel::<Bytes>(32);
        let (done, digest) = tokio::sync::oneshot::channel();
        tokio::task::spawn_blocking(move || {
            let mut verifier = Verifier::new(algorithm);
            while let Some(chunk) = rx.blocking_recv() {
                verifier.update(&chunk);
            }
            let _ = done.send(verifier.finish());
        });
        Hashing { chunks, digest }
    }

    async fn update(&self, chunk: Bytes) -> Result<(), Error> {
        self.chunks
            .send(chunk)
            .await
            .map_err(|_| Error::Storage("blob hashing stopped".into()))
    }

    /// The digest of everything given.
    async fn finish(self) -> Result<Digest, Error> {
        let Hashing { chunks, digest } = self;
        drop(chunks);
        digest
            .await
            .map_err(|_| Error::Storage("blob hashing stopped".into()))
    }
}

impl std::fmt::Debug for Hashing {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Hashing")
    }
}

/// `Content-Length` of a response, if it is a plain number.
fn content_length(exchange: &Exchange) -> Option<u64> {
    let value = exchange
        .response
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
    let written = writer.written;
    let range = match writer.size {
        Some(size) => format!("bytes={written}-{}", size.saturating_sub(1)),
        None => format!("bytes={written}-"),
    };
    let exchange = upstream
        .get_blob(name, digest, Some(&range))
        .await
        .map_err(Error::blob)?;
    let unusable = || Error::upstream_invalid("upstream answered a resume with an unusable range");
    let length = content_length(&exchange);
    match exchange.response.status().as_u16() {
        206 => {
            let content_range = exchange
                .response
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
            Ok((exchange, 0))
        }
        200 => {
            if let (Some(size), Some(length)) = (writer.size, length)
                && size != length
            {
                return Err(unusable());
            }
            writer.size = writer.size.or(length);
            Ok((exchange, written))
        }
        _ => Err(unusable()),
    }
}

/// Streams a download's temp file from `start` as it grows, up to `end` (exclusive; the whole
/// blob when `None`). The blob's last byte waits for verification; a failed download ends the
/// stream with an error, which aborts the client's transfer.
async fn follow(
    mut file: tokio::fs::File,
    rx: watch::Receiver<Progress>,
    start: u64,
    end: Option<u64>,
) -> std::io::Result<impl Stream<Item = std::io::Result<Bytes>> + Send + use<>> {
    if start > 0 {
        file.seek(SeekFrom::Start(start)).await?;
    }
    Ok(futures_util::stream::unfold(
        (file, rx, start, false),
        move |(mut file, mut rx, sent, finished)| async move {
            if finished || end.is_some_and(|end| sent >= end) {
                return None;
            }
            loop {
                let progress = rx.borrow_and_update().clone();
                if let Some(Err(e)) = &progress.outcome {
                    return Some((
                        Err(std::io::Error::other(e.to_string())),
                        (file, rx, sent, true),
                    ));
                }
                let limit = end.map_or(progress.sendable(), |end| end.min(progress.sendable()));
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
    ))
}
