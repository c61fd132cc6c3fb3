//! Fetching a blob into the store: one download per digest, whoever asks. This picks where the
//! bytes come from (the bucket another replica filled, the replica downloading it, or
//! upstream), takes the cluster lock through the same turn-taking as manifests, resumes a body
//! that broke off, confirms access before using bytes fetched with credentials, and shares the
//! verified blob through the bucket. The store ([`crate::blobs`]) only writes, verifies and
//! serves what it is handed.
//!
//! A resume must continue exactly where the body broke off: a 206 for precisely the missing
//! bytes (and the known size), or a 200 of the whole blob whose prefix is skipped.

use super::fetch::Turn;
use super::{Proxy, failure};
use crate::blobs::{Begun, BlobBody, Incoming, Origin, WriteError};
use crate::cluster::{LOCK_TTL, Lock};
use crate::error::Error;
use crate::registry::{ByteRange, ContentRange, Digest, RepoName};
use crate::upstream::{self, Exchange};
use bytes::Bytes;
use futures_util::StreamExt;
use futures_util::stream::BoxStream;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tracing::Instrument;

/// How often one download may resume after its body broke off.
const MAX_RESUMES: u32 = 3;

/// How long a replica waits before asking again for a blob another one holds the lock of but
/// cannot stream yet.
const PEER_RETRY: Duration = Duration::from_millis(200);

/// What a download request found.
#[derive(Debug)]
pub(super) enum Joined {
    /// A body following the download.
    Body(BlobBody),
    /// A download started for another repository is under way; joining it needs access to
    /// be confirmed first.
    OtherRepository,
}

/// Where a blob's bytes come from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum From {
    Upstream,
    /// Object storage.
    Bucket,
    /// The replica downloading it.
    Peer,
}

/// One body to receive: its bytes, the blob's size if known, and how many leading bytes to
/// skip (a resume answered with the whole blob).
struct Source {
    body: BoxStream<'static, Result<Bytes, String>>,
    size: Option<u64>,
    skip: u64,
    from: From,
    /// Fetched with credentials (by whoever stored or is downloading it).
    private: bool,
}

/// What one download has done so far.
#[derive(Debug, Default)]
struct Run {
    /// The cluster lock this replica took for it.
    lock: Option<Lock>,
    /// Upstream showed the blob in the repository that started the download: a private
    /// source may be used without asking it.
    confirmed: bool,
    from_bucket: bool,
    from_upstream: bool,
}

impl Proxy {
    /// Joins the download of `digest`, or starts it (fetching from `name`), or serves the blob
    /// a download stored since the caller looked. A download under way for another repository
    /// is joined only when `shared_ok`. Returns once the blob's size is known, with the body
    /// following the download; a range is served as soon as its bytes are on disk.
    pub(super) async fn fetch_blob(
        self: &Arc<Self>,
        name: &RepoName,
        digest: &Digest,
        range: Option<ByteRange>,
        shared_ok: bool,
    ) -> Result<Joined, Error> {
        // The blob a joined download stored can be evicted or purged before this request
        // opens it: then it is fetched again (once), never answered as unknown.
        for _ in 0..2 {
            if let Some(joined) = self.fetch_blob_once(name, digest, range, shared_ok).await? {
                return Ok(joined);
            }
        }
        // Removed from the store twice while being fetched: as before this retry, unknown.
        Err(Error::BlobUnknown)
    }

