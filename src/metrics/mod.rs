//! What pullthrough counts, in one place: client requests by kind, method, status and cache
//! outcome, with latencies; upstream requests by kind and status, with latencies; bytes served
//! and fetched; pulls saved; stale answers by cause; evictions; and the last upstream errors.
//! Counters are lock-free atomics held in the application state (no globals); the stats
//! endpoint, `/metrics` and the status page all read them from here. Also the one vocabulary for
//! a cache outcome, [`Outcome`], rendered in one place.

mod exposition;

pub use exposition::{Gauges, UpstreamGauges, render_prometheus};

use parking_lot::Mutex;
use serde::Serialize;
use std::collections::{BTreeMap, VecDeque};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, SystemTime};

/// How an answer was obtained, sent to clients as `X-Cache`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Outcome {
    /// Served from cache, within freshness.
    Hit,
    /// Fetched from upstream (or joined a fetch under way).
    Miss,
    /// Upstream confirmed (or changed) an expired tag before the answer.
    Revalidated,
    /// Served from cache past freshness (revalidating, upstream failing, or budget held).
    Stale,
}

impl Outcome {
    const ALL: [Outcome; 4] = [
        Outcome::Hit,
        Outcome::Miss,
        Outcome::Revalidated,
        Outcome::Stale,
    ];

    /// The `X-Cache` value.
    pub fn as_str(self) -> &'static str {
        match self {
            Outcome::Hit => "HIT",
            Outcome::Miss => "MISS",
            Outcome::Revalidated => "REVALIDATED",
            Outcome::Stale => "STALE",
        }
    }

    /// Parses an `X-Cache` value.
    pub fn parse(value: &str) -> Option<Outcome> {
        Outcome::ALL.into_iter().find(|o| o.as_str() == value)
    }

    /// The metrics label.
    fn label(self) -> &'static str {
        match self {
            Outcome::Hit => "hit",
            Outcome::Miss => "miss",
            Outcome::Revalidated => "revalidated",
            Outcome::Stale => "stale",
        }
    }

    /// Whether upstream was not asked for the content (a pull saved).
    pub fn from_cache(self) -> bool {
        matches!(self, Outcome::Hit | Outcome::Stale)
    }
}

/// What a client request was for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum RequestKind {
    /// `/v2/<name>/manifests/<reference>`.
    Manifest,
    /// `/v2/<name>/blobs/<digest>`.
    Blob,
    /// `/v2/<name>/tags/list`.
    Tags,
    /// Anything else (`/v2/`, the cache API, health, metrics, the status page).
    Other,
}

impl RequestKind {
    const ALL: [RequestKind; 4] = [
        RequestKind::Manifest,
        RequestKind::Blob,
        RequestKind::Tags,
        RequestKind::Other,
    ];

    /// Classifies a request path.
    pub fn of_path(path: &str) -> RequestKind {
        match path.strip_prefix("/v2/") {
            Some(tail) if tail.contains("/manifests/") => RequestKind::Manifest,
            Some(tail) if tail.contains("/blobs/") => RequestKind::Blob,
            Some(tail) if tail.ends_with("/tags/list") => RequestKind::Tags,
            _ => RequestKind::Other,
        }
    }

    fn label(self) -> &'static str {
        match self {
            RequestKind::Manifest => "manifest",
            RequestKind::Blob => "blob",
            RequestKind::Tags => "tags",
            RequestKind::Other => "other",
        }
    }
}

/// What an upstream request was for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum UpstreamKind {
    /// A manifest GET (what Docker Hub counts as a pull).
    ManifestGet,
    /// A manifest HEAD (free on Docker Hub).
    ManifestHead,
    /// A blob GET.
    BlobGet,
    /// A blob HEAD.
    BlobHead,
    /// A tags-list GET.
    Tags,
    /// A token request.
    Token,
    /// The `/v2/` ping.
    Ping,
}

