//! What the proxy does instead of asking upstream: while offline (tags never expire, nothing
//! is revalidated, and what is not cached is named in the 503), and for what upstream said a
//! moment ago is not there (the negative cache, consulted before a fetch and filled by the
//! fetches' own 404s, inside their single flight).

use super::{Proxy, failure};
use crate::clock::now_ms;
use crate::error::Error;
use crate::manifests::{Freshness, Missing};
use crate::registry::{RepoName, Tag};
use crate::upstream;

impl Proxy {
    /// Whether upstream answered a genuine 404 for `what` in `name` within `negative_ttl`;
    /// a hit is counted. For every kind of content the negative cache remembers (the
    /// referrers API too: check with [`Missing::Referrers`] before asking upstream, and
    /// [`Self::remember_missing`] the upstream failure after).
    pub(super) fn remembered_missing(&self, name: &RepoName, what: &Missing) -> bool {
        let hit = self.manifests.negative.contains(name, what);
        if hit {
            self.upstream.metrics.negative_hit();
        }
        hit
    }

    /// Remembers `what` as missing from `name` when `e` is the registry's own 404 (never a
    /// 401/403, a 429, a 5xx, or a 404 page of something in front of the registry).
    pub(super) fn remember_missing(&self, name: &RepoName, what: &Missing, e: &upstream::Error) {
        if matches!(e, upstream::Error::NotFound { registry: true }) {
            self.manifests.negative.remember(name, what);
        }
    }

    /// A failed manifest request upstream: remembered when it was a 404, and what the client
    /// is told.
    pub(super) fn manifest_failed(
        &self,
        name: &RepoName,
        what: &Missing,
        e: upstream::Error,
    ) -> Error {
        self.remember_missing(name, what, &e);
        failure::manifest(e)
    }

    /// How far a cached tag can be trusted now. While offline no tag expires: past `tag_ttl`
    /// it is stale, whatever its age, since upstream cannot be asked.
    pub(super) fn freshness(&self, tag: &Tag, validated_at: u64) -> Freshness {
        match self.policy.freshness(tag, validated_at, now_ms()) {
            Freshness::Expired if self.upstream.offline() => Freshness::Stale,
            freshness => freshness,
        }
    }

    /// Whether pullthrough is offline now.
    pub(super) fn offline(&self) -> bool {
        self.upstream.offline()
    }
}