    /// [`Self::fetch_blob`], once: `None` when the stored result was gone when opened.
    async fn fetch_blob_once(
        self: &Arc<Self>,
        name: &RepoName,
        digest: &Digest,
        range: Option<ByteRange>,
        shared_ok: bool,
    ) -> Result<Option<Joined>, Error> {
        let origin = Origin {
            upstream: Arc::as_ptr(&self.upstream) as usize,
            repository: name.clone(),
        };
        let begun = self
            .blobs
            .begin(digest, origin.clone(), self.upstream.has_credentials())
            .await?;
        let download = match begun {
            Begun::Running(download) => {
                // Started with credentials (or, with access control, at all) for another
                // upstream or repository: joined only where access is known.
                let private = self.restricted || download.is_private();
                if !shared_ok && private && *download.origin() != origin {
                    return Ok(Some(Joined::OtherRepository));
                }
                download
            }
            Begun::Started(incoming) => {
                let download = Arc::clone(incoming.download());
                self.spawn_download(incoming, name, digest, shared_ok);
                download
            }
            // Stored by a download that ended since the caller looked: under the stored rule.
            Begun::Stored => {
                self.may_share_stored(name, digest).await?;
                let body = self.blobs.open_stored(digest, range).await?;
                return Ok(body.map(Joined::Body));
            }
        };
        let body = self.blobs.follow(download, digest, range).await?;
        Ok(body.map(Joined::Body))
    }

    /// Feeds `incoming` in a task of its own (a departing client does not stop it), logged
    /// inside the span of the request that started it; then shares the blob through the
    /// bucket before the cluster lock goes, so a replica that claims it next finds it there.
    fn spawn_download(
        self: &Arc<Self>,
        incoming: Incoming,
        name: &RepoName,
        digest: &Digest,
        confirmed: bool,
    ) {
        let (this, name, digest) = (Arc::clone(self), name.clone(), digest.clone());
        let task = async move {
            let download = Arc::clone(incoming.download());
            let mut run = Run {
                confirmed,
                ..Run::default()
            };
            let outcome = this.download(incoming, &name, &digest, &mut run).await;
            let stored = match &outcome {
                Ok(private) => Some(*private),
                // Every request that follows it says so; no warning per request.
                Err(Error::Offline(_)) => None,
                Err(e) => {
                    tracing::warn!(%digest, repo = %name, error = %crate::error::Chain(e), "blob download failed; nothing stored");
                    None
                }
            };
            this.blobs.end(&digest, &download, outcome.map(|_| ()));
            if let Some(private) = stored
                && run.from_upstream
                && let Some(bucket) = &this.replicas.bucket
                && let Some((path, size)) = this.blobs.stored_file(&digest)
            {
                bucket.upload(&digest, &path, size, private).await;
            }
            drop(run.lock);
        };
        // Boxed, as in `flight`: the download's state is large, and a task copies its future.
        tokio::spawn(Box::pin(task).in_current_span());
    }

    /// Receives, verifies and stores the blob, resuming a body that broke off; whether it is
    /// stored as private.
    async fn download(
        &self,
        mut incoming: Incoming,
        name: &RepoName,
        digest: &Digest,
        run: &mut Run,
    ) -> Result<bool, Error> {
        let mut source = self
            .open_source(name, digest, &incoming, false, run)
            .await?;
        let mut resumes = 0;
        loop {
            incoming.announce(source.size).map_err(write_failed)?;
            run.from_bucket |= source.from == From::Bucket;
            run.from_upstream |= source.from == From::Upstream;
            let Some(broken) = self.receive(&mut incoming, source).await? else {
                break;
            };
            if resumes == MAX_RESUMES {
                return Err(Error::from(upstream::Error::unreachable(
                    "body broke off",
                    format!(
                        "blob body broke off at {} bytes {MAX_RESUMES} times; last: {broken}",
                        incoming.received()
                    ),
                )));
            }
            // Followers keep streaming: resume where the body broke off instead of failing them.
            resumes += 1;
            tracing::warn!(%digest, received = incoming.received(), resumes, error = %broken, "blob stream broke off; resuming with a range request");
            source = self.open_source(name, digest, &incoming, true, run).await?;
        }
        match incoming.commit().await {
            Ok(private) => Ok(private),
            Err(e @ WriteError::Mismatch { .. }) if run.from_bucket => {
                // A damaged object costs this download, never a wrong byte, and only once.
                if let Some(bucket) = &self.replicas.bucket {
                    tracing::warn!(%digest, error = %e, "a blob in object storage does not match its digest; deleting it");
                    bucket.delete(digest).await;
                }
                Err(write_failed(e))
            }
            Err(e) => Err(write_failed(e)),
        }
    }

