//! The manifest cache: a digest → manifest store (exact bytes; RAM bounded by bytes, every
//! entry also on disk) and a separate tag → digest index with fetch and validation times, so
//! a manifest shared by several tags is held once. Digest entries never go stale; tag
//! freshness is decided by [`TagPolicy`].
//!
//! `store` holds the cache and its manifests, `tags` the tag index in the same cache,
//! `referrers` the referrers lists (OCI 1.1) of each subject, `intents` the order its files are
//! written and removed in, `freshness` the TTL policy, and `negative` the upstream 404s
//! remembered for a while (`negative_ttl`).

mod freshness;
mod intents;
mod negative;
mod referrers;
mod store;
mod tags;

pub use freshness::{Freshness, TagPolicy};
pub use negative::{Missing, Negative, NegativeCache};
pub use referrers::{Referrers, ReferrersEntry, TagIndex};
pub use store::ManifestCache;
pub use tags::{SharedTag, TagEntry, TagUsage};
