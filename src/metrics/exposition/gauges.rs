//! The values other components report at scrape time ([`Gauges`]) and their families: each
//! upstream's gauges, the blob store's, and the replicas' (the object storage and Redis
//! counters among them, as those clients keep them).

use super::{Scrape, gauge, single_counter, single_gauge};
use prometheus_client::encoding::DescriptorEncoder;
use prometheus_client::metrics::MetricType;
use std::fmt;

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
    /// Per upstream, in the order of the metrics' hosts.
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
    /// Offline mode is on.
    pub offline: bool,
}

impl Scrape {
    /// The gauges read per upstream; a family none of the upstreams has a value for is left out.
    pub(super) fn upstream_gauges(&self, encoder: &mut DescriptorEncoder) -> fmt::Result {
        type Value = fn(&UpstreamGauges) -> Option<u64>;
        let families: [(&str, &str, Value); 6] = [
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
        let upstreams = &self.gauges.upstreams;
        for (name, help, value) in families {
            if upstreams.iter().all(|u| value(u).is_none()) {
                continue;
            }
            let mut family = encoder.encode_descriptor(name, help, None, MetricType::Gauge)?;
            for (u, own) in upstreams.iter().enumerate() {
                if let Some(v) = value(own) {
                    gauge(family.encode_family(&vec![("upstream", self.host(u))])?, v)?;
                }
            }
        }
        Ok(())
    }

    /// The blob store's gauges.
    pub(super) fn store_gauges(&self, encoder: &mut DescriptorEncoder) -> fmt::Result {
        let g = &self.gauges;
        let gauges = [
            ("blob_store_blobs", "Blobs in the store.", g.blobs),
            ("blob_store_bytes", "Bytes in the blob store.", g.blob_bytes),
            ("blob_downloads", "Blob downloads under way.", g.downloads),
        ];
        for (name, help, value) in gauges {
            single_gauge(encoder, name, help, value)?;
        }
        let help = "1 while offline: nothing is asked upstream, what is not cached answers 503.";
        single_gauge(encoder, "offline", help, u64::from(g.offline))
    }

    /// What replicas share, when they do: `cluster_alone`, then the object storage and Redis
    /// counters.
    pub(super) fn replicas(&self, encoder: &mut DescriptorEncoder) -> fmt::Result {
        let g = &self.gauges;
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
            let help =
                "1 while Redis is unreachable and this replica goes on as an independent cache.";
            single_gauge(encoder, "cluster_alone", help, u64::from(alone))?;
        }
        for (name, help, value) in counters {
            single_counter(encoder, name, help, None, value)?;
        }
        Ok(())
    }
}
