//! The negative cache: upstream 404s for tags, manifests by digest and referrers subjects,
//! remembered for `negative_ttl` per upstream and repository, so a storm of requests for
//! something missing (a typo in a deployment, a CI matrix) costs one upstream request per TTL.
//! Bounded by `negative_cache_entries`, least recently used forgotten first; memory only (a
//! restart forgets every entry, and each replica remembers its own).
//!
//! The key needs no client identity: upstream is always asked with the upstream's own
//! credential (never a client's), so its 404 is the same for every client, and a client that
//! may not pull a repository is refused at the edge before the negative cache is consulted.

use crate::registry::{Digest, RepoName, Tag};
use moka::policy::EvictionPolicy;
use moka::sync::Cache;
use std::sync::Arc;
use std::time::Duration;

/// What upstream said is not there, in one repository.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Missing {
    /// A tag (`GET`/`HEAD /v2/<name>/manifests/<tag>` was a 404).
    Tag(Tag),
    /// A manifest by digest.
    Manifest(Digest),
    /// The referrers of a subject digest (for the referrers API).
    Referrers(Digest),
}

impl Missing {
    /// How a purge answer lists it: `repo:tag`, `repo@digest`, `repo referrers of digest`.
    fn describe(&self, name: &RepoName) -> String {
        match self {
            Missing::Tag(t) => format!("{name}:{t}"),
            Missing::Manifest(d) => format!("{name}@{d}"),
            Missing::Referrers(d) => format!("{name} referrers of {d}"),
        }
    }
}

/// (upstream, repository, what): the upstream as its manifest cache's object storage prefix
/// (`""` for the default, `upstreams/<host>/` for the others), unique per upstream.
type Key = (Arc<str>, RepoName, Missing);

/// Upstream 404s of every upstream, under one bound. Off (remembers nothing) when
/// `negative_ttl` or `negative_cache_entries` is zero.
#[derive(Debug, Default)]
pub struct NegativeCache {
    entries: Option<Cache<Key, ()>>,
}

impl NegativeCache {
    /// A cache remembering each 404 for `ttl`, at most `capacity` of them.
    pub fn new(ttl: Duration, capacity: u64) -> NegativeCache {
        let entries = (!ttl.is_zero() && capacity > 0).then(|| {
            Cache::builder()
                .time_to_live(ttl)
                .max_capacity(capacity)
                .eviction_policy(EvictionPolicy::lru())
                .build()
        });
        NegativeCache { entries }
    }

    /// Remembered 404s now (expired ones may still count until the next maintenance).
    pub fn len(&self) -> u64 {
        self.entries.as_ref().map_or(0, |e| {
            e.run_pending_tasks();
            e.entry_count()
        })
    }

    /// Whether nothing is remembered.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// One upstream's part of the [`NegativeCache`].
#[derive(Debug, Clone, Default)]
pub struct Negative {
    cache: Arc<NegativeCache>,
    upstream: Arc<str>,
}

impl Negative {
    /// The part of `cache` of the upstream named `upstream` (any name unique among them).
    pub fn new(cache: Arc<NegativeCache>, upstream: &str) -> Negative {
        Negative {
            cache,
            upstream: upstream.into(),
        }
    }

    fn key(&self, name: &RepoName, what: &Missing) -> Key {
        (Arc::clone(&self.upstream), name.clone(), what.clone())
    }

    /// 404s remembered now, of every upstream.
    pub fn entries(&self) -> u64 {
        self.cache.len()
    }

    /// Whether upstream said `what` is not in `name` less than `negative_ttl` ago.
    pub fn contains(&self, name: &RepoName, what: &Missing) -> bool {
        // `get`, not `contains_key`: a hit makes the entry the most recently used.
        let Some(entries) = &self.cache.entries else {
            return false;
        };
        entries.get(&self.key(name, what)).is_some()
    }

    /// Remembers that upstream said `what` is not in `name`.
    pub fn remember(&self, name: &RepoName, what: &Missing) {
        if let Some(entries) = &self.cache.entries {
            entries.insert(self.key(name, what), ());
        }
    }

