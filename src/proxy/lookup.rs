//! Answering a manifest request from the caches: tag freshness, Accept negotiation, and when
//! to wait for (or only start) an upstream operation.

use super::failure;
use super::{ManifestBody, ManifestRequest, Proxy, Served, plausible};
use crate::error::Error;
use crate::manifests::{Freshness, Missing, TagEntry};
use crate::metrics::{Outcome, StaleCause};
use crate::registry::{
    Accept, Digest, Manifest, Negotiation, Reference, RepoName, Tag, platform_child,
};
use crate::upstream;
use futures_util::future::Either;
use std::sync::Arc;
use std::time::Instant;

impl Proxy {
    /// Answers a manifest GET or HEAD.
    pub async fn manifest(self: &Arc<Self>, req: &ManifestRequest<'_>) -> Result<Served, Error> {
        let served = match &req.reference {
            Reference::Digest(d) => {
                self.by_digest(&req.name, d, &req.accept, req.want_body)
                    .await
            }
            Reference::Tag(t) => self.by_tag(&req.name, t, &req.accept, req.want_body).await,
        };
        let served = served.map_err(|e| {
            failure::offline(e, || match &req.reference {
                Reference::Tag(t) => format!("{}:{t}", req.name),
                Reference::Digest(d) => format!("{}@{d}", req.name),
            })
        })?;
        // A tag that moved brought new content: that is a fetch, not a pull saved.
        if req.want_body && served.status != Outcome::Miss && !served.moved {
            self.upstream.metrics.pull_saved();
        }
        Ok(served)
    }

    async fn by_tag(
        self: &Arc<Self>,
        name: &RepoName,
        tag: &Tag,
        accept: &Accept<'_>,
        want_body: bool,
    ) -> Result<Served, Error> {
        let key = (name.clone(), tag.clone());
        let cached = self.manifests.tag(name, tag);
        let started = Instant::now();
        let mut moved = false;
        let (entry, mut status) = match cached {
            // Paths that reach upstream are boxed: their futures are large, and inline they
            // would make every hit's future (allocated and moved per request) as large.
            None => {
                if self.remembered_missing(name, &Missing::Tag(tag.clone())) {
                    return Err(failure::manifest_unknown());
                }
                let flight = if want_body {
                    Either::Left(Box::pin(self.fetch_tag(key)))
                } else {
                    Either::Right(Box::pin(self.head_tag(key)))
                };
                (flight.await?, Outcome::Miss)
            }
            Some(entry) => match self.freshness(tag, entry.validated_at) {
                Freshness::Fresh => (entry, Outcome::Hit),
                Freshness::Stale => {
                    // After a failed revalidation the tag rests in `backoff`: stale because
                    // upstream failed, not because a revalidation is under way. Offline,
                    // nothing revalidates.
                    if self.offline() {
                        self.upstream.metrics.stale(StaleCause::Offline);
                    } else if self.backoff.contains_key(&key) {
                        self.upstream.metrics.stale(StaleCause::UpstreamError);
                    } else {
                        drop(self.revalidate(key));
                        self.upstream.metrics.stale(StaleCause::Revalidating);
                    }
                    (entry, Outcome::Stale)
                }
                Freshness::Expired => {
                    let revalidated = Box::pin(self.revalidate(key)).await?;
                    moved = revalidated.digest != entry.digest;
                    (revalidated, Outcome::Revalidated)
                }
            },
        };
        if entry.held_back.is_some() {
            status = Outcome::Stale;
        }
        let mut served = self
            .serve_entry(name, &entry, status, accept, want_body)
            .await?;
        // Measured after negotiation too: a fresh tag whose bytes had to be fetched waited.
        if matches!(served.status, Outcome::Miss | Outcome::Revalidated) {
            served.upstream_wait.get_or_insert(started.elapsed());
        }
        served.moved = moved;
        // Counted only for answers the tag's entry gave (so invented tag names cost nothing).
        self.manifests.touch(name, tag);
        Ok(served)
    }

