//! `/metrics` in the Prometheus text format, encoded by `prometheus-client` from the counters
//! (read at scrape time, so the hot path touches only atomics) and the gauges the caller reads
//! from the caches and the upstream client.

use super::{
    BUCKETS, METHODS, Metrics, Outcome, RequestKind, STATUSES, StaleCause, UpstreamKind, cell, get,
};
use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeMetric, MetricEncoder};
use prometheus_client::metrics::MetricType;
use prometheus_client::metrics::counter::ConstCounter;
use prometheus_client::metrics::gauge::ConstGauge;
use prometheus_client::registry::{Registry, Unit};
use std::fmt;
use std::sync::Arc;

/// Values read from one upstream's client and caches at scrape time.
#[derive(Debug, Clone, Default)]
pub struct UpstreamGauges {
    /// `ratelimit-limit`, when seen.
    pub ratelimit_limit: Option<u64>,
    /// `ratelimit-remaining`, when seen.
    pub ratelimit_remaining: Option<u64>,
    /// Manifests held in memory.
    pub manifest_entries: u64,
    /// Bytes of manifests held in memory.
    pub manifest_bytes: u64,
    /// Tags in the index.
    pub tags: u64,
    /// Upstream exchanges in flight.
    pub in_flight: u64,
}

/// Values read from other components at scrape time.
#[derive(Debug, Clone, Default)]
pub struct Gauges {
    /// Per upstream, in the order of [`Metrics::hosts`].
    pub upstreams: Vec<UpstreamGauges>,
    /// Blobs in the store (shared by the upstreams).
    pub blobs: u64,
    /// Bytes in the blob store.
    pub blob_bytes: u64,
    /// Blob downloads under way.
    pub downloads: u64,
    /// Object storage requests and failures, with `storage_url`.
    pub object_storage: Option<(u64, u64)>,
    /// Redis requests and failures, and whether this replica goes on alone now, with
    /// `redis_url`.
    pub redis: Option<(u64, u64, bool)>,
}

