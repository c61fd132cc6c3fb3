//! Cache-or-fetch for manifests, blobs, tags and referrers lists: the only module that knows
//! both the caches and the upstream. Policy: digests are served from cache forever; tags (and
//! referrers lists) are fresh for `tag_ttl`, then served stale while one background HEAD per tag
//! revalidates; past `max_stale` a request waits for upstream. Misses are single-flight and run
//! as their own tasks, so the HTTP edge can bound every request by `upstream_deadline` while the
//! fetch goes on. A 404 upstream just gave is remembered for `negative_ttl`; while offline no
//! tag expires and misses are 503 (`missing`).

mod blob_fetch;
mod blobs;
mod failure;
mod fetch;
mod inspect;
mod lookup;
mod missing;
mod prefetch;
mod referrers;
mod tags;

pub use blobs::BlobHead;
pub use inspect::{EntryView, Explain, ListQuery, Listing, Purge, ReferrersView, TagView, list};
pub use referrers::ReferrersAnswer;
pub use tags::{TagsPage, TagsQuery};

use crate::blobs::BlobStore;
use crate::cluster::Replicas;
use crate::config::Config;
use crate::flight::Flights;
use crate::manifests::{ManifestCache, Referrers, TagEntry, TagPolicy};
pub use crate::metrics::Outcome;
use crate::registry::{Accept, Digest, Manifest, MediaType, Reference, RepoName, Tag};
use crate::upstream::Upstream;
use moka::sync::Cache;
use std::sync::Arc;
use std::time::Duration;

/// Whether a manifest size from an upstream HEAD can be believed: a lie (0, or more than any
/// manifest may be) means the bytes are fetched instead of the HEAD's word taken.
pub(crate) fn plausible(size: u64) -> bool {
    size > 0 && size <= crate::upstream::MAX_MANIFEST_BYTES as u64
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
    pub status: Outcome,
    /// Time spent waiting for upstream, if any.
    pub upstream_wait: Option<Duration>,
    /// A tag had moved upstream: its new content cost a fetch, so this is no pull saved.
    pub moved: bool,
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
    /// The bucket and the other replicas, when there are.
    pub replicas: Arc<Replicas>,
    policy: TagPolicy,
    /// The upstream's host, as the cache API names it.
    upstream_name: String,
    /// What listings put before `repository:tag` (`ghcr.io/`; nothing for the default).
    list_prefix: String,
    /// The tags-list copy is served stale a little before this request-wide deadline.
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
    /// Referrers lists being fetched, and those whose last fetch failed (as `backoff`).
    referrers_flights: Flights<(RepoName, Digest), Arc<Referrers>>,
    referrers_backoff: Cache<(RepoName, Digest), ()>,
    /// Tags whose move was held back for the budget (logged once each).
    held_logged: Cache<TagKey, ()>,
    /// Access control is on: cached content reaches a repository only where its upstream
    /// shows it there (one HEAD, remembered), whoever fetched it.
    restricted: bool,
    /// `prefetch_on_move`.
    prefetch_on_move: bool,
    /// Blob downloads all prefetches may run at once.
    prefetch_places: tokio::sync::Semaphore,
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
    /// Names this proxy's upstream as clients do (`ghcr.io`); `default` for the top-level one.
    pub fn named(mut self, name: &str, default: bool) -> Proxy {
        self.upstream_name = name.to_owned();
        if !default {
            self.list_prefix = format!("{name}/");
        }
        self
    }

    /// The registry name this proxy stands for.
    pub fn name(&self) -> &str {
        &self.upstream_name
    }

    /// Builds the proxy from configuration and the shared pieces.
    pub fn new(
        config: &Config,
        upstream: Arc<Upstream>,
        manifests: Arc<ManifestCache>,
        blobs: Arc<BlobStore>,
        replicas: Arc<Replicas>,
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
            replicas,
            policy,
            upstream_name: config.upstream.host_str().unwrap_or_default().to_owned(),
            list_prefix: String::new(),
            deadline: config.upstream_deadline,
            reserve: config.ratelimit_reserve,
            tag_gets: Flights::default(),
            tag_heads: Flights::default(),
            digest_gets: Flights::default(),
            // Weighed in bytes: a page can be megabytes (a repository with 30,000 tags).
            tag_pages: Cache::builder()
                .time_to_live(config.tags_list_ttl.saturating_add(config.max_stale))
                .weigher(
                    |(name, query): &(RepoName, TagsQuery), page: &Arc<TagsPage>| {
                        let bytes = page.body.len()
                            + page.link.as_ref().map_or(0, String::len)
                            + name.as_str().len()
                            + query.last.as_ref().map_or(0, |t| t.as_str().len())
                            + 256;
                        u32::try_from(bytes).unwrap_or(u32::MAX)
                    },
                )
                .max_capacity(config.tags_list_cache_bytes.as_u64())
                .build(),
            tag_page_flights: Flights::default(),
            tags_ttl: config.tags_list_ttl,
            backoff: Cache::builder()
                .time_to_live(backoff_for)
                .max_capacity(100_000)
                .build(),
            referrers_flights: Flights::default(),
            referrers_backoff: Cache::builder()
                .time_to_live(backoff_for)
                .max_capacity(100_000)
                .build(),
            held_logged: Cache::builder()
                .time_to_live(Duration::from_secs(3600))
                .max_capacity(100_000)
                .build(),
            restricted: config.access_control(),
            prefetch_on_move: config.prefetch_on_move,
            prefetch_places: tokio::sync::Semaphore::new(prefetch::PREFETCH_PLACES),
        })
    }
}
