//! Looking into the cache without touching upstream, for the cache API: listing tags with
//! their freshness and use, one entry with its platforms and blobs, what a pull would cost
//! upstream right now (`explain`), and purging. A purge never breaks a pull in progress: open
//! files stay readable, downloads under way finish, and what is gone is fetched again.

use super::Proxy;
use crate::clock::now_ms;
use crate::manifests::{Freshness, TagEntry};
use crate::registry::{Contents, Descriptor, Digest, Reference, RepoName, Tag, platform_matches};
use serde::Serialize;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

/// A tag as the cache API shows it.
#[derive(Debug, Clone, Serialize)]
pub struct TagView {
    /// The upstream registry.
    pub upstream: String,
    /// Repository.
    pub repository: String,
    /// Tag.
    pub tag: String,
    /// The digest the tag points to.
    pub digest: Digest,
    /// Its media type.
    pub media_type: String,
    /// Its size in bytes.
    pub size: u64,
    /// When the digest was first fetched.
    pub fetched_at: String,
    /// When upstream last confirmed it.
    pub validated_at: String,
    /// `fresh`, `stale` (served while revalidating) or `expired` (a pull waits for upstream).
    pub freshness: &'static str,
    /// The manifest's bytes are cached.
    pub manifest_cached: bool,
    /// Client requests answered for the tag since start.
    pub hits: u64,
    /// The last one.
    pub last_access: Option<String>,
    /// A newer digest upstream has, held back for the rate-limit budget.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub held_back: Option<Digest>,
}

/// Filters and paging of a listing.
#[derive(Debug, Clone, Default)]
pub struct ListQuery {
    /// Repositories starting with this.
    pub prefix: Option<String>,
    /// Only stale (and expired) entries, or only fresh ones.
    pub stale: Option<bool>,
    /// Page size (1 to 1000; 100 by default).
    pub limit: Option<usize>,
    /// Continue after this `repository:tag` (the previous page's `next`).
    pub after: Option<String>,
}

/// A page of tags.
#[derive(Debug, Clone, Serialize)]
pub struct Listing {
    /// Entries matching the filters, in this page.
    pub entries: Vec<TagView>,
    /// Entries matching the filters, in all pages.
    pub total: usize,
    /// Pass as `after` for the next page.
    pub next: Option<String>,
}

/// A platform manifest of an index, and how much of it is cached.
#[derive(Debug, Clone, Serialize)]
pub struct PlatformView {
    /// The index entry.
    #[serde(flatten)]
    pub descriptor: Descriptor,
    /// Its manifest's bytes are cached.
    pub manifest_cached: bool,
    /// Its blobs (known once its manifest is cached).
    pub blobs: Option<Vec<BlobView>>,
}

/// A blob of an image, and whether the store has it.
#[derive(Debug, Clone, Serialize)]
pub struct BlobView {
    /// The descriptor.
    #[serde(flatten)]
    pub descriptor: Descriptor,
    /// In the blob store.
    pub cached: bool,
}

/// One cache entry in detail.
#[derive(Debug, Clone, Serialize)]
pub struct EntryView {
    /// Repository.
    pub repository: String,
    /// The reference asked about.
    pub reference: String,
    /// The tag's index entry, for a tag.
    pub tag: Option<TagView>,
    /// The manifest digest, when known.
    pub digest: Option<Digest>,
    /// The manifest's bytes are cached.
    pub manifest_cached: bool,
    /// For an index or list: its platform manifests.
    pub platforms: Option<Vec<PlatformView>>,
    /// For an image manifest: its config and layers.
    pub blobs: Option<Vec<BlobView>>,
}

/// One upstream request a pull would make.
#[derive(Debug, Clone, Serialize)]
pub struct Step {
    /// `GET` or `HEAD`.
    pub method: &'static str,
    /// `manifest` or `blob`.
    pub kind: &'static str,
    /// Tag or digest.
    pub reference: String,
    /// Why.
    pub why: &'static str,
}