    /// Forgets what is remembered of `name`: `what`, or (`None`) everything. Returns what was
    /// (or, with `dry_run`, would be) forgotten, as a purge answer lists it.
    pub fn forget(&self, name: &RepoName, what: Option<&Missing>, dry_run: bool) -> Vec<String> {
        let Some(entries) = &self.cache.entries else {
            return Vec::new();
        };
        let keys: Vec<Key> = match what {
            Some(what) => {
                let key = self.key(name, what);
                entries
                    .contains_key(&key)
                    .then_some(key)
                    .into_iter()
                    .collect()
            }
            None => entries
                .iter()
                .filter(|(k, _)| k.0 == self.upstream && k.1 == *name)
                .map(|(k, _)| (*k).clone())
                .collect(),
        };
        if !dry_run {
            keys.iter().for_each(|k| entries.invalidate(k));
        }
        let mut forgotten: Vec<String> = keys.iter().map(|(_, n, w)| w.describe(n)).collect();
        forgotten.sort();
        forgotten
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn name(n: &str) -> RepoName {
        RepoName::parse(n, false).unwrap()
    }

    #[test]
    fn remembers_per_upstream_and_repository() {
        let cache = Arc::new(NegativeCache::new(Duration::from_secs(60), 100));
        let (hub, ghcr) = (
            Negative::new(Arc::clone(&cache), ""),
            Negative::new(Arc::clone(&cache), "upstreams/ghcr.io/"),
        );
        let tag = Missing::Tag(Tag::parse("nope").unwrap());
        hub.remember(&name("a/b"), &tag);
        assert!(hub.contains(&name("a/b"), &tag));
        assert!(!hub.contains(&name("a/c"), &tag), "another repository");
        assert!(!ghcr.contains(&name("a/b"), &tag), "another upstream");
        let digest = Missing::Manifest(Digest::sha256(b"x"));
        assert!(!hub.contains(&name("a/b"), &digest), "another reference");
        hub.remember(&name("a/b"), &digest);
        ghcr.remember(&name("a/b"), &tag);
        assert_eq!(hub.forget(&name("a/b"), None, true).len(), 2);
        assert!(
            hub.contains(&name("a/b"), &tag),
            "a dry run forgets nothing"
        );
        let forgotten = hub.forget(&name("a/b"), None, false);
        assert_eq!(
            forgotten,
            [
                "a/b:nope".to_owned(),
                format!("a/b@{}", Digest::sha256(b"x"))
            ]
        );
        assert!(!hub.contains(&name("a/b"), &tag));
        assert!(
            ghcr.contains(&name("a/b"), &tag),
            "the other upstream's stays"
        );
        assert_eq!(ghcr.forget(&name("a/b"), Some(&tag), false), ["a/b:nope"]);
        assert!(ghcr.forget(&name("a/b"), Some(&tag), false).is_empty());
    }

    #[test]
    fn zero_turns_it_off() {
        for cache in [
            NegativeCache::new(Duration::ZERO, 100),
            NegativeCache::new(Duration::from_secs(1), 0),
        ] {
            let negative = Negative::new(Arc::new(cache), "");
            let tag = Missing::Tag(Tag::parse("x").unwrap());
            negative.remember(&name("a/b"), &tag);
            assert!(!negative.contains(&name("a/b"), &tag));
        }
    }

    #[test]
    fn forgets_after_its_ttl_and_beyond_its_bound() {
        let negative = Negative::new(
            Arc::new(NegativeCache::new(Duration::from_millis(50), 10)),
            "",
        );
        let tag = |i: usize| Missing::Tag(Tag::parse(&format!("t{i}")).unwrap());
        negative.remember(&name("a/b"), &tag(0));
        std::thread::sleep(Duration::from_millis(80));
        assert!(!negative.contains(&name("a/b"), &tag(0)));
        let bounded = Negative::new(
            Arc::new(NegativeCache::new(Duration::from_secs(60), 10)),
            "",
        );
        for i in 0..100 {
            bounded.remember(&name("a/b"), &tag(i));
        }
        assert!(bounded.cache.len() <= 10, "{}", bounded.cache.len());
        assert!(bounded.contains(&name("a/b"), &tag(99)), "the newest stays");
    }
}
