//! `/metrics` in the Prometheus text format, encoded by `prometheus-client` from the counters
//! (read at scrape time, so the hot path touches only atomics) and the gauges the caller reads
//! from the caches and the upstream client. One function per metric family, or per group of
//! families read alike, called in the order the families appear; those of the values read at
//! scrape time are in `gauges`.

mod gauges;

pub use gauges::{Gauges, UpstreamGauges};

use super::histogram::Histogram;
use super::labels::upstream_status;
use super::{Metrics, PerUpstream, get};
use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeMetric, MetricEncoder};
use prometheus_client::metrics::MetricType;
use prometheus_client::metrics::counter::ConstCounter;
use prometheus_client::metrics::gauge::ConstGauge;
use prometheus_client::registry::{Registry, Unit};
use std::fmt;
use std::sync::Arc;

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

fn histogram(mut e: MetricEncoder<'_>, h: &Histogram) -> fmt::Result {
    e.encode_histogram::<Labels>(h.sum_secs(), h.count(), &h.buckets(), None)
}

/// A counter family with no labels.
fn single_counter(
    encoder: &mut DescriptorEncoder,
    name: &str,
    help: &str,
    unit: Option<Unit>,
    value: u64,
) -> fmt::Result {
    counter(
        encoder.encode_descriptor(name, help, unit.as_ref(), MetricType::Counter)?,
        value,
    )
}

/// A gauge family with no labels.
fn single_gauge(
    encoder: &mut DescriptorEncoder,
    name: &str,
    help: &str,
    value: u64,
) -> fmt::Result {
    gauge(
        encoder.encode_descriptor(name, help, None, MetricType::Gauge)?,
        value,
    )
}

impl Collector for Scrape {
    fn encode(&self, mut encoder: DescriptorEncoder) -> fmt::Result {
        let e = &mut encoder;
        self.client_requests(e)?;
        self.client_latency(e)?;
        self.upstream_requests(e)?;
        self.upstream_latency(e)?;
        self.blob_served(e)?;
        self.stale_served(e)?;
        self.per_upstream_counters(e)?;
        self.evictions(e)?;
        self.upstream_gauges(e)?;
        self.store_gauges(e)?;
        self.replicas(e)
    }
}

impl Scrape {
    /// The `upstream` label of upstream `u`. Requests not routed to an upstream (`/v2/`, the
    /// cache API, ...) have an empty label, which Prometheus treats as absent.
    fn host(&self, u: usize) -> String {
        self.metrics.hosts.get(u).cloned().unwrap_or_default()
    }

    /// `requests`: every client request counter that is not zero.
    fn client_requests(&self, encoder: &mut DescriptorEncoder) -> fmt::Result {
        let mut family = encoder.encode_descriptor(
            "requests",
            "Client requests by upstream, kind, method, status and cache outcome.",
            None,
            MetricType::Counter,
        )?;
        for (u, requests) in self.metrics.requests.iter().enumerate() {
            for (kind, by_method) in requests.iter() {
                for (method, by_outcome) in by_method.iter() {
                    for (outcome, by_status) in by_outcome.iter() {
                        let cache = outcome.map_or("none", |o| o.label());
                        for (status, n) in by_status.iter() {
                            let n = get(n);
                            if n == 0 {
                                continue;
                            }
                            let labels: Labels = vec![
                                ("upstream", self.host(u)),
                                ("kind", kind.label().to_owned()),
                                ("method", method.label().to_owned()),
                                ("status", status.label()),
                                ("cache", cache.to_owned()),
                            ];
                            counter(family.encode_family(&labels)?, n)?;
                        }
                    }
                }
            }
        }
        Ok(())
    }

    /// `request_duration`, by kind.
    fn client_latency(&self, encoder: &mut DescriptorEncoder) -> fmt::Result {
        let mut family = encoder.encode_descriptor(
            "request_duration",
            "Client request latency until the response headers, by kind.",
            Some(&Unit::Seconds),
            MetricType::Histogram,
        )?;
        for (kind, h) in self.metrics.latency.iter() {
            histogram(
                family.encode_family(&vec![("kind", kind.label().to_owned())])?,
                h,
            )?;
        }
        Ok(())
    }

