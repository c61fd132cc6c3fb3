//! Listings of the cache: pages of tags across upstreams, a repository's tags, the most pulled
//! tags, and one entry in detail with its platforms and blobs.

use super::TagView;
use crate::clock::now_ms;
use crate::manifests::{Freshness, TagEntry};
use crate::proxy::Proxy;
use crate::registry::{Contents, Descriptor, Digest, Reference, RepoName, Tag};
use serde::Serialize;
use std::sync::Arc;

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
    let (page, next) = page(matching, |(key, ..)| key, query.after.as_deref(), limit);
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

impl Proxy {
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
            Reference::Tag(t) => match self.manifests.tag(name, t) {
                Some(e) => {
                    let cached = self.manifests.has_manifest(&e.digest).await;
                    (Some(self.tag_view(name, t, &e, cached)), Some(e.digest))
                }
                None => (None, None),
            },
            Reference::Digest(d) => (None, Some(d.clone())),
        };
        let manifest = match &digest {
            Some(d) => self.manifests.get(d).await,
            None => None,
        };
        let (mut platforms, mut blobs) = (None, None);
        match manifest.as_ref().and_then(|m| Contents::parse(&m.bytes)) {
            Some(Contents::Index(children)) => {
                platforms = Some(self.platform_views(children).await)
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

    /// The platform manifests of an index, each with its blobs once its manifest is cached.
    async fn platform_views(&self, children: Vec<Descriptor>) -> Vec<PlatformView> {
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
        views
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
}

/// The page of `sorted` (ordered by `key`) that starts after key `after`, at most `limit`
/// long, and the key to continue after when more follow.
fn page<T>(
    sorted: Vec<T>,
    key: impl Fn(&T) -> &String,
    after: Option<&str>,
    limit: usize,
) -> (Vec<T>, Option<String>) {
    let total = sorted.len();
    let start = after.map_or(0, |after| {
        sorted
            .iter()
            .position(|item| key(item).as_str() > after)
            .unwrap_or(total)
    });
    let page: Vec<T> = sorted.into_iter().skip(start).take(limit).collect();
    let next = (start + page.len() < total)
        .then(|| page.last().map(|item| key(item).clone()))
        .flatten();
    (page, next)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pages_resume_after_the_last_key() {
        let keys: Vec<String> = ["a:1", "a:2", "b:1", "c:1", "c:2"].map(String::from).into();
        let walk = |after: Option<&str>, limit| page(keys.clone(), |k| k, after, limit);
        assert_eq!(
            walk(None, 2),
            (vec!["a:1".into(), "a:2".into()], Some("a:2".into()))
        );
        assert_eq!(
            walk(Some("a:2"), 2),
            (vec!["b:1".into(), "c:1".into()], Some("c:1".into()))
        );
        assert_eq!(walk(Some("c:1"), 2), (vec!["c:2".into()], None));
        // A key that is gone since (purged) resumes at the next one.
        assert_eq!(
            walk(Some("b:0"), 1),
            (vec!["b:1".into()], Some("b:1".into()))
        );
        assert_eq!(walk(Some("z"), 2), (vec![], None));
        assert_eq!(walk(None, 5).1, None);
    }
}
