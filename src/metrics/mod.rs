//! What pullthrough counts, in one place: client requests by kind, method, status and cache
//! outcome, with latencies; upstream requests by kind and status, with latencies; bytes served
//! and fetched; pulls saved; stale answers by cause; evictions; and the last upstream errors.
//! Counters are lock-free atomics held in the application state (no globals), each reached
//! through its labels (`keyed`); the stats endpoint, `/metrics` and the status page all read
//! them from here. Also the one vocabulary for a cache outcome, [`Outcome`], rendered in one
//! place.

mod counts;
mod exposition;
mod histogram;
mod keyed;
mod labels;

pub use counts::{Counts, OutcomeCounts, UpstreamCounts};
pub use exposition::{Gauges, UpstreamGauges, render_prometheus};
pub use labels::{Outcome, RequestKind, StaleCause, UpstreamKind};

use histogram::Histogram;
use keyed::PerKey;
use labels::{Method, Status};
use parking_lot::Mutex;
use serde::Serialize;
use std::collections::{BTreeMap, VecDeque};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, SystemTime};

/// Upstream errors remembered for the status page.
const RECENT_ERRORS: usize = 20;

/// One upstream failure, for the status page.
#[derive(Debug, Clone, Serialize)]
pub struct UpstreamFailure {
    /// When (seconds since the Unix epoch).
    pub at: u64,
    /// Which upstream (the registry host it stands for).
    pub upstream: String,
    /// What was asked.
    pub kind: UpstreamKind,
    /// The status upstream answered (absent when it did not answer).
    pub status: Option<u16>,
    /// What went wrong, without URLs' secrets (none are in URLs) or tokens.
    pub error: String,
}

/// Client request counters by status (`other` last).
type ByStatus = PerKey<Status, AtomicU64, { Status::ALL.len() }>;
/// ... by cache outcome (none last), then status.
type ByOutcome = PerKey<Option<Outcome>, ByStatus, { Outcome::ALL.len() + 1 }>;
/// ... by method, cache outcome and status.
type ByMethod = PerKey<Method, ByOutcome, { Method::ALL.len() }>;
/// The client request counters of one upstream (or of requests routed to none): by kind,
/// method, cache outcome and status.
type RequestCounters = PerKey<RequestKind, ByMethod, { RequestKind::ALL.len() }>;

/// The counters of one upstream.
#[derive(Debug, Default)]
struct PerUpstream {
    requests: Mutex<BTreeMap<(UpstreamKind, u16), u64>>,
    latency: PerKey<UpstreamKind, Histogram, { UpstreamKind::ALL.len() }>,
    stale: PerKey<StaleCause, AtomicU64, { StaleCause::ALL.len() }>,
    pulls_saved: AtomicU64,
    bytes_fetched: AtomicU64,
    prefetched_manifests: AtomicU64,
    prefetched_blobs: AtomicU64,
    /// Requests answered from the negative cache (a remembered upstream 404).
    negative_hits: AtomicU64,
}

/// Every counter. Client requests carry the upstream they were routed to (or none, for `/v2/`,
/// the cache API and the like); upstream requests, stale answers, pulls saved and fetched bytes
/// are kept per upstream; the blob store is shared, so its bytes and evictions are not.
#[derive(Debug)]
pub struct Metrics {
    started: SystemTime,
    /// The upstreams' names (the registry hosts), the default first.
    hosts: Vec<String>,
    /// Client requests per upstream, in the order of `hosts`, then those routed to none.
    requests: Box<[RequestCounters]>,
    latency: PerKey<RequestKind, Histogram, { RequestKind::ALL.len() }>,
    per_upstream: Box<[PerUpstream]>,
    bytes_served_hit: AtomicU64,
    bytes_served_miss: AtomicU64,
    evictions: AtomicU64,
    evicted_bytes: AtomicU64,
    recent_errors: Mutex<VecDeque<UpstreamFailure>>,
}

fn add(counter: &AtomicU64, n: u64) {
    counter.fetch_add(n, Ordering::Relaxed);
}

fn get(counter: &AtomicU64) -> u64 {
    counter.load(Ordering::Relaxed)
}

/// Where an upstream client counts: the shared counters and its own index in them.
#[derive(Debug, Clone)]
pub struct UpstreamMetrics {
    all: Arc<Metrics>,
    index: usize,
}

/// The upstream a client request was routed to, attached to its response for the metrics.
#[derive(Debug, Clone, Copy)]
pub struct Routed(pub usize);

impl UpstreamMetrics {
    /// This upstream's index in the counters, for [`Routed`].
    pub fn index(&self) -> usize {
        self.index
    }