    /// Where the blob's bytes come from, from the start or (`resume`) from where the last body
    /// broke off: object storage if another replica stored it; else, in a cluster, the replica
    /// downloading it (streamed while it downloads) unless this replica takes the cluster lock;
    /// else upstream. Bytes fetched with credentials, from the bucket or another replica (with
    /// access control, any such bytes), are used only once upstream showed the blob in this
    /// repository (one HEAD), as for a stored blob.
    async fn open_source(
        &self,
        name: &RepoName,
        digest: &Digest,
        incoming: &Incoming,
        resume: bool,
        run: &mut Run,
    ) -> Result<Source, Error> {
        let source = self
            .pick_source(name, digest, incoming, resume, &mut run.lock)
            .await?;
        let foreign = self.restricted && source.from != From::Upstream;
        if (source.private || foreign) && !run.confirmed {
            self.upstream
                .head_blob(name, digest)
                .await
                .map_err(failure::blob)?;
            run.confirmed = true;
        }
        if source.private {
            incoming.mark_private();
        }
        Ok(source)
    }

    /// [`Self::open_source`] before the access check.
    async fn pick_source(
        &self,
        name: &RepoName,
        digest: &Digest,
        incoming: &Incoming,
        resume: bool,
        lock: &mut Option<Lock>,
    ) -> Result<Source, Error> {
        let (offset, known) = match resume {
            true => (incoming.received(), incoming.size()),
            false => (0, None),
        };
        // A holder that cannot be reached is waited for until its lock expired (it died).
        let deadline = Instant::now() + LOCK_TTL * 3;
        loop {
            if let Some(source) = self.bucket_body(digest, offset, known).await {
                return Ok(source);
            }
            let turn = match lock {
                None => self.claim_turn(&lock_key(digest)).await,
                Some(_) => Turn::Go(None),
            };
            match turn {
                Turn::Held(owner) if Instant::now() < deadline => {
                    match self.peer_body(&owner, digest, incoming, resume).await {
                        Ok(source) => return Ok(source),
                        Err(e) => {
                            tracing::debug!(%digest, owner, error = %e, "cannot follow the replica downloading a blob; waiting");
                            tokio::time::sleep(PEER_RETRY).await;
                            continue;
                        }
                    }
                }
                Turn::Go(Some(held)) => *lock = Some(held),
                _ => {}
            }
            return self.upstream_body(name, digest, incoming, resume).await;
        }
    }

    /// A blob's bytes from object storage from `offset`, when another replica stored it there
    /// (and its size is the one `known`, if any).
    async fn bucket_body(
        &self,
        digest: &Digest,
        offset: u64,
        known: Option<u64>,
    ) -> Option<Source> {
        let stored = self
            .replicas
            .bucket
            .as_ref()?
            .body_from(digest, offset)
            .await?;
        if known.is_some_and(|known| known != stored.size) {
            return None;
        }
        Some(Source {
            body: stored.body,
            size: Some(stored.size),
            skip: 0,
            from: From::Bucket,
            private: stored.private,
        })
    }

    /// The blob's bytes from the replica `owner`, which downloads or holds it.
    async fn peer_body(
        &self,
        owner: &str,
        digest: &Digest,
        incoming: &Incoming,
        resume: bool,
    ) -> Result<Source, String> {
        let peers = self.replicas.peers.as_ref().ok_or("not in a cluster")?;
        let from = resume.then(|| incoming.received());
        let (response, private) = peers.blob(owner, digest, from).await?;
        let (skip, size) = match resume {
            false if response.status() == reqwest::StatusCode::OK => (0, content_length(&response)),
            false => {
                let status = response.status();
                return Err(format!("answered {status} to a whole-blob request"));
            }
            true => {
                fit(&response, incoming.received(), incoming.size()).map_err(|e| e.to_string())?
            }
        };
        Ok(Source {
            body: response
                .bytes_stream()
                .map(|r| r.map_err(|e| e.to_string()))
                .boxed(),
            size,
            skip,
            from: From::Peer,
            private,
        })
    }

