//! The counters as the stats endpoint and the status page show them: summed into plain numbers
//! by upstream (or over all of them), keyed by label.

use super::UpstreamFailure;
use super::labels::upstream_status;
use super::{Metrics, Outcome, PerUpstream, RequestCounters, RequestKind, StaleCause, get};
use serde::Serialize;
use std::collections::BTreeMap;

/// Hits, misses, revalidations and stale answers of one kind of request.
#[derive(Debug, Clone, Default, Serialize)]
pub struct OutcomeCounts {
    /// Served from cache within freshness.
    pub hit: u64,
    /// Fetched from upstream.
    pub miss: u64,
    /// Revalidated with upstream first.
    pub revalidated: u64,
    /// Served stale.
    pub stale: u64,
    /// `(hit + stale) / (hit + stale + miss + revalidated)`, when there was any.
    pub hit_ratio: Option<f64>,
}

impl OutcomeCounts {
    fn add(&mut self, outcome: Outcome, n: u64) {
        match outcome {
            Outcome::Hit => self.hit += n,
            Outcome::Miss => self.miss += n,
            Outcome::Revalidated => self.revalidated += n,
            Outcome::Stale => self.stale += n,
        }
        let total = self.hit + self.miss + self.revalidated + self.stale;
        self.hit_ratio = (total > 0).then(|| (self.hit + self.stale) as f64 / total as f64);
    }
}

/// What was counted for one upstream (or summed over all).
#[derive(Debug, Clone, Serialize)]
pub struct UpstreamCounts {
    /// Client requests with a cache outcome, by kind.
    pub requests: BTreeMap<&'static str, OutcomeCounts>,
    /// Client manifest GETs answered without an upstream GET (Docker Hub pulls saved).
    pub pulls_saved: u64,
    /// Upstream requests by kind and status (`error`: no answer).
    pub upstream_requests: BTreeMap<&'static str, BTreeMap<String, u64>>,
    /// Stale answers by cause.
    pub stale: BTreeMap<&'static str, u64>,
    /// Blob bytes received from upstream.
    pub blob_bytes_fetched: u64,
    /// Manifests fetched ahead of clients after a tag moved (`prefetch_on_move`).
    pub prefetched_manifests: u64,
    /// Blobs fetched ahead of clients after a tag moved.
    pub prefetched_blobs: u64,
    /// Requests answered from the negative cache (an upstream 404 remembered for
    /// `negative_ttl`), without asking upstream.
    pub negative_cache_hits: u64,
}

impl UpstreamCounts {
    /// Nothing counted yet: every kind of request and every stale cause at zero.
    fn zero() -> UpstreamCounts {
        UpstreamCounts {
            requests: RequestKind::ALL
                .iter()
                .map(|k| (k.label(), OutcomeCounts::default()))
                .collect(),
            pulls_saved: 0,
            upstream_requests: BTreeMap::new(),
            stale: StaleCause::ALL.iter().map(|c| (c.label(), 0)).collect(),
            blob_bytes_fetched: 0,
            prefetched_manifests: 0,
            prefetched_blobs: 0,
            negative_cache_hits: 0,
        }
    }

    /// Adds an upstream's client requests with a cache outcome, by kind.
    fn add_requests(&mut self, requests: &RequestCounters) {
        for (kind, by_method) in requests.iter() {
            let counts = self.requests.entry(kind.label()).or_default();
            for by_outcome in by_method.values() {
                for (outcome, by_status) in by_outcome.iter() {
                    if let Some(outcome) = outcome {
                        counts.add(outcome, by_status.values().map(get).sum());
                    }
                }
            }
        }
    }

    /// Adds an upstream's own counters: its requests upstream, stale answers and pulls saved.
    fn add_upstream(&mut self, own: &PerUpstream) {
        for ((kind, status), n) in own.requests.lock().iter() {
            *self
                .upstream_requests
                .entry(kind.label())
                .or_default()
                .entry(upstream_status(*status))
                .or_default() += n;
        }
        for (cause, n) in own.stale.iter() {
            *self.stale.entry(cause.label()).or_default() += get(n);
        }
        self.pulls_saved += get(&own.pulls_saved);
        self.blob_bytes_fetched += get(&own.bytes_fetched);
        self.prefetched_manifests += get(&own.prefetched_manifests);
        self.prefetched_blobs += get(&own.prefetched_blobs);
        self.negative_cache_hits += get(&own.negative_hits);
    }
}

/// A snapshot of the counters.
#[derive(Debug, Clone, Serialize)]
pub struct Counts {
    /// Seconds since start.
    pub uptime_secs: u64,
    /// Summed over the upstreams.
    #[serde(flatten)]
    pub totals: UpstreamCounts,
    /// Blob bytes sent from the store.
    pub blob_bytes_served_from_cache: u64,
    /// Blob bytes sent while they were being fetched.
    pub blob_bytes_served_while_fetching: u64,
    /// Blobs evicted.
    pub evictions: u64,
    /// Bytes evicted.
    pub evicted_bytes: u64,
    /// The last upstream failures, newest first.
    pub recent_upstream_errors: Vec<UpstreamFailure>,
}

impl Metrics {
    /// The counters of the upstreams `which` selects (by index), summed.
    fn upstream_counts(&self, which: impl Fn(usize) -> bool) -> UpstreamCounts {
        let mut counts = UpstreamCounts::zero();
        let selected = self.per_upstream.iter().zip(&self.requests).enumerate();
        for (_, (own, requests)) in selected.filter(|(u, _)| which(*u)) {
            counts.add_requests(requests);
            counts.add_upstream(own);
        }
        counts
    }

    /// The counters of upstream `index` alone.
    pub fn snapshot_upstream(&self, index: usize) -> UpstreamCounts {
        self.upstream_counts(|u| u == index)
    }

    /// The counters as the stats endpoint and the status page show them, summed over upstreams.
    pub fn snapshot(&self) -> Counts {
        Counts {
            uptime_secs: self.started.elapsed().map_or(0, |d| d.as_secs()),
            totals: self.upstream_counts(|_| true),
            blob_bytes_served_from_cache: get(&self.bytes_served_hit),
            blob_bytes_served_while_fetching: get(&self.bytes_served_miss),
            evictions: get(&self.evictions),
            evicted_bytes: get(&self.evicted_bytes),
            recent_upstream_errors: self.recent_errors.lock().iter().rev().cloned().collect(),
        }
    }
}