    fn own(&self) -> &PerUpstream {
        &self.all.per_upstream[self.index]
    }

    /// Counts one upstream request: `status` is `None` when no response came.
    pub fn upstream(&self, kind: UpstreamKind, status: Option<u16>, elapsed: Duration) {
        let own = self.own();
        *own.requests
            .lock()
            .entry((kind, status.unwrap_or(0)))
            .or_default() += 1;
        own.latency[kind].observe(elapsed);
    }

    /// Remembers an upstream failure for the status page (the last 20 of all upstreams).
    pub fn upstream_failed(&self, kind: UpstreamKind, status: Option<u16>, error: String) {
        let at = SystemTime::now()
            .duration_since(SystemTime::UNIX_EPOCH)
            .map_or(0, |d| d.as_secs());
        let mut recent = self.all.recent_errors.lock();
        if recent.len() == RECENT_ERRORS {
            recent.pop_front();
        }
        recent.push_back(UpstreamFailure {
            at,
            upstream: self.all.hosts[self.index].clone(),
            kind,
            status,
            error,
        });
    }

    /// A client manifest GET answered without an upstream GET.
    pub fn pull_saved(&self) {
        add(&self.own().pulls_saved, 1);
    }

    /// Manifests and blobs fetched ahead of clients after a tag moved.
    pub fn prefetched(&self, manifests: u64, blobs: u64) {
        add(&self.own().prefetched_manifests, manifests);
        add(&self.own().prefetched_blobs, blobs);
    }

    /// A request answered from the negative cache, without asking upstream.
    pub fn negative_hit(&self) {
        add(&self.own().negative_hits, 1);
    }

    /// A stale answer.
    pub fn stale(&self, cause: StaleCause) {
        add(&self.own().stale[cause], 1);
    }

    /// Blob bytes received from upstream.
    pub fn fetched(&self, bytes: u64) {
        add(&self.own().bytes_fetched, bytes);
    }
}

impl Metrics {
    /// The registry host a request was routed to, as the access log names it.
    pub fn host(&self, routed: Routed) -> Option<&str> {
        self.hosts.get(routed.0).map(String::as_str)
    }

    /// Counters for the upstreams named `hosts` (the registry hosts, the default first).
    pub fn new(hosts: Vec<String>) -> Arc<Metrics> {
        let hosts = if hosts.is_empty() {
            vec![String::new()]
        } else {
            hosts
        };
        Arc::new(Metrics {
            started: SystemTime::now(),
            // One more: requests routed to no upstream.
            requests: (0..=hosts.len())
                .map(|_| RequestCounters::default())
                .collect(),
            latency: PerKey::default(),
            per_upstream: hosts.iter().map(|_| PerUpstream::default()).collect(),
            hosts,
            bytes_served_hit: AtomicU64::new(0),
            bytes_served_miss: AtomicU64::new(0),
            evictions: AtomicU64::new(0),
            evicted_bytes: AtomicU64::new(0),
            recent_errors: Mutex::default(),
        })
    }

    /// The handle upstream `index` (in the order given to [`Metrics::new`]) counts through.
    pub fn for_upstream(self: &Arc<Self>, index: usize) -> UpstreamMetrics {
        UpstreamMetrics {
            all: Arc::clone(self),
            index: index.min(self.hosts.len() - 1),
        }
    }

    /// The upstreams' names, the default first.
    pub fn hosts(&self) -> &[String] {
        &self.hosts
    }

    /// The client request counters of requests routed to `routed` (an upstream not known
    /// counts as none).
    fn requests_of(&self, routed: Option<Routed>) -> &RequestCounters {
        let none = self.hosts.len();
        &self.requests[routed.map_or(none, |r| r.0.min(none))]
    }

    /// Counts one client request, routed to upstream `routed` (if it was).
    pub fn request(
        &self,
        kind: RequestKind,
        method: &str,
        status: u16,
        outcome: Option<Outcome>,
        routed: Option<Routed>,
        elapsed: Duration,
    ) {
        let counters = &self.requests_of(routed)[kind][Method::of(method)];
        add(&counters[outcome][Status::of(status)], 1);
        self.latency[kind].observe(elapsed);
    }

    /// Blob bytes sent to a client.
    pub fn served(&self, outcome: Outcome, bytes: u64) {
        match outcome {
            Outcome::Miss => add(&self.bytes_served_miss, bytes),
            _ => add(&self.bytes_served_hit, bytes),
        }
    }

    /// A blob evicted.
    pub fn evicted(&self, bytes: u64) {
        add(&self.evictions, 1);
        add(&self.evicted_bytes, bytes);
    }
}
