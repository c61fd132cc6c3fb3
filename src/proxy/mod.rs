//! Cache-or-fetch for manifests: the only module that knows both the caches and the upstream.
//! Policy: digests are served from cache forever; tags are fresh for `tag_ttl`, then served
//! stale while one background HEAD per tag revalidates; past `max_stale` a request waits for
//! upstream. Misses are single-flight, and no client waits longer than `upstream_deadline`.

mod blobs;
mod tags;

pub use blobs::BlobHead;
pub use tags::{TagsPage, TagsQuery};

use crate::blobs::BlobStore;
use crate::config::Config;
use crate::error::Error;
use crate::flight::Flights;
use crate::manifests::{Freshness, ManifestCache, TagEntry, TagPolicy, now_ms};
use crate::metrics::Counters;
use crate::registry::{
    Accept, Digest, Manifest, MediaType, Negotiation, Reference, RepoName, Tag, platform_child,
};
use crate::upstream::{self, Upstream};
use futures_util::future::Either;
use moka::sync::Cache;
use std::sync::Arc;
use std::time::{Duration, Instant};

/// Where an answer came from, sent to clients as `X-Cache`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CacheStatus {
    /// Served from cache, within freshness.
    Hit,
    /// Fetched from upstream.
    Miss,
    /// Upstream confirmed (or changed) an expired tag before the answer.
    Revalidated,
    /// Served from cache past freshness (revalidating, upstream failing, or budget held).
    Stale,
}

impl CacheStatus {
    /// The `X-Cache` value.
    pub fn as_str(self) -> &'static str {
        match self {
            CacheStatus::Hit => "HIT",
            CacheStatus::Miss => "MISS",
            CacheStatus::Revalidated => "REVALIDATED",
            CacheStatus::Stale => "STALE",
        }
    }
}

/// A manifest answer: the bytes, or for HEAD possibly only what describes them.
#[derive(Debug, Clone)]
pub enum ManifestBody {
    /// The whole manifest.
    Full(Arc<Manifest>),
    /// Digest, media type and size only (a HEAD answered without the bytes).
    Described {
        /// The digest.
        digest: Digest,
        /// The media type.
        media_type: MediaType,
        /// Length in bytes.
        size: u64,
    },
}

impl ManifestBody {
    /// The digest of the manifest.
    pub fn digest(&self) -> &Digest {
        match self {
            ManifestBody::Full(m) => &m.digest,
            ManifestBody::Described { digest, .. } => digest,
        }
    }
}

/// A served manifest and how it was obtained.
#[derive(Debug, Clone)]
pub struct Served {
    /// What to send.
    pub body: ManifestBody,
    /// How it was obtained.
    pub status: CacheStatus,
    /// Time spent waiting for upstream, if any.
    pub upstream_wait: Option<Duration>,
}

type TagKey = (RepoName, Tag);

/// The manifest side of pullthrough.
#[derive(Debug)]
pub struct Proxy {
    /// The upstream registry.
    pub upstream: Arc<Upstream>,
    /// The manifest cache.
    pub manifests: Arc<ManifestCache>,
    /// The blob store.
    pub blobs: Arc<BlobStore>,
    policy: TagPolicy,
    deadline: Duration,
    reserve: f64,
    tag_gets: Flights<TagKey, TagEntry>,
    tag_heads: Flights<TagKey, TagEntry>,
    digest_gets: Flights<(RepoName, Digest), Arc<Manifest>>,
    tag_pages: Cache<(RepoName, TagsQuery), Arc<TagsPage>>,
    tag_page_flights: Flights<(RepoName, TagsQuery), Arc<TagsPage>>,
    tags_ttl: Duration,
    /// Tags whose last revalidation failed: not retried until this expires.
    backoff: Cache<TagKey, ()>,
    /// Tags whose move was held back for the budget (logged once each).
    held_logged: Cache<TagKey, ()>,
}

/// A request for a manifest, as parsed at the edge.
#[derive(Debug, Clone)]
pub struct ManifestRequest<'a> {
    /// Repository.
    pub name: RepoName,
    /// Tag or digest.
    pub reference: Reference,
    /// The client's Accept lines.
    pub accept: Accept<'a>,
    /// GET (true) or HEAD (false).
    pub want_body: bool,
}