    /// The blob's bytes from upstream, all of them or (`resume`) the rest.
    async fn upstream_body(
        &self,
        name: &RepoName,
        digest: &Digest,
        incoming: &Incoming,
        resume: bool,
    ) -> Result<Source, Error> {
        let written = incoming.received();
        let range = match (resume, incoming.size()) {
            (false, _) => None,
            (true, Some(size)) => Some(format!("bytes={written}-{}", size.saturating_sub(1))),
            (true, None) => Some(format!("bytes={written}-")),
        };
        let exchange = self
            .upstream
            .get_blob(name, digest, range.as_deref())
            .await
            .map_err(failure::blob)?;
        let (skip, size) = match resume {
            false => (0, content_length(&exchange.response)),
            true => fit(&exchange.response, written, incoming.size())?,
        };
        Ok(Source {
            body: exchange_body(exchange),
            size,
            skip,
            from: From::Upstream,
            private: false,
        })
    }

    /// Receives one body into `incoming`. `Some(error)` when the body broke off. Bytes from
    /// upstream are counted as fetched from it.
    async fn receive(
        &self,
        incoming: &mut Incoming,
        source: Source,
    ) -> Result<Option<String>, Error> {
        let Source {
            mut body,
            mut skip,
            from,
            ..
        } = source;
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
            let len = chunk.len() as u64;
            incoming.push(chunk).await.map_err(write_failed)?;
            if from == From::Upstream {
                self.upstream.metrics.fetched(len);
            }
        }
        Ok(None)
    }

    /// For another replica (cluster-internal): the blob this replica holds or is downloading,
    /// never a new download, and whether it was fetched with credentials (the other replica
    /// then serves it only where upstream shows it); `None` when it has neither.
    pub async fn blob_for_peer(
        &self,
        digest: &Digest,
        range: Option<ByteRange>,
    ) -> Result<Option<(BlobBody, bool)>, Error> {
        let body = self.blobs.local_body(digest, range).await?;
        Ok(body.map(|body| (body, self.blobs.held_private(digest))))
    }

    /// The secret other replicas authenticate with; `None` outside a cluster.
    pub fn cluster_secret(&self) -> Option<&crate::config::Secret> {
        self.replicas.peers.as_ref().map(|p| &p.secret)
    }

    /// Drops a blob from this replica's store and from the bucket.
    pub(super) async fn drop_blob(&self, digest: &Digest) {
        if let Some(bucket) = &self.replicas.bucket {
            bucket.delete(digest).await;
        }
        self.blobs.purge(digest).await;
    }
}

/// The cluster lock of a blob's download.
fn lock_key(digest: &Digest) -> String {
    format!("pullthrough:lock:blob:{digest}")
}

/// What a failed write means to the client: the store's own failure, or upstream's bytes.
fn write_failed(e: WriteError) -> Error {
    match e {
        WriteError::Storage(e) => e,
        other => failure::invalid(other.to_string()),
    }
}

fn exchange_body(exchange: Exchange) -> BoxStream<'static, Result<Bytes, String>> {
    exchange
        .into_body()
        .map(|r| r.map_err(|e| e.to_string()))
        .boxed()
}

/// `Content-Length` of a response, if it is a plain number.
fn content_length(response: &reqwest::Response) -> Option<u64> {
    length(
        response
            .headers()
            .get(reqwest::header::CONTENT_LENGTH)?
            .to_str()
            .ok()?,
    )
}

/// A length header's value: digits only.
fn length(value: &str) -> Option<u64> {
    if value.is_empty() || !value.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    value.parse().ok()
}