/// What a pull of a reference would cost upstream now.
#[derive(Debug, Clone, Serialize)]
pub struct Explain {
    /// The platform a pull resolves an index to.
    pub platform: String,
    /// Why the pull would fail, from the cache alone (the index lacks the platform).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    /// The upstream requests, in order.
    pub upstream_requests: Vec<Step>,
    /// Manifest GETs among them (what Docker Hub counts as pulls).
    pub manifest_gets: usize,
    /// Blob GETs among them.
    pub blob_gets: usize,
    /// Bytes those blob GETs would fetch (as the manifests declare them).
    pub blob_bytes: u64,
    /// Whether more requests may follow that cannot be known without upstream (a manifest not
    /// cached yet names blobs that are not known yet).
    pub more_unknown: bool,
    /// One line.
    pub summary: String,
}

/// What a purge removes (or, in a dry run, would remove).
#[derive(Debug, Clone, Default, Serialize)]
pub struct Purge {
    /// `repository:tag` entries.
    pub tags: Vec<String>,
    /// Manifest digests.
    pub manifests: Vec<Digest>,
    /// Blob digests.
    pub blobs: Vec<Digest>,
}

/// A page of the tags of every proxy in `proxies` whose repository is `visible`, ordered by
/// `[host/]repository:tag`.
pub async fn list(
    proxies: &[Arc<Proxy>],
    query: &ListQuery,
    visible: &(dyn Fn(&Proxy, &RepoName) -> bool + Sync),
) -> Listing {
    let limit = query.limit.unwrap_or(100).clamp(1, 1000);
    let mut matching: Vec<(String, usize, RepoName, Tag, TagEntry)> = proxies
        .iter()
        .enumerate()
        .flat_map(|(i, p)| {
            p.matching(query)
                .into_iter()
                .filter(|(_, name, ..)| visible(p, name))
                .map(move |(key, n, t, e)| (key, i, n, t, e))
        })
        .collect();
    // Paged by the key text, so the order and `after` agree.
    matching.sort_by(|a, b| a.0.cmp(&b.0));
    let total = matching.len();
    let start = query.after.as_deref().map_or(0, |after| {
        matching
            .iter()
            .position(|(key, ..)| key.as_str() > after)
            .unwrap_or(total)
    });
    let page: Vec<_> = matching.into_iter().skip(start).take(limit).collect();
    let next = (start + page.len() < total)
        .then(|| page.last().map(|(key, ..)| key.clone()))
        .flatten();
    let mut entries = Vec::with_capacity(page.len());
    for (_, i, name, tag, entry) in &page {
        let proxy = &proxies[*i];
        let cached = proxy.manifests.has_manifest(&entry.digest).await;
        entries.push(proxy.tag_view(name, tag, entry, cached));
    }
    Listing {
        entries,
        total,
        next,
    }
}

fn rfc3339(ms: u64) -> String {
    // Tag files are read from disk: a time past the year 9999 (which humantime cannot print)
    // is shown as that year's end, never a panic.
    const LAST_PRINTABLE_MS: u64 = 253_402_300_799_000;
    humantime::format_rfc3339_seconds(
        SystemTime::UNIX_EPOCH + Duration::from_millis(ms.min(LAST_PRINTABLE_MS)),
    )
    .to_string()
}

impl Proxy {
    fn tag_view(&self, name: &RepoName, tag: &Tag, entry: &TagEntry, cached: bool) -> TagView {
        let freshness = match self.policy.freshness(tag, entry.validated_at, now_ms()) {
            Freshness::Fresh => "fresh",
            Freshness::Stale => "stale",
            Freshness::Expired => "expired",
        };
        let (hits, last_access) = self.manifests.usage(name, tag);
        TagView {
            upstream: self.upstream_name.clone(),
            repository: name.as_str().to_owned(),
            tag: tag.as_str().to_owned(),
            digest: entry.digest.clone(),
            media_type: entry.media_type.to_string(),
            size: entry.size,
            fetched_at: rfc3339(entry.fetched_at),
            validated_at: rfc3339(entry.validated_at),
            freshness,
            manifest_cached: cached,
            hits,
            last_access: last_access.map(rfc3339),
            held_back: entry.held_back.clone(),
        }
    }