impl Proxy {
    /// Builds the proxy from configuration and the shared pieces.
    pub fn new(
        config: &Config,
        upstream: Arc<Upstream>,
        manifests: Arc<ManifestCache>,
        blobs: Arc<BlobStore>,
    ) -> anyhow::Result<Proxy> {
        let policy = TagPolicy {
            ttl: config.tag_ttl,
            max_stale: config.max_stale,
            immutable: regex::RegexSet::new(&config.immutable_tags)?,
        };
        let backoff_for = config.tag_ttl.min(Duration::from_secs(10));
        Ok(Proxy {
            upstream,
            manifests,
            blobs,
            policy,
            deadline: config.upstream_deadline,
            reserve: config.ratelimit_reserve,
            tag_gets: Flights::default(),
            tag_heads: Flights::default(),
            digest_gets: Flights::default(),
            tag_pages: Cache::builder()
                .time_to_live(
                    config
                        .tags_list_ttl
                        .max(config.tags_list_ttl + config.max_stale),
                )
                .max_capacity(10_000)
                .build(),
            tag_page_flights: Flights::default(),
            tags_ttl: config.tags_list_ttl,
            backoff: Cache::builder()
                .time_to_live(backoff_for)
                .max_capacity(100_000)
                .build(),
            held_logged: Cache::builder()
                .time_to_live(Duration::from_secs(3600))
                .max_capacity(100_000)
                .build(),
        })
    }