    /// `upstream_requests`, by upstream, kind and status.
    fn upstream_requests(&self, encoder: &mut DescriptorEncoder) -> fmt::Result {
        let mut family = encoder.encode_descriptor(
            "upstream_requests",
            "Requests sent upstream by upstream, kind and status (status \"error\": no answer).",
            None,
            MetricType::Counter,
        )?;
        for (u, own) in self.metrics.per_upstream.iter().enumerate() {
            for ((kind, status), n) in own.requests.lock().iter() {
                let labels: Labels = vec![
                    ("upstream", self.host(u)),
                    ("kind", kind.label().to_owned()),
                    ("status", upstream_status(*status)),
                ];
                counter(family.encode_family(&labels)?, *n)?;
            }
        }
        Ok(())
    }

    /// `upstream_request_duration`, by upstream and kind.
    fn upstream_latency(&self, encoder: &mut DescriptorEncoder) -> fmt::Result {
        let mut family = encoder.encode_descriptor(
            "upstream_request_duration",
            "Upstream latency until the response headers, by upstream and kind.",
            Some(&Unit::Seconds),
            MetricType::Histogram,
        )?;
        for (u, own) in self.metrics.per_upstream.iter().enumerate() {
            for (kind, h) in own.latency.iter() {
                let labels: Labels = vec![
                    ("upstream", self.host(u)),
                    ("kind", kind.label().to_owned()),
                ];
                histogram(family.encode_family(&labels)?, h)?;
            }
        }
        Ok(())
    }

    /// `blob_served`, by cache outcome.
    fn blob_served(&self, encoder: &mut DescriptorEncoder) -> fmt::Result {
        let mut family = encoder.encode_descriptor(
            "blob_served",
            "Blob bytes sent to clients, by cache outcome (hit: from the store; miss: while fetching).",
            Some(&Unit::Bytes),
            MetricType::Counter,
        )?;
        let m = &self.metrics;
        for (cache, n) in [("hit", &m.bytes_served_hit), ("miss", &m.bytes_served_miss)] {
            counter(
                family.encode_family(&vec![("cache", cache.to_owned())])?,
                get(n),
            )?;
        }
        Ok(())
    }

    /// `stale_served`, by upstream and cause.
    fn stale_served(&self, encoder: &mut DescriptorEncoder) -> fmt::Result {
        let mut family = encoder.encode_descriptor(
            "stale_served",
            "Answers served stale, by upstream and cause.",
            None,
            MetricType::Counter,
        )?;
        for (u, own) in self.metrics.per_upstream.iter().enumerate() {
            for (cause, n) in own.stale.iter() {
                let labels: Labels = vec![
                    ("upstream", self.host(u)),
                    ("cause", cause.label().to_owned()),
                ];
                counter(family.encode_family(&labels)?, get(n))?;
            }
        }
        Ok(())
    }

    /// `blob_fetched`, `pulls_saved`, what was prefetched and `negative_cache_hits`, by upstream.
    fn per_upstream_counters(&self, encoder: &mut DescriptorEncoder) -> fmt::Result {
        type Value = fn(&PerUpstream) -> u64;
        let families: [(&str, &str, Option<Unit>, Value); 5] = [
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
            (
                "prefetched_manifests",
                "Manifests fetched ahead of clients after a tag moved upstream (prefetch_on_move), by upstream.",
                None,
                |own| get(&own.prefetched_manifests),
            ),
            (
                "prefetched_blobs",
                "Blobs fetched ahead of clients after a tag moved upstream (prefetch_on_move), by upstream.",
                None,
                |own| get(&own.prefetched_blobs),
            ),
            (
                "negative_cache_hits",
                "Requests answered from the negative cache (an upstream 404 remembered for negative_ttl), by upstream.",
                None,
                |own| get(&own.negative_hits),
            ),
        ];
        for (name, help, unit, value) in families {
            let mut family =
                encoder.encode_descriptor(name, help, unit.as_ref(), MetricType::Counter)?;
            for (u, own) in self.metrics.per_upstream.iter().enumerate() {
                counter(
                    family.encode_family(&vec![("upstream", self.host(u))])?,
                    value(own),
                )?;
            }
        }
        Ok(())
    }