    /// Every cached tag of repository `name` (by the exact name: a prefix listing would take
    /// `alpine-x` with `alpine` and the upstream's host prefix into account).
    pub async fn repository(&self, name: &RepoName) -> Vec<TagView> {
        let mut views = Vec::new();
        for (n, tag, entry) in self.manifests.all_tags() {
            if n == *name {
                let cached = self.manifests.has_manifest(&entry.digest).await;
                views.push(self.tag_view(&n, &tag, &entry, cached));
            }
        }
        views
    }

    /// The tags matching `query`, keyed by the text listings are ordered and resumed by:
    /// `[host/]repository:tag` (the host prefix for upstreams other than the default).
    fn matching(&self, query: &ListQuery) -> Vec<(String, RepoName, Tag, TagEntry)> {
        let now = now_ms();
        self.manifests
            .all_tags()
            .into_iter()
            .filter(|(name, _, _)| {
                // The prefix applies to `[host/]repository`, as the listing shows it.
                query
                    .prefix
                    .as_deref()
                    .is_none_or(|p| format!("{}{}", self.list_prefix, name.as_str()).starts_with(p))
            })
            .filter(|(_, tag, entry)| {
                let fresh = self.policy.freshness(tag, entry.validated_at, now) == Freshness::Fresh;
                query.stale.is_none_or(|stale| stale != fresh)
            })
            .map(|(n, t, e)| {
                let key = format!("{}{}:{}", self.list_prefix, n.as_str(), t.as_str());
                (key, n, t, e)
            })
            .collect()
    }

    /// The `n` tags served most since start, most first (no disk access).
    pub fn most_pulled(&self, n: usize, visible: impl Fn(&RepoName) -> bool) -> Vec<TagView> {
        let mut all: Vec<(u64, RepoName, Tag, TagEntry)> = self
            .manifests
            .all_tags()
            .into_iter()
            .map(|(name, tag, entry)| (self.manifests.usage(&name, &tag).0, name, tag, entry))
            .filter(|(hits, name, ..)| *hits > 0 && visible(name))
            .collect();
        all.sort_by(|a, b| b.0.cmp(&a.0).then_with(|| (&a.1, &a.2).cmp(&(&b.1, &b.2))));
        all.into_iter()
            .take(n)
            .map(|(_, name, tag, entry)| {
                let cached = self.manifests.has_manifest_in_memory(&entry.digest);
                self.tag_view(&name, &tag, &entry, cached)
            })
            .collect()
    }

    /// One entry: a tag or a digest, with its platforms or blobs.
    pub async fn entry(&self, name: &RepoName, reference: &Reference) -> EntryView {
        let (tag, digest) = match reference {
            Reference::Tag(t) => {
                let entry = self.manifests.tag(name, t);
                let digest = entry.as_ref().map(|e| e.digest.clone());
                let view = match &entry {
                    Some(e) => {
                        let cached = self.manifests.has_manifest(&e.digest).await;
                        Some(self.tag_view(name, t, e, cached))
                    }
                    None => None,
                };
                (view, digest)
            }
            Reference::Digest(d) => (None, Some(d.clone())),
        };
        let manifest = match &digest {
            Some(d) => self.manifests.get(d).await,
            None => None,
        };
        let (mut platforms, mut blobs) = (None, None);
        match manifest.as_ref().and_then(|m| Contents::parse(&m.bytes)) {
            Some(Contents::Index(children)) => {
                let mut views = Vec::with_capacity(children.len());
                for child in children {
                    let child_manifest = self.manifests.get(&child.digest).await;
                    let child_blobs = match child_manifest.and_then(|m| Contents::parse(&m.bytes)) {
                        Some(Contents::Image(descriptors)) => Some(self.blob_views(descriptors)),
                        _ => None,
                    };
                    views.push(PlatformView {
                        manifest_cached: self.manifests.has_manifest(&child.digest).await,
                        descriptor: child,
                        blobs: child_blobs,
                    });
                }
                platforms = Some(views);
            }
            Some(Contents::Image(descriptors)) => blobs = Some(self.blob_views(descriptors)),
            None => {}
        }
        EntryView {
            repository: name.as_str().to_owned(),
            reference: reference.to_string(),
            tag,
            manifest_cached: manifest.is_some(),
            digest,
            platforms,
            blobs,
        }
    }