    /// Turns a tag entry into an answer, negotiating against the client's Accept.
    async fn serve_entry(
        self: &Arc<Self>,
        name: &RepoName,
        entry: &TagEntry,
        status: Outcome,
        accept: &Accept<'_>,
        want_body: bool,
    ) -> Result<Served, Error> {
        let digest = entry.digest.clone();
        let media_type = entry.media_type.clone();
        match accept.negotiate(&media_type, true) {
            Negotiation::Unacceptable(message) => Err(Error::ManifestUnknown(message.into())),
            Negotiation::Serve if !want_body => Ok(Served {
                // From memory when it is there: its header texts are made already.
                body: match self.manifests.in_memory(&digest) {
                    Some(m) => ManifestBody::Full(m),
                    None => ManifestBody::Described {
                        digest,
                        media_type,
                        size: entry.size,
                    },
                },
                status,
                upstream_wait: None,
                moved: false,
            }),
            Negotiation::Serve => {
                let (manifest, fetched) = self.bytes_of(name, &digest).await?;
                let status = if fetched { Outcome::Miss } else { status };
                Ok(Served {
                    body: ManifestBody::Full(manifest),
                    status,
                    upstream_wait: None,
                    moved: false,
                })
            }
            Negotiation::PlatformChild => {
                let (list, _) = self.bytes_of(name, &digest).await?;
                let child = platform_child(&list.bytes).ok_or_else(|| {
                    Error::ManifestUnknown("manifest list has no linux/amd64 manifest".into())
                })?;
                Box::pin(self.by_digest(name, &child, &Accept::default(), want_body)).await
            }
        }
    }

    async fn by_digest(
        self: &Arc<Self>,
        name: &RepoName,
        digest: &Digest,
        accept: &Accept<'_>,
        want_body: bool,
    ) -> Result<Served, Error> {
        let started = Instant::now();
        let cached = self.manifests.get(digest).await;
        if cached.is_none() && self.remembered_missing(name, &Missing::Manifest(digest.clone())) {
            return Err(failure::manifest_unknown());
        }
        if cached.is_some() {
            let reference = Reference::Digest(digest.clone());
            let confirm = || Box::pin(self.upstream.head_manifest(name, &reference));
            let private_possible = self.restricted || self.upstream.has_credentials();
            self.may_share(name, digest, private_possible, confirm)
                .await
                .map_err(failure::manifest)?;
        }
        let (body, status) = match cached {
            Some(m) => (ManifestBody::Full(m), Outcome::Hit),
            None if !want_body => (Box::pin(self.describe(name, digest)).await?, Outcome::Miss),
            None => (
                ManifestBody::Full(Box::pin(self.fetch_digest(name, digest)).await?),
                Outcome::Miss,
            ),
        };
        let media_type = match &body {
            ManifestBody::Full(m) => &m.media_type,
            ManifestBody::Described { media_type, .. } => media_type,
        };
        if let Negotiation::Unacceptable(message) = accept.negotiate(media_type, false) {
            return Err(Error::ManifestUnknown(message.into()));
        }
        let upstream_wait = (status == Outcome::Miss).then(|| started.elapsed());
        Ok(Served {
            body,
            status,
            upstream_wait,
            moved: false,
        })
    }

    /// Content cached from one repository is served for another only when it cannot be private
    /// (`private_possible` false: no credentials anywhere it could have come from), or after
    /// upstream confirms access with the HEAD `confirm` makes (made and polled only then).
    /// Manifests and blobs share this rule and its grants.
    pub(super) async fn may_share<F>(
        &self,
        name: &RepoName,
        digest: &Digest,
        private_possible: bool,
        confirm: impl FnOnce() -> F,
    ) -> Result<(), upstream::Error>
    where
        F: Future<Output = Result<upstream::Head, upstream::Error>>,
    {
        if private_possible && !self.manifests.granted(name, digest) {
            confirm().await?;
            self.manifests.grant(name, digest);
        }
        Ok(())
    }

    /// The bytes of a manifest: from cache, or fetched by digest. The flag says it was fetched.
    async fn bytes_of(
        self: &Arc<Self>,
        name: &RepoName,
        digest: &Digest,
    ) -> Result<(Arc<Manifest>, bool), Error> {
        match self.manifests.get(digest).await {
            Some(m) => Ok((m, false)),
            None => Ok((Box::pin(self.fetch_digest(name, digest)).await?, true)),
        }
    }

    /// HEAD for an uncached digest: asks upstream with a HEAD, never a GET.
    async fn describe(
        self: &Arc<Self>,
        name: &RepoName,
        digest: &Digest,
    ) -> Result<ManifestBody, Error> {
        let head = match self
            .upstream
            .head_manifest(name, &Reference::Digest(digest.clone()))
            .await
        {
            Ok(head) => head,
            Err(e) => {
                return Err(self.manifest_failed(name, &Missing::Manifest(digest.clone()), e));
            }
        };
        match (head.media_type, head.size) {
            (Some(media_type), Some(size))
                if head.digest.as_ref().is_none_or(|d| d == digest) && plausible(size) =>
            {
                Ok(ManifestBody::Described {
                    digest: digest.clone(),
                    media_type,
                    size,
                })
            }
            // An upstream HEAD without the headers clients need: fetch the bytes instead.
            _ => Ok(ManifestBody::Full(self.fetch_digest(name, digest).await?)),
        }
    }
}
