//! One upstream download per digest, and the streams that follow its growing temp file.

use super::{BlobBody, BlobMeta, BlobStore, ByteRange, CHUNK, Source};
use crate::error::Error;
use crate::metrics::Counters;
use crate::registry::{Digest, RepoName, Verifier};
use crate::upstream::Upstream;
use bytes::Bytes;
use futures_util::{Stream, StreamExt};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::Ordering;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::sync::watch;

/// How often one download may resume after its upstream body broke off.
const MAX_RESUMES: u32 = 3;

/// Progress of one download, published to its followers.
#[derive(Debug, Clone, Default)]
pub(super) struct Progress {
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
pub(super) struct Download {
    temp: PathBuf,
    progress: watch::Sender<Progress>,
}

impl BlobStore {
    /// The size of a blob being downloaded, once upstream said it.
    pub fn downloading_size(&self, digest: &Digest) -> Option<u64> {
        let downloads = self.downloads.lock().expect("downloads lock poisoned");
        downloads.get(digest).and_then(|d| d.progress.borrow().size)
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
            return self.open_downloaded(digest, Some(range)).await;
        }
        let file = match tokio::fs::File::open(&download.temp).await {
            Ok(f) => f,
            // Already renamed into the store: serve it from there.
            Err(_) => return self.open_downloaded(digest, None).await,
        };
        let stream = follow(file, rx);
        Ok(BlobBody {
            size: progress.size,
            range: None,
            source: Source::Miss,
            stream: Box::pin(stream),
        })
    }

    /// A blob this request's download just stored, still reported as a miss.
    async fn open_downloaded(
        self: &Arc<Self>,
        digest: &Digest,
        range: Option<ByteRange>,
    ) -> Result<BlobBody, Error> {
        let mut body = self
            .open_stored(digest, range)
            .await?
            .ok_or(Error::BlobUnknown)?;
        body.source = Source::Miss;
        Ok(body)
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
        let mut response = response;
        // Bytes at the start of `response` that we already have (a resume answered with 200).
        let mut skip = 0u64;
        let mut resumes = 0;
        loop {
            let mut body = response.bytes_stream();
            let mut broken = None;
            while let Some(chunk) = body.next().await {
                let mut chunk = match chunk {
                    Ok(chunk) => chunk,
                    Err(e) => {
                        broken = Some(e);
                        break;
                    }
                };
                if skip > 0 {
                    let drop_len = skip.min(chunk.len() as u64);
                    skip -= drop_len;
                    chunk = chunk.slice(drop_len as usize..);
                }
                if chunk.is_empty() {
                    continue;
                }
                file.write_all(&chunk).await?;
                // tokio's File writes in the background: flush so followers can read what we publish.
                file.flush().await?;
                verifier.update(&chunk);
                written += chunk.len() as u64;
                Counters::add(&upstream.counters.blob_bytes_fetched, chunk.len() as u64);
                download.progress.send_modify(|p| p.written = written);
            }
            let Some(e) = broken else { break };
            if resumes == MAX_RESUMES {
                return Err(Error::Upstream(crate::upstream::Error::Unreachable(
                    format!(
                        "blob body broke off at {written} bytes {MAX_RESUMES} times; last: {e}"
                    ),
                )));
            }
            // Followers keep streaming: resume where the body broke off instead of failing them.
            resumes += 1;
            tracing::warn!(%digest, written, resumes, error = %e, "blob stream broke off; resuming with a range request");
            let range = format!("bytes={written}-");
            response = upstream
                .get_blob(name, digest, Some(&range))
                .await
                .map_err(Error::blob)?;
            let start = response
                .headers()
                .get(reqwest::header::CONTENT_RANGE)
                .and_then(|v| v.to_str().ok())
                .and_then(|v| v.strip_prefix("bytes "))
                .and_then(|v| v.split('-').next())
                .and_then(|v| v.parse::<u64>().ok());
            skip = match (response.status().as_u16(), start) {
                (206, Some(start)) if start == written => 0,
                (200, _) => written,
                _ => {
                    return Err(Error::upstream_invalid(
                        "upstream answered a resume with an unusable range",
                    ));
                }
            };
        }
        file.flush().await?;
        if size.is_some_and(|s| s != written) {
            return Err(Error::upstream_invalid(format!(
                "blob truncated at {written} of {} bytes",
                size.unwrap_or_default()
            )));
        }
        let got = verifier.finish();
        if got != *digest {
            return Err(Error::upstream_invalid(format!(
                "blob content has digest {got}, not {digest}"
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
        let previous = self
            .index
            .lock()
            .expect("index lock poisoned")
            .insert(digest.clone(), Arc::new(BlobMeta::new(written, true)));
        if previous.is_none() {
            self.total.fetch_add(written, Ordering::Relaxed);
        }
        if self.total_bytes() as f64 > self.limits.max as f64 * self.limits.high {
            self.evict.notify_one();
        }
        Ok(())
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