impl UpstreamKind {
    /// The name used in metrics labels and on the status page.
    pub fn as_str(self) -> &'static str {
        self.label()
    }

    const ALL: [UpstreamKind; 7] = [
        UpstreamKind::ManifestGet,
        UpstreamKind::ManifestHead,
        UpstreamKind::BlobGet,
        UpstreamKind::BlobHead,
        UpstreamKind::Tags,
        UpstreamKind::Token,
        UpstreamKind::Ping,
    ];

    fn label(self) -> &'static str {
        match self {
            UpstreamKind::ManifestGet => "manifest_get",
            UpstreamKind::ManifestHead => "manifest_head",
            UpstreamKind::BlobGet => "blob_get",
            UpstreamKind::BlobHead => "blob_head",
            UpstreamKind::Tags => "tags",
            UpstreamKind::Token => "token",
            UpstreamKind::Ping => "ping",
        }
    }
}

/// Why a stale answer was served.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StaleCause {
    /// A revalidation was under way.
    Revalidating,
    /// Upstream failed or was too slow.
    UpstreamError,
    /// The rate-limit budget was below the reserve.
    Budget,
}

impl StaleCause {
    const ALL: [StaleCause; 3] = [
        StaleCause::Revalidating,
        StaleCause::UpstreamError,
        StaleCause::Budget,
    ];

    fn label(self) -> &'static str {
        match self {
            StaleCause::Revalidating => "revalidating",
            StaleCause::UpstreamError => "upstream_error",
            StaleCause::Budget => "budget",
        }
    }
}

/// Client response statuses counted separately; any other is counted as `other`.
const STATUSES: [u16; 14] = [
    200, 206, 304, 400, 401, 403, 404, 405, 416, 429, 500, 502, 503, 504,
];
/// Methods counted separately; any other is counted as `other`.
const METHODS: [&str; 3] = ["GET", "HEAD", "other"];
/// Upper bounds of the latency histograms, in seconds.
const BUCKETS: [f64; 14] = [
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
];
/// Upstream errors remembered for the status page.
const RECENT_ERRORS: usize = 20;

/// A latency histogram of atomics: per-bucket counts (the last is +Inf), count and sum.
#[derive(Debug, Default)]
struct Histogram {
    buckets: [AtomicU64; BUCKETS.len() + 1],
    count: AtomicU64,
    sum_micros: AtomicU64,
}

impl Histogram {
    fn observe(&self, d: Duration) {
        let secs = d.as_secs_f64();
        let i = BUCKETS
            .iter()
            .position(|b| secs <= *b)
            .unwrap_or(BUCKETS.len());
        self.buckets[i].fetch_add(1, Ordering::Relaxed);
        self.count.fetch_add(1, Ordering::Relaxed);
        let micros = u64::try_from(d.as_micros()).unwrap_or(u64::MAX);
        self.sum_micros.fetch_add(micros, Ordering::Relaxed);
    }
}

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

/// The counters of one upstream.
#[derive(Debug, Default)]
struct PerUpstream {
    requests: Mutex<BTreeMap<(UpstreamKind, u16), u64>>,
    latency: [Histogram; UpstreamKind::ALL.len()],
    stale: [AtomicU64; StaleCause::ALL.len()],
    pulls_saved: AtomicU64,
    bytes_fetched: AtomicU64,
}

/// Every counter. Client requests carry the upstream they were routed to (or none, for `/v2/`,
/// the cache API and the like); upstream requests, stale answers, pulls saved and fetched bytes
/// are kept per upstream; the blob store is shared, so its bytes and evictions are not.
#[derive(Debug)]
pub struct Metrics {
    started: SystemTime,
    /// The upstreams' names (the registry hosts), the default first.
    hosts: Vec<String>,
    /// [upstream or none][kind][method][outcome or none][status or other], flattened.
    requests: Box<[AtomicU64]>,
    latency: [Histogram; RequestKind::ALL.len()],
    per_upstream: Box<[PerUpstream]>,
    bytes_served_hit: AtomicU64,
    bytes_served_miss: AtomicU64,
    evictions: AtomicU64,
    evicted_bytes: AtomicU64,
    recent_errors: Mutex<VecDeque<UpstreamFailure>>,
}