/// Checks a resume's answer against what was received (`written` bytes of a blob of `size`,
/// if known): returns how many of its leading bytes to skip, and the blob's size as now known.
fn fit(
    response: &reqwest::Response,
    written: u64,
    size: Option<u64>,
) -> Result<(u64, Option<u64>), Error> {
    let content_range = response
        .headers()
        .get(reqwest::header::CONTENT_RANGE)
        .and_then(|v| v.to_str().ok());
    fit_parts(
        response.status().as_u16(),
        content_range,
        content_length(response),
        written,
        size,
    )
    .ok_or_else(|| failure::invalid("upstream answered a resume with an unusable range"))
}

/// [`fit`] on the answer's parts; `None` when it is unusable.
fn fit_parts(
    status: u16,
    content_range: Option<&str>,
    length: Option<u64>,
    written: u64,
    size: Option<u64>,
) -> Option<(u64, Option<u64>)> {
    match status {
        206 => {
            let content_range = ContentRange::parse(content_range?)?;
            let (first, last) = content_range.range?;
            let total = match (size, content_range.total) {
                (Some(size), Some(total)) if size != total => return None,
                (Some(size), _) => size,
                (None, Some(total)) => total,
                (None, None) => return None,
            };
            let fits = first == written
                && last.checked_add(1) == Some(total)
                && length.is_none_or(|l| Some(l) == (last - first).checked_add(1));
            fits.then_some((0, Some(total)))
        }
        200 => match (size, length) {
            (Some(size), Some(length)) if size != length => None,
            _ => Some((written, size.or(length))),
        },
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    type Case = (
        u16,
        Option<&'static str>,
        Option<u64>,
        u64,
        Option<u64>,
        Option<(u64, Option<u64>)>,
    );

    #[test]
    fn a_resume_fits_only_where_the_body_broke_off() {
        // (status, Content-Range, Content-Length, written, known size) -> (skip, size)
        let cases: &[Case] = &[
            (
                206,
                Some("bytes 4-9/10"),
                Some(6),
                4,
                Some(10),
                Some((0, Some(10))),
            ),
            (
                206,
                Some("bytes 4-9/10"),
                None,
                4,
                None,
                Some((0, Some(10))),
            ),
            (
                206,
                Some("bytes 4-9/*"),
                None,
                4,
                Some(10),
                Some((0, Some(10))),
            ),
            // Starts elsewhere, stops short, claims another size, or lies about its length.
            (206, Some("bytes 3-9/10"), None, 4, Some(10), None),
            (206, Some("bytes 4-8/10"), None, 4, Some(10), None),
            (206, Some("bytes 4-10/11"), None, 4, Some(10), None),
            (206, Some("bytes 4-9/10"), Some(7), 4, Some(10), None),
            (206, Some("bytes 4-9/*"), None, 4, None, None),
            (206, None, None, 4, Some(10), None),
            (206, Some("bytes */10"), None, 4, Some(10), None),
            // The whole blob again: its first bytes are skipped.
            (200, None, Some(10), 4, Some(10), Some((4, Some(10)))),
            (200, None, None, 4, None, Some((4, None))),
            (200, None, Some(10), 4, None, Some((4, Some(10)))),
            (200, None, Some(11), 4, Some(10), None),
            (416, None, None, 4, Some(10), None),
            (500, None, None, 4, Some(10), None),
        ];
        for &(status, range, length, written, size, want) in cases {
            assert_eq!(
                fit_parts(status, range, length, written, size),
                want,
                "{status} {range:?} {length:?} after {written} of {size:?}"
            );
        }
    }

    #[test]
    fn lengths_are_plain_digits() {
        let cases = [
            ("0", Some(0)),
            ("1048576", Some(1_048_576)),
            ("", None),
            ("+5", None),
            ("-1", None),
            (" 5", None),
            ("5 ", None),
            ("0x10", None),
            ("99999999999999999999", None),
        ];
        for (value, want) in cases {
            assert_eq!(length(value), want, "{value:?}");
        }
    }
}