    /// `blob_evictions`, `blob_evicted`, and `log_lines_dropped`.
    fn evictions(&self, encoder: &mut DescriptorEncoder) -> fmt::Result {
        let m = &self.metrics;
        let (evictions, evicted) = (get(&m.evictions), get(&m.evicted_bytes));
        single_counter(
            encoder,
            "blob_evictions",
            "Blobs evicted from the store.",
            None,
            evictions,
        )?;
        let help = "Bytes evicted from the store.";
        single_counter(encoder, "blob_evicted", help, Some(Unit::Bytes), evicted)?;
        single_counter(
            encoder,
            "log_lines_dropped",
            "Log lines dropped because the log writer's queue was full (the log is written by a thread of its own).",
            None,
            crate::logging::dropped_lines(),
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::metrics::{Outcome, RequestKind, Routed, StaleCause, UpstreamKind};
    use std::time::Duration;

    /// Scrapers and dashboards read these names, labels and this order: a change shows here.
    #[test]
    fn families_come_in_a_fixed_order_with_their_labels() {
        let m = Metrics::new(vec!["docker.io".to_owned()]);
        let ms = Duration::from_millis(1);
        m.request(
            RequestKind::Manifest,
            "GET",
            200,
            Some(Outcome::Hit),
            Some(Routed(0)),
            ms,
        );
        m.request(RequestKind::Other, "POST", 418, None, None, ms);
        let upstream = m.for_upstream(0);
        upstream.upstream(UpstreamKind::Token, None, ms);
        upstream.stale(StaleCause::Budget);
        let gauges = Gauges {
            upstreams: vec![UpstreamGauges::default()],
            object_storage: Some((3, 0)),
            redis: Some((2, 1, true)),
            ..Gauges::default()
        };
        let text = render_prometheus(m, gauges);
        let families: Vec<&str> = text
            .lines()
            .filter_map(|l| l.strip_prefix("# TYPE pullthrough_"))
            .collect();
        assert_eq!(
            families,
            [
                "requests_total counter",
                "request_duration_seconds histogram",
                "upstream_requests_total counter",
                "upstream_request_duration_seconds histogram",
                "blob_served_bytes_total counter",
                "stale_served_total counter",
                "blob_fetched_bytes_total counter",
                "pulls_saved_total counter",
                "prefetched_manifests_total counter",
                "prefetched_blobs_total counter",
                "negative_cache_hits_total counter",
                "blob_evictions_total counter",
                "blob_evicted_bytes_total counter",
                "log_lines_dropped_total counter",
                "manifest_cache_entries gauge",
                "manifest_cache_bytes gauge",
                "tags gauge",
                "upstream_in_flight gauge",
                "blob_store_blobs gauge",
                "blob_store_bytes gauge",
                "blob_downloads gauge",
                "offline gauge",
                "cluster_alone gauge",
                "object_storage_requests_total counter",
                "object_storage_failures_total counter",
                "redis_requests_total counter",
                "redis_failures_total counter",
            ]
        );
        for line in [
            r#"pullthrough_requests_total{upstream="docker.io",kind="manifest",method="GET",status="200",cache="hit"} 1"#,
            r#"pullthrough_requests_total{upstream="",kind="other",method="other",status="other",cache="none"} 1"#,
            r#"pullthrough_upstream_requests_total{upstream="docker.io",kind="token",status="error"} 1"#,
            r#"pullthrough_stale_served_total{upstream="docker.io",cause="budget"} 1"#,
            r#"pullthrough_request_duration_seconds_bucket{kind="manifest",le="0.001"} 1"#,
            "pullthrough_cluster_alone 1",
            "pullthrough_offline 0",
            r#"pullthrough_negative_cache_hits_total{upstream="docker.io"} 0"#,
        ] {
            assert!(text.lines().any(|l| l == line), "missing {line}\n{text}");
        }
        assert_eq!(
            text.lines()
                .filter(|l| l.contains("_requests_total{"))
                .count(),
            3
        );
    }
}