    /// Answers a manifest GET or HEAD.
    pub async fn manifest(self: &Arc<Self>, req: &ManifestRequest<'_>) -> Result<Served, Error> {
        let mut served = match &req.reference {
            Reference::Digest(d) => {
                self.by_digest(&req.name, d, &req.accept, req.want_body)
                    .await?
            }
            Reference::Tag(t) => {
                self.by_tag(&req.name, t, &req.accept, req.want_body)
                    .await?
            }
        };
        if req.want_body && served.status != CacheStatus::Miss {
            Counters::inc(&self.upstream.counters.pulls_saved);
        }
        if served.status == CacheStatus::Miss && served.upstream_wait.is_none() {
            served.upstream_wait = Some(Duration::ZERO);
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
        let (entry, mut status) = match cached {
            None => {
                let flight = if want_body {
                    Either::Left(self.fetch_tag(key))
                } else {
                    Either::Right(self.head_tag(key))
                };
                (self.within_deadline(flight).await?, CacheStatus::Miss)
            }
            Some(entry) => match self.policy.freshness(tag, entry.validated_at, now_ms()) {
                Freshness::Fresh => (entry, CacheStatus::Hit),
                Freshness::Stale => {
                    // After a failed revalidation the tag rests in `backoff`: stale because
                    // upstream failed, not because a revalidation is under way.
                    if self.backoff.contains_key(&key) {
                        Counters::inc(&self.upstream.counters.stale_upstream_error);
                    } else {
                        drop(self.revalidate(key));
                        Counters::inc(&self.upstream.counters.stale_revalidating);
                    }
                    (entry, CacheStatus::Stale)
                }
                Freshness::Expired => (
                    self.within_deadline(self.revalidate(key)).await?,
                    CacheStatus::Revalidated,
                ),
            },
        };
        if entry.held_back.is_some() {
            status = CacheStatus::Stale;
        }
        let waited = (status == CacheStatus::Miss || status == CacheStatus::Revalidated)
            .then(|| started.elapsed());
        let mut served = self
            .serve_entry(name, &entry, status, accept, want_body)
            .await?;
        served.upstream_wait = served.upstream_wait.or(waited);
        Ok(served)
    }

    /// Turns a tag entry into an answer, negotiating against the client's Accept.
    async fn serve_entry(
        self: &Arc<Self>,
        name: &RepoName,
        entry: &TagEntry,
        status: CacheStatus,
        accept: &Accept<'_>,
        want_body: bool,
    ) -> Result<Served, Error> {
        let digest = entry.digest.clone();
        let media_type = entry.media_type.clone();
        match accept.negotiate(&media_type, true) {
            Negotiation::Unacceptable(message) => Err(Error::ManifestUnknown(message.into())),
            Negotiation::Serve if !want_body => Ok(Served {
                body: ManifestBody::Described {
                    digest,
                    media_type,
                    size: entry.size,
                },
                status,
                upstream_wait: None,
            }),
            Negotiation::Serve => {
                let (manifest, fetched) = self.bytes_of(name, &digest).await?;
                let status = if fetched { CacheStatus::Miss } else { status };
                Ok(Served {
                    body: ManifestBody::Full(manifest),
                    status,
                    upstream_wait: None,
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
        let cached = match self.manifests.get(digest) {
            Some(m) if self.may_share(name, digest).await => Some(m),
            _ => None,
        };
        let (body, status) = match cached {
            Some(m) => (ManifestBody::Full(m), CacheStatus::Hit),
            None if !want_body => (self.describe(name, digest).await?, CacheStatus::Miss),
            None => (
                ManifestBody::Full(
                    self.within_deadline(self.fetch_digest(name, digest))
                        .await?,
                ),
                CacheStatus::Miss,
            ),
        };
        let media_type = match &body {
            ManifestBody::Full(m) => &m.media_type,
            ManifestBody::Described { media_type, .. } => media_type,
        };
        if let Negotiation::Unacceptable(message) = accept.negotiate(media_type, false) {
            return Err(Error::ManifestUnknown(message.into()));
        }
        let upstream_wait = (status == CacheStatus::Miss).then(|| started.elapsed());
        Ok(Served {
            body,
            status,
            upstream_wait,
        })
    }

    /// Content cached from one repository is served for another only when no credentials are
    /// configured (everything cached is public), or after upstream confirms access with a HEAD.
    async fn may_share(&self, name: &RepoName, digest: &Digest) -> bool {
        if !self.upstream.has_credentials() || self.manifests.granted(name, digest) {
            return true;
        }
        match self
            .upstream
            .head_manifest(name, &Reference::Digest(digest.clone()))
            .await
        {
            Ok(_) => {
                self.manifests.grant(name, digest);
                true
            }
            Err(_) => false,
        }
    }

    /// The bytes of a manifest: from cache, or fetched by digest. The flag says it was fetched.
    async fn bytes_of(
        self: &Arc<Self>,
        name: &RepoName,
        digest: &Digest,
    ) -> Result<(Arc<Manifest>, bool), Error> {
        match self.manifests.get(digest) {
            Some(m) => Ok((m, false)),
            None => Ok((
                self.within_deadline(self.fetch_digest(name, digest))
                    .await?,
                true,
            )),
        }
    }

    /// HEAD for an uncached digest: asks upstream with a HEAD, never a GET.
    async fn describe(
        self: &Arc<Self>,
        name: &RepoName,
        digest: &Digest,
    ) -> Result<ManifestBody, Error> {
        let head = tokio::time::timeout(
            self.deadline,
            self.upstream
                .head_manifest(name, &Reference::Digest(digest.clone())),
        )
        .await
        .map_err(|_| Error::GatewayTimeout)?
        .map_err(Error::manifest)?;
        match (head.media_type, head.size) {
            (Some(media_type), Some(size))
                if head.digest.as_ref().is_none_or(|d| d == digest) && size > 0 =>
            {
                Ok(ManifestBody::Described {
                    digest: digest.clone(),
                    media_type,
                    size,
                })
            }
            // An upstream HEAD without the headers clients need: fetch the bytes instead.
            _ => Ok(ManifestBody::Full(
                self.within_deadline(self.fetch_digest(name, digest))
                    .await?,
            )),
        }
    }

    async fn within_deadline<V>(
        &self,
        flight: impl Future<Output = Result<V, Error>>,
    ) -> Result<V, Error> {
        tokio::time::timeout(self.deadline, flight)
            .await
            .unwrap_or(Err(Error::GatewayTimeout))
    }

    /// GET by tag (single-flight): stores the manifest and the tag entry.
    fn fetch_tag(
        self: &Arc<Self>,
        key: TagKey,
    ) -> impl Future<Output = Result<TagEntry, Error>> + use<> {
        let this = Arc::clone(self);
        self.tag_gets.join(key.clone(), move || async move {
            let (name, tag) = key;
            let manifest = this
                .upstream
                .get_manifest(&name, &Reference::Tag(tag.clone()))
                .await
                .map_err(Error::manifest)?;
            let entry = TagEntry::new(
                &manifest.digest,
                &manifest.media_type,
                manifest.bytes.len() as u64,
            );
            this.manifests.put(manifest).await;
            this.manifests.set_tag(&name, &tag, entry.clone());
            Ok(entry)
        })
    }

    /// HEAD by tag for a client HEAD on an unknown tag (single-flight); falls back to a GET
    /// only if upstream's HEAD lacks the digest or length.
    fn head_tag(
        self: &Arc<Self>,
        key: TagKey,
    ) -> impl Future<Output = Result<TagEntry, Error>> + use<> {
        let this = Arc::clone(self);
        self.tag_heads.join(key.clone(), move || async move {
            let (name, tag) = key;
            let head = this
                .upstream
                .head_manifest(&name, &Reference::Tag(tag.clone()))
                .await
                .map_err(Error::manifest)?;
            match (head.digest, head.media_type, head.size) {
                (Some(digest), Some(media_type), Some(size)) if size > 0 => {
                    let entry = TagEntry::new(&digest, &media_type, size);
                    this.manifests.set_tag(&name, &tag, entry.clone());
                    Ok(entry)
                }
                _ => this.fetch_tag((name, tag)).await,
            }
        })
    }

    /// GET by digest (single-flight per repository and digest).
    fn fetch_digest(
        self: &Arc<Self>,
        name: &RepoName,
        digest: &Digest,
    ) -> impl Future<Output = Result<Arc<Manifest>, Error>> + use<> {
        let this = Arc::clone(self);
        let key = (name.clone(), digest.clone());
        self.digest_gets.join(key.clone(), move || async move {
            let (name, digest) = key;
            let manifest = this
                .upstream
                .get_manifest(&name, &Reference::Digest(digest.clone()))
                .await
                .map_err(Error::manifest)?;
            this.manifests.grant(&name, &digest);
            Ok(this.manifests.put(manifest).await)
        })
    }

    /// Revalidates a tag with one upstream HEAD (single-flight per tag). An unchanged digest
    /// refreshes the entry; a moved one is taken (its manifest fetched first if the old one
    /// was cached), unless the rate-limit budget is below the reserve.
    fn revalidate(
        self: &Arc<Self>,
        key: TagKey,
    ) -> impl Future<Output = Result<TagEntry, Error>> + use<> {
        let this = Arc::clone(self);
        self.tag_heads.join(key.clone(), move || async move {
            let outcome = this.revalidate_now(&key).await;
            if outcome.is_err() {
                this.backoff.insert(key, ());
            }
            outcome
        })
    }

    async fn revalidate_now(self: &Arc<Self>, key: &TagKey) -> Result<TagEntry, Error> {
        let (name, tag) = key;
        let Some(mut entry) = self.manifests.tag(name, tag) else {
            return self.fetch_tag(key.clone()).await;
        };
        let head = match self
            .upstream
            .head_manifest(name, &Reference::Tag(tag.clone()))
            .await
        {
            Ok(head) => head,
            Err(e @ (upstream::Error::NotFound | upstream::Error::Denied)) => {
                tracing::info!(repo = %name, %tag, "tag is gone upstream; forgetting it");
                self.manifests.remove_tag(name, tag);
                return Err(Error::manifest(e));
            }
            Err(e) => {
                tracing::warn!(repo = %name, %tag, error = %e, "tag revalidation failed");
                return Err(Error::manifest(e));
            }
        };
        let Some(new_digest) = head.digest.clone() else {
            return self.fetch_tag(key.clone()).await;
        };
        if new_digest == entry.digest {
            entry.validated_at = now_ms();
            entry.held_back = None;
            self.manifests.set_tag(name, tag, entry.clone());
            return Ok(entry);
        }
        if self.upstream.limits.below_reserve(self.reserve) {
            if self.held_logged.get(key).is_none() {
                self.held_logged.insert(key.clone(), ());
                tracing::warn!(repo = %name, %tag, cached = %entry.digest, upstream = %new_digest, "tag moved upstream but the rate-limit budget is below the reserve; serving the cached digest");
            }
            Counters::inc(&self.upstream.counters.stale_budget);
            entry.validated_at = now_ms();
            entry.held_back = Some(new_digest.clone());
            self.manifests.set_tag(name, tag, entry.clone());
            return Ok(entry);
        }
        let had_bytes = self.manifests.get(&entry.digest).is_some();
        let new_entry = match (head.media_type, head.size) {
            (Some(media_type), Some(size)) if !had_bytes && size > 0 => {
                TagEntry::new(&new_digest, &media_type, size)
            }
            _ => {
                let manifest = self.fetch_digest(name, &new_digest).await?;
                TagEntry::new(
                    &manifest.digest,
                    &manifest.media_type,
                    manifest.bytes.len() as u64,
                )
            }
        };
        tracing::info!(repo = %name, %tag, from = %entry.digest, to = %new_entry.digest, "tag moved upstream");
        self.manifests.set_tag(name, tag, new_entry.clone());
        Ok(new_entry)
    }
}
