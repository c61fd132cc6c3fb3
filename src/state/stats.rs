//! What the stats endpoint and `/readyz` answer, and the gauges `/metrics` reads: sizes and
//! counters gathered from every proxy at the time of asking.

use super::AppState;
use crate::metrics::{Gauges, UpstreamGauges};

/// What the stats endpoint answers.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Stats {
    /// The upstream registry.
    pub upstream: String,
    /// Requests, outcomes, upstream requests, bytes, stale answers, recent upstream errors.
    pub counters: crate::metrics::Counts,
    /// The last rate-limit state upstream reported.
    pub rate_limit: crate::upstream::ratelimit::RateLimit,
    /// The manifest cache.
    pub manifest_cache: CacheSizes,
    /// The blob store.
    pub blob_store: StoreSizes,
    /// Upstream exchanges in flight.
    pub upstream_in_flight: u64,
    /// The same, per upstream: the default first, then the `[[upstreams]]` in order.
    pub upstreams: Vec<UpstreamStats>,
    /// Offline mode is on: nothing is asked upstream.
    pub offline: bool,
    /// Upstream 404s remembered now (`negative_ttl`), over every upstream.
    pub negative_cache_entries: u64,
}

impl Stats {
    /// What anyone but the admin may see: no recent upstream errors (they name images), and
    /// the registries by the names clients use, not the URLs they are reached at.
    pub fn redacted(mut self) -> Stats {
        self.counters.recent_upstream_errors.clear();
        self.upstream = self
            .upstreams
            .first()
            .map(|u| u.host.clone())
            .unwrap_or_default();
        self.upstreams.iter_mut().for_each(|u| u.url.clear());
        self
    }
}

/// What the stats endpoint answers for one upstream.
#[derive(Debug, Clone, serde::Serialize)]
pub struct UpstreamStats {
    /// The registry host it stands for (the `ns` value and path prefix clients use).
    pub host: String,
    /// Where it is fetched from.
    pub url: String,
    /// Whether it is the default upstream.
    pub default: bool,
    /// Requests routed to it, its upstream requests, stale answers, pulls saved, bytes fetched.
    pub counters: crate::metrics::UpstreamCounts,
    /// The last rate-limit state it reported.
    pub rate_limit: crate::upstream::ratelimit::RateLimit,
    /// Its manifest cache.
    pub manifest_cache: CacheSizes,
    /// Its exchanges in flight.
    pub upstream_in_flight: u64,
}

/// Sizes of the manifest cache.
#[derive(Debug, Clone, serde::Serialize)]
pub struct CacheSizes {
    /// Manifests in memory.
    pub entries: u64,
    /// Their bytes.
    pub bytes: u64,
    /// Tags in the index.
    pub tags: u64,
}

/// Sizes of the blob store.
#[derive(Debug, Clone, serde::Serialize)]
pub struct StoreSizes {
    /// Blobs stored.
    pub blobs: u64,
    /// Their bytes.
    pub bytes: u64,
    /// Downloads under way.
    pub downloads: u64,
}

/// What `/readyz` answers.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Readiness {
    /// Ready to serve.
    pub ready: bool,
    /// A file could be created under the data directory.
    pub data_dir_writable: bool,
    /// The tag index and the blob store index are loaded.
    pub cache_index_loaded: bool,
    /// Why not, if not.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

impl AppState {
    /// Everything the stats endpoint and the status page show.
    pub fn stats(&self) -> Stats {
        let gauges = self.gauges();
        let upstreams: Vec<UpstreamStats> = self
            .proxies()
            .zip(&gauges.upstreams)
            .enumerate()
            .map(|(i, (proxy, g))| UpstreamStats {
                host: proxy.name().to_owned(),
                url: proxy.upstream.base().to_string(),
                default: i == 0,
                counters: self.metrics.snapshot_upstream(i),
                rate_limit: proxy.upstream.limits.snapshot(),
                manifest_cache: CacheSizes {
                    entries: g.manifest_entries,
                    bytes: g.manifest_bytes,
                    tags: g.tags,
                },
                upstream_in_flight: g.in_flight,
            })
            .collect();
        let sum = |f: fn(&UpstreamGauges) -> u64| gauges.upstreams.iter().map(f).sum::<u64>();
        Stats {
            upstream: self.upstream_url.to_string(),
            counters: self.metrics.snapshot(),
            rate_limit: self.proxy.upstream.limits.snapshot(),
            manifest_cache: CacheSizes {
                entries: sum(|g| g.manifest_entries),
                bytes: sum(|g| g.manifest_bytes),
                tags: sum(|g| g.tags),
            },
            blob_store: StoreSizes {
                blobs: gauges.blobs,
                bytes: gauges.blob_bytes,
                downloads: gauges.downloads,
            },
            upstream_in_flight: sum(|g| g.in_flight),
            upstreams,
            offline: gauges.offline,
            negative_cache_entries: self.proxy.manifests.negative.entries(),
        }
    }

    /// Whether this instance can serve: its data directory takes new files (the cache index is
    /// loaded before serving starts). Upstream is not asked: cached content is served without it.
    pub async fn readiness(&self) -> Readiness {
        let layout = self.layout.clone();
        let writable = tokio::task::spawn_blocking(move || layout.temp_file().map(drop))
            .await
            .map_err(std::io::Error::other)
            .and_then(|r| r);
        Readiness {
            ready: writable.is_ok(),
            data_dir_writable: writable.is_ok(),
            cache_index_loaded: true,
            error: writable.err().map(|e| e.to_string()),
        }
    }

    /// The gauges `/metrics` and the stats read from the caches and the upstream clients.
    pub fn gauges(&self) -> Gauges {
        let upstreams = self
            .proxies()
            .map(|proxy| {
                let limit = proxy.upstream.limits.snapshot();
                let (manifest_entries, manifest_bytes, tags) = proxy.manifests.sizes();
                UpstreamGauges {
                    ratelimit_limit: limit.limit,
                    ratelimit_remaining: limit.remaining,
                    manifest_entries,
                    manifest_bytes,
                    tags,
                    in_flight: proxy.upstream.in_flight(),
                }
            })
            .collect();
        Gauges {
            offline: self.offline.is_on(),
            upstreams,
            blobs: self.proxy.blobs.count(),
            blob_bytes: self.proxy.blobs.total_bytes(),
            downloads: self.proxy.blobs.downloads(),
            object_storage: (self.proxy.replicas.bucket.as_ref()).map(|b| b.objects().counts()),
            redis: self.proxy.replicas.cluster().map(|c| c.counts()),
        }
    }
}