    fn blob_views(&self, descriptors: Vec<Descriptor>) -> Vec<BlobView> {
        descriptors
            .into_iter()
            .map(|descriptor| BlobView {
                cached: self.blobs.contains(&descriptor.digest),
                descriptor,
            })
            .collect()
    }

    /// What a pull of `reference` for `platform` would ask upstream now, from the cache alone.
    pub async fn explain(&self, name: &RepoName, reference: &Reference, platform: &str) -> Explain {
        let mut steps = Vec::new();
        let mut more_unknown = false;
        let mut step = |method, kind, reference: String, why| {
            steps.push(Step {
                method,
                kind,
                reference,
                why,
            });
        };
        let digest = match reference {
            Reference::Digest(d) => Some(d.clone()),
            Reference::Tag(t) => match self.manifests.tag(name, t) {
                None => {
                    step("GET", "manifest", t.to_string(), "tag not cached");
                    more_unknown = true;
                    None
                }
                Some(entry) => {
                    match self.policy.freshness(t, entry.validated_at, now_ms()) {
                        Freshness::Fresh => {}
                        // A revalidation that failed lately is not retried before its backoff ends.
                        Freshness::Stale
                            if self.backoff.contains_key(&(name.clone(), t.clone())) => {}
                        Freshness::Stale => step(
                            "HEAD",
                            "manifest",
                            t.to_string(),
                            "tag past tag_ttl: revalidated in the background (the pull does not wait)",
                        ),
                        Freshness::Expired => step(
                            "HEAD",
                            "manifest",
                            t.to_string(),
                            "tag past max_stale: the pull waits for this revalidation",
                        ),
                    }
                    Some(entry.digest)
                }
            },
        };
        let mut blob_bytes: u64 = 0;
        let mut error: Option<String> = None;
        if let Some(digest) = digest {
            let mut current = Some(digest);
            // An index resolves to one platform's manifest, whose blobs are then pulled.
            while let Some(d) = current.take() {
                let Some(manifest) = self.manifests.get(&d).await else {
                    step("GET", "manifest", d.to_string(), "manifest not cached");
                    more_unknown = true;
                    break;
                };
                match Contents::parse(&manifest.bytes) {
                    Some(Contents::Index(children)) => {
                        current = children
                            .into_iter()
                            .find(|c| {
                                c.platform
                                    .as_deref()
                                    .is_some_and(|p| platform_matches(p, platform))
                            })
                            .map(|c| c.digest);
                        if current.is_none() {
                            error = Some(format!(
                                "the index has no manifest for {platform}: a pull for it fails"
                            ));
                        }
                    }
                    Some(Contents::Image(descriptors)) => {
                        for blob in descriptors {
                            if !self.blobs.contains(&blob.digest) {
                                // Sizes come from manifest JSON: never wrap.
                                blob_bytes = blob_bytes.saturating_add(blob.size);
                                step("GET", "blob", blob.digest.to_string(), "blob not cached");
                            }
                        }
                    }
                    None => {}
                }
            }
        }
        let manifest_gets = steps
            .iter()
            .filter(|s| s.method == "GET" && s.kind == "manifest")
            .count();
        let blob_gets = steps.iter().filter(|s| s.kind == "blob").count();
        let heads = steps.len() - manifest_gets - blob_gets;
        let summary = if let Some(error) = &error {
            error.clone()
        } else if steps.is_empty() {
            "no upstream request: everything is cached and fresh".to_owned()
        } else {
            // Docker Hub counts manifest GETs as pulls; other registries say what they count.
            let pulls = if self.upstream.known_docker_hub() {
                " (Docker Hub pulls)"
            } else {
                ""
            };
            format!(
                "{manifest_gets} manifest GET(s){pulls}, {heads} HEAD(s), {blob_gets} blob GET(s) ({blob_bytes} bytes){}",
                if more_unknown {
                    ", and more once the missing manifests are known"
                } else {
                    ""
                }
            )
        };
        Explain {
            platform: platform.to_owned(),
            error,
            upstream_requests: steps,
            manifest_gets,
            blob_gets,
            blob_bytes,
            more_unknown,
            summary,
        }
    }

