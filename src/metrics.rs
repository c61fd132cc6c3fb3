//! Counters kept in the application state (no globals): what was asked of the upstream, what
//! the cache saved, and why stale content was served.

use std::sync::atomic::{AtomicU64, Ordering};

/// Counters for one upstream.
#[derive(Debug, Default)]
pub struct Counters {
    /// Token requests sent to a realm.
    pub token_requests: AtomicU64,
    /// Manifest GETs sent upstream (these are what Docker Hub counts as pulls).
    pub manifest_gets: AtomicU64,
    /// Manifest HEADs sent upstream (free on Docker Hub).
    pub manifest_heads: AtomicU64,
    /// Blob GETs sent upstream.
    pub blob_gets: AtomicU64,
    /// Blob HEADs sent upstream.
    pub blob_heads: AtomicU64,
    /// Tags-list requests sent upstream.
    pub tag_lists: AtomicU64,
    /// Client manifest GETs answered without an upstream GET.
    pub pulls_saved: AtomicU64,
    /// Stale answers because revalidation was under way.
    pub stale_revalidating: AtomicU64,
    /// Stale answers because upstream failed or was too slow.
    pub stale_upstream_error: AtomicU64,
    /// Stale answers because the rate-limit budget was below the reserve.
    pub stale_budget: AtomicU64,
    /// Blob bytes sent to clients from the store.
    pub blob_bytes_served: AtomicU64,
    /// Blob bytes received from upstream.
    pub blob_bytes_fetched: AtomicU64,
}

impl Counters {
    /// Adds one to `counter`.
    pub fn inc(counter: &AtomicU64) {
        counter.fetch_add(1, Ordering::Relaxed);
    }

    /// Adds `n` to `counter`.
    pub fn add(counter: &AtomicU64, n: u64) {
        counter.fetch_add(n, Ordering::Relaxed);
    }

    /// All counters by name, for logs and the metrics endpoint.
    pub fn snapshot(&self) -> Vec<(&'static str, u64)> {
        let get = |c: &AtomicU64| c.load(Ordering::Relaxed);
        vec![
            ("upstream_token_requests", get(&self.token_requests)),
            ("upstream_manifest_gets", get(&self.manifest_gets)),
            ("upstream_manifest_heads", get(&self.manifest_heads)),
            ("upstream_blob_gets", get(&self.blob_gets)),
            ("upstream_blob_heads", get(&self.blob_heads)),
            ("upstream_tag_lists", get(&self.tag_lists)),
            ("pulls_saved", get(&self.pulls_saved)),
            ("stale_revalidating", get(&self.stale_revalidating)),
            ("stale_upstream_error", get(&self.stale_upstream_error)),
            ("stale_budget", get(&self.stale_budget)),
            ("blob_bytes_served", get(&self.blob_bytes_served)),
            ("blob_bytes_fetched", get(&self.blob_bytes_fetched)),
        ]
    }
}