type Labels = Vec<(&'static str, String)>;

#[derive(Debug)]
struct Scrape {
    metrics: Arc<Metrics>,
    gauges: Gauges,
}

/// The Prometheus text exposition of `metrics` and `gauges`, names prefixed `pullthrough_`.
pub fn render_prometheus(metrics: Arc<Metrics>, gauges: Gauges) -> String {
    let mut registry = Registry::with_prefix("pullthrough");
    registry.register_collector(Box::new(Scrape { metrics, gauges }));
    let mut out = String::new();
    // Writing into a String cannot fail.
    let _ = prometheus_client::encoding::prometheus_text::encode(&mut out, &registry);
    out
}

fn counter(e: MetricEncoder<'_>, value: u64) -> fmt::Result {
    ConstCounter::new(value).encode(e)
}

fn gauge(e: MetricEncoder<'_>, value: u64) -> fmt::Result {
    ConstGauge::new(i64::try_from(value).unwrap_or(i64::MAX)).encode(e)
}

fn histogram(mut e: MetricEncoder<'_>, h: &super::Histogram) -> fmt::Result {
    let mut buckets: Vec<(f64, u64)> = BUCKETS
        .iter()
        .zip(&h.buckets)
        .map(|(b, n)| (*b, get(n)))
        .collect();
    buckets.push((f64::INFINITY, get(&h.buckets[BUCKETS.len()])));
    let sum = get(&h.sum_micros) as f64 / 1e6;
    e.encode_histogram::<Labels>(sum, get(&h.count), &buckets, None)
}

fn status_label(status: u16) -> String {
    if status == 0 {
        "error".to_owned()
    } else {
        status.to_string()
    }
}

impl Collector for Scrape {
    fn encode(&self, mut encoder: DescriptorEncoder) -> fmt::Result {
        let m = &self.metrics;
        let hosts = m.hosts();
        // Requests not routed to an upstream (`/v2/`, the cache API, ...) have an empty label,
        // which Prometheus treats as absent.
        let host = |u: usize| hosts.get(u).cloned().unwrap_or_default();

        let mut family = encoder.encode_descriptor(
            "requests",
            "Client requests by upstream, kind, method, status and cache outcome.",
            None,
            MetricType::Counter,
        )?;
        for u in 0..=hosts.len() {
            for (k, kind) in RequestKind::ALL.iter().enumerate() {
                for (mi, method) in METHODS.iter().enumerate() {
                    for o in 0..=Outcome::ALL.len() {
                        let cache = Outcome::ALL.get(o).map_or("none", |o| o.label());
                        for s in 0..=STATUSES.len() {
                            let n = get(&m.requests[cell(u, k, mi, o, s)]);
                            if n == 0 {
                                continue;
                            }
                            let status = STATUSES.get(s).map_or("other".to_owned(), u16::to_string);
                            let labels: Labels = vec![
                                ("upstream", host(u)),
                                ("kind", kind.label().to_owned()),
                                ("method", (*method).to_owned()),
                                ("status", status),
                                ("cache", cache.to_owned()),
                            ];
                            counter(family.encode_family(&labels)?, n)?;
                        }
                    }
                }
            }
        }

        let mut family = encoder.encode_descriptor(
            "request_duration",
            "Client request latency until the response headers, by kind.",
            Some(&Unit::Seconds),
            MetricType::Histogram,
        )?;
        for (kind, h) in RequestKind::ALL.iter().zip(&m.latency) {
            histogram(
                family.encode_family(&vec![("kind", kind.label().to_owned())])?,
                h,
            )?;
        }

        let mut family = encoder.encode_descriptor(
            "upstream_requests",
            "Requests sent upstream by upstream, kind and status (status \"error\": no answer).",
            None,
            MetricType::Counter,
        )?;
        for (u, own) in m.per_upstream.iter().enumerate() {
            for ((kind, status), n) in own.requests.lock().iter() {
                let labels: Labels = vec![
                    ("upstream", host(u)),
                    ("kind", kind.label().to_owned()),
                    ("status", status_label(*status)),
                ];
                counter(family.encode_family(&labels)?, *n)?;
            }
        }

        let mut family = encoder.encode_descriptor(
            "upstream_request_duration",
            "Upstream latency until the response headers, by upstream and kind.",
            Some(&Unit::Seconds),
            MetricType::Histogram,
        )?;
        for (u, own) in m.per_upstream.iter().enumerate() {
            for (kind, h) in UpstreamKind::ALL.iter().zip(&own.latency) {
                let labels: Labels = vec![("upstream", host(u)), ("kind", kind.label().to_owned())];
                histogram(family.encode_family(&labels)?, h)?;
            }
        }

        let mut family = encoder.encode_descriptor(
            "blob_served",
            "Blob bytes sent to clients, by cache outcome (hit: from the store; miss: while fetching).",
            Some(&Unit::Bytes),
            MetricType::Counter,
        )?;
        for (cache, n) in [("hit", &m.bytes_served_hit), ("miss", &m.bytes_served_miss)] {
            counter(
                family.encode_family(&vec![("cache", cache.to_owned())])?,
                get(n),
            )?;
        }

        let mut family = encoder.encode_descriptor(
            "stale_served",
            "Answers served stale, by upstream and cause.",
            None,
            MetricType::Counter,
        )?;
        for (u, own) in m.per_upstream.iter().enumerate() {
            for (cause, n) in StaleCause::ALL.iter().zip(&own.stale) {
                let labels: Labels =
                    vec![("upstream", host(u)), ("cause", cause.label().to_owned())];
                counter(family.encode_family(&labels)?, get(n))?;
            }
        }

        type PerUpstreamValue = fn(&super::PerUpstream) -> u64;
        let per_upstream: [(&str, &str, Option<Unit>, PerUpstreamValue); 2] = [
            (
                "blob_fetched",
                "Blob bytes received from upstream, by upstream.",
                Some(Unit::Bytes),
                |own| get(&own.bytes_fetched),
            ),
            (
                "pulls_saved",
                "Client manifest GETs answered without an upstream GET (Docker Hub pulls saved), by upstream.",
                None,
                |own| get(&own.pulls_saved),
            ),
        ];
        for (name, help, unit, value) in per_upstream {
            let mut family =
                encoder.encode_descriptor(name, help, unit.as_ref(), MetricType::Counter)?;
            for (u, own) in m.per_upstream.iter().enumerate() {
                counter(
                    family.encode_family(&vec![("upstream", host(u))])?,
                    value(own),
                )?;
            }
        }

        let counters = [
            (
                "blob_evictions",
                "Blobs evicted from the store.",
                None,
                get(&m.evictions),
            ),
            (
                "blob_evicted",
                "Bytes evicted from the store.",
                Some(Unit::Bytes),
                get(&m.evicted_bytes),
            ),
        ];
        for (name, help, unit, value) in counters {
            counter(
                encoder.encode_descriptor(name, help, unit.as_ref(), MetricType::Counter)?,
                value,
            )?;
        }

        type UpstreamGauge = fn(&UpstreamGauges) -> Option<u64>;
        let upstream_gauges: [(&str, &str, UpstreamGauge); 6] = [
            (
                "ratelimit_limit",
                "Upstream pulls allowed per window (ratelimit-limit), when seen.",
                |g| g.ratelimit_limit,
            ),
            (
                "ratelimit_remaining",
                "Upstream pulls left in the window (ratelimit-remaining), when seen.",
                |g| g.ratelimit_remaining,
            ),
            ("manifest_cache_entries", "Manifests held in memory.", |g| {
                Some(g.manifest_entries)
            }),
            (
                "manifest_cache_bytes",
                "Bytes of manifests held in memory.",
                |g| Some(g.manifest_bytes),
            ),
            ("tags", "Tags in the index.", |g| Some(g.tags)),
            ("upstream_in_flight", "Upstream exchanges in flight.", |g| {
                Some(g.in_flight)
            }),
        ];
        let g = &self.gauges;
        for (name, help, value) in upstream_gauges {
            if g.upstreams.iter().all(|u| value(u).is_none()) {
                continue;
            }
            let mut family = encoder.encode_descriptor(name, help, None, MetricType::Gauge)?;
            for (u, own) in g.upstreams.iter().enumerate() {
                if let Some(v) = value(own) {
                    gauge(family.encode_family(&vec![("upstream", host(u))])?, v)?;
                }
            }
        }
        let gauges = [
            ("blob_store_blobs", "Blobs in the store.", g.blobs),
            ("blob_store_bytes", "Bytes in the blob store.", g.blob_bytes),
            ("blob_downloads", "Blob downloads under way.", g.downloads),
        ];
        for (name, help, value) in gauges {
            gauge(
                encoder.encode_descriptor(name, help, None, MetricType::Gauge)?,
                value,
            )?;
        }
        let mut counters = Vec::new();
        if let Some((requests, failures)) = g.object_storage {
            counters.push((
                "object_storage_requests",
                "Object storage operations (storage_url; a multipart upload counts once).",
                requests,
            ));
            counters.push((
                "object_storage_failures",
                "Object storage requests that failed (the bucket is then left alone for 10 s).",
                failures,
            ));
        }
        if let Some((requests, failures, alone)) = g.redis {
            counters.push(("redis_requests", "Requests to Redis (redis_url).", requests));
            counters.push((
                "redis_failures",
                "Redis requests that failed (this replica then goes on alone for 5 s).",
                failures,
            ));
            gauge(
                encoder.encode_descriptor(
                    "cluster_alone",
                    "1 while Redis is unreachable and this replica goes on as an independent cache.",
                    None,
                    MetricType::Gauge,
                )?,
                u64::from(alone),
            )?;
        }
        for (name, help, value) in counters {
            counter(
                encoder.encode_descriptor(name, help, None, MetricType::Counter)?,
                value,
            )?;
        }
        Ok(())
    }
}
