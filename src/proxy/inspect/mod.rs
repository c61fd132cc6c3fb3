//! Looking into the cache without touching upstream, for the cache API: listing tags with
//! their freshness and use, one entry with its platforms and blobs (`list`), what a pull would
//! cost upstream right now (`explain`), a referrers list (`referrers`), and purging (`purge`). A purge never breaks a pull in
//! progress: open files stay readable, downloads under way finish, and what is gone is fetched
//! again.

mod explain;
mod list;
mod purge;
mod referrers;

pub use explain::Explain;
pub use list::{EntryView, ListQuery, Listing, list};
pub use purge::Purge;
pub use referrers::ReferrersView;

use super::Proxy;
use crate::clock::now_ms;
use crate::manifests::{Freshness, TagEntry};
use crate::registry::{Digest, RepoName, Tag};
use serde::Serialize;
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
}