/// Cells of the request counters per upstream.
const CELLS_PER_UPSTREAM: usize =
    RequestKind::ALL.len() * METHODS.len() * (Outcome::ALL.len() + 1) * (STATUSES.len() + 1);

fn cell(upstream: usize, kind: usize, method: usize, outcome: usize, status: usize) -> usize {
    upstream * CELLS_PER_UPSTREAM
        + ((kind * METHODS.len() + method) * (Outcome::ALL.len() + 1) + outcome)
            * (STATUSES.len() + 1)
        + status
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
        let k = UpstreamKind::ALL
            .iter()
            .position(|x| *x == kind)
            .unwrap_or(0);
        own.latency[k].observe(elapsed);
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

    /// A stale answer.
    pub fn stale(&self, cause: StaleCause) {
        let i = StaleCause::ALL
            .iter()
            .position(|x| *x == cause)
            .unwrap_or(0);
        add(&self.own().stale[i], 1);
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
        let cells = CELLS_PER_UPSTREAM * (hosts.len() + 1);
        Arc::new(Metrics {
            started: SystemTime::now(),
            requests: (0..cells).map(|_| AtomicU64::new(0)).collect(),
            latency: Default::default(),
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
        let u = routed.map_or(self.hosts.len(), |r| r.0.min(self.hosts.len()));
        let k = RequestKind::ALL
            .iter()
            .position(|x| *x == kind)
            .unwrap_or(0);
        let m = METHODS[..2].iter().position(|x| *x == method).unwrap_or(2);
        let o = outcome.map_or(Outcome::ALL.len(), |o| {
            Outcome::ALL.iter().position(|x| *x == o).unwrap_or(0)
        });
        let s = STATUSES
            .iter()
            .position(|x| *x == status)
            .unwrap_or(STATUSES.len());
        add(&self.requests[cell(u, k, m, o, s)], 1);
        self.latency[k].observe(elapsed);
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

    /// The counters of the upstreams `which` selects (by index), summed.
    fn upstream_counts(&self, which: impl Fn(usize) -> bool) -> UpstreamCounts {
        let mut by_kind: BTreeMap<&'static str, OutcomeCounts> = BTreeMap::new();
        let mut upstream: BTreeMap<&'static str, BTreeMap<String, u64>> = BTreeMap::new();
        let mut stale: BTreeMap<&'static str, u64> =
            StaleCause::ALL.iter().map(|c| (c.label(), 0)).collect();
        let (mut pulls_saved, mut fetched) = (0, 0);
        for (u, own) in self
            .per_upstream
            .iter()
            .enumerate()
            .filter(|(u, _)| which(*u))
        {
            for (k, kind) in RequestKind::ALL.iter().enumerate() {
                let counts = by_kind.entry(kind.label()).or_default();
                for m in 0..METHODS.len() {
                    for (o, outcome) in Outcome::ALL.iter().enumerate() {
                        let n: u64 = (0..=STATUSES.len())
                            .map(|s| get(&self.requests[cell(u, k, m, o, s)]))
                            .sum();
                        counts.add(*outcome, n);
                    }
                }
            }
            for ((kind, status), n) in own.requests.lock().iter() {
                let status = if *status == 0 {
                    "error".to_owned()
                } else {
                    status.to_string()
                };
                *upstream
                    .entry(kind.label())
                    .or_default()
                    .entry(status)
                    .or_default() += n;
            }
            for (cause, n) in StaleCause::ALL.iter().zip(&own.stale) {
                *stale.entry(cause.label()).or_default() += get(n);
            }
            pulls_saved += get(&own.pulls_saved);
            fetched += get(&own.bytes_fetched);
        }
        if by_kind.is_empty() {
            by_kind = RequestKind::ALL
                .iter()
                .map(|k| (k.label(), OutcomeCounts::default()))
                .collect();
        }
        UpstreamCounts {
            requests: by_kind,
            pulls_saved,
            upstream_requests: upstream,
            stale,
            blob_bytes_fetched: fetched,
        }
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