    /// Purges every tag of a repository, and the manifests no other tag points to.
    pub async fn purge_repository(&self, name: &RepoName, dry_run: bool) -> Purge {
        let all = self.manifests.all_tags();
        let (gone, kept): (Vec<_>, Vec<_>) = all.into_iter().partition(|(n, _, _)| n == name);
        let mut purge = Purge::default();
        for (n, t, entry) in &gone {
            purge.tags.push(format!("{}:{}", n.as_str(), t.as_str()));
            if !kept.iter().any(|(_, _, e)| e.digest == entry.digest)
                && !purge.manifests.contains(&entry.digest)
            {
                purge.manifests.push(entry.digest.clone());
            }
        }
        if !dry_run {
            for (n, t, _) in &gone {
                self.manifests.remove_tag(n, t).await;
                self.announce("tag", n.as_str(), t.as_str()).await;
            }
            for d in &purge.manifests {
                self.manifests.remove_manifest(d).await;
                self.announce("manifest", "", &d.to_string()).await;
            }
        }
        purge
    }

    /// Purges a tag (the manifest stays for other tags and digest pulls), or a manifest by
    /// digest with the tags of `name` that point to it.
    pub async fn purge_manifest(
        &self,
        name: &RepoName,
        reference: &Reference,
        dry_run: bool,
    ) -> Purge {
        let mut purge = Purge::default();
        let tags: Vec<(RepoName, Tag)> = match reference {
            // Known here, or (with object storage) to another replica.
            Reference::Tag(t) => {
                if self.manifests.tag(name, t).is_some()
                    || self.manifests.shared_tag(name, t).await.is_some()
                {
                    vec![(name.clone(), t.clone())]
                } else {
                    Vec::new()
                }
            }
            Reference::Digest(d) => {
                if self.manifests.has_manifest(d).await {
                    purge.manifests.push(d.clone());
                }
                self.manifests
                    .all_tags()
                    .into_iter()
                    .filter(|(n, _, e)| n == name && e.digest == *d)
                    .map(|(n, t, _)| (n, t))
                    .collect()
            }
        };
        purge.tags = tags
            .iter()
            .map(|(n, t)| format!("{}:{}", n.as_str(), t.as_str()))
            .collect();
        if !dry_run {
            for (n, t) in &tags {
                self.manifests.remove_tag(n, t).await;
                self.announce("tag", n.as_str(), t.as_str()).await;
            }
            for d in &purge.manifests {
                self.manifests.remove_manifest(d).await;
                self.announce("manifest", "", &d.to_string()).await;
            }
        }
        purge
    }

    /// Tells the other replicas, in a cluster, to drop what this purge removed here.
    async fn announce(&self, kind: &str, name: &str, reference: &str) {
        if let Some(cluster) = self.replicas.cluster() {
            let purged = crate::cluster::Purged {
                kind: kind.to_owned(),
                upstream: self.name().to_owned(),
                name: name.to_owned(),
                reference: reference.to_owned(),
            };
            cluster.announce(&purged).await;
        }
    }

    /// Applies a purge another replica announced (its upstream is this proxy's).
    pub async fn apply_purge(&self, purged: &crate::cluster::Purged) {
        match purged.kind.as_str() {
            "tag" => {
                if let (Ok(name), Ok(tag)) = (
                    RepoName::parse(&purged.name, false),
                    Tag::parse(&purged.reference),
                ) {
                    self.manifests.remove_tag(&name, &tag).await;
                }
            }
            "manifest" => {
                if let Ok(digest) = purged.reference.parse::<Digest>() {
                    self.manifests.remove_manifest(&digest).await;
                }
            }
            "blob" => {
                if let Ok(digest) = purged.reference.parse::<Digest>() {
                    self.blobs.purge(&digest).await;
                }
            }
            _ => {}
        }
    }

    /// Purges a blob from the store.
    pub async fn purge_blob(&self, digest: &Digest, dry_run: bool) -> Purge {
        let mut purge = Purge::default();
        if self.blobs.contains(digest) {
            purge.blobs.push(digest.clone());
            if !dry_run {
                self.drop_blob(digest).await;
                self.announce("blob", "", &digest.to_string()).await;
            }
        }
        purge
    }
}
