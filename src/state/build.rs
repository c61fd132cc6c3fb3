//! The steps `AppState::new` takes, in order: the upstreams' names, the manifest caches (shared
//! through object storage when configured), the blob store and the cluster it joins, the other
//! upstreams' proxies, purges followed across replicas, and the names that mean the default
//! upstream.

use crate::blobs::{BlobStore, DiskLimits};
use crate::cluster::{Bucket, Cluster, Peers, Replicas};
use crate::config::Config;
use crate::disk::Layout;
use crate::manifests::{ManifestCache, Negative, NegativeCache};
use crate::metrics::Metrics;
use crate::objects::ObjectStorage;
use crate::proxy::Proxy;
use crate::upstream::{Offline, Upstream};
use std::sync::{Arc, Weak};

/// The upstreams' names (the registry hosts), the default first, in the order the metrics
/// count them.
pub(super) fn upstream_hosts(config: &Config, default_name: &str) -> Vec<String> {
    std::iter::once(default_name.to_owned())
        .chain(config.upstreams.iter().map(|u| u.host.clone()))
        .collect()
}

/// How each upstream's manifest cache is opened: shared through object storage, under its own
/// prefix, when `storage_url` is set, and remembering upstream 404s in one negative cache
/// bounded for all of them.
pub(super) struct ManifestCaches {
    memory_bytes: u64,
    negative: Arc<NegativeCache>,
    pub(super) objects: Option<Arc<ObjectStorage>>,
    /// Replicas coordinate through Redis (`redis_url` is set).
    pub(super) clustered: bool,
}

impl ManifestCaches {
    pub(super) fn new(config: &Config) -> anyhow::Result<ManifestCaches> {
        let objects = match config.storage_url.as_str() {
            "" => None,
            url => Some(Arc::new(ObjectStorage::from_url(url).map_err(|e| {
                anyhow::anyhow!("invalid value for key \"storage_url\": {e}")
            })?)),
        };
        Ok(ManifestCaches {
            memory_bytes: config.manifest_cache_bytes.as_u64(),
            negative: Arc::new(NegativeCache::new(
                config.negative_ttl,
                config.negative_cache_entries,
            )),
            objects,
            clustered: !config.redis_url.0.is_empty(),
        })
    }

    /// Opens one upstream's manifest cache in `layout`, under `prefix` in object storage.
    pub(super) fn open(&self, layout: Layout, prefix: String) -> std::io::Result<ManifestCache> {
        // The prefix is unique per upstream: it names the upstream in the negative cache.
        let negative = Negative::new(Arc::clone(&self.negative), &prefix);
        let cache = ManifestCache::open(layout, self.memory_bytes)?.remembering(negative);
        Ok(match &self.objects {
            Some(objects) => cache.shared(Arc::clone(objects), prefix, self.clustered),
            None => cache,
        })
    }
}

/// Opens the blob store, shared by every upstream.
pub(super) fn open_blobs(
    config: &Config,
    layout: &Layout,
    metrics: &Arc<Metrics>,
) -> std::io::Result<Arc<BlobStore>> {
    let limits = DiskLimits {
        max: config.cache_max_disk.as_u64(),
        high: config.cache_high_watermark,
        low: config.cache_low_watermark,
        min_free: config.cache_min_free_disk.as_u64(),
        scrub_rate: config.scrub_rate.as_u64(),
        scrub_interval: config.scrub_interval,
        verify_on_serve: config.verify_on_serve,
    };
    BlobStore::open(layout.clone(), limits, Arc::clone(metrics))
}

/// What this replica shares with others: the bucket (`storage_url`), and the peers
/// coordinating through `redis_url`, with the default upstream's rate limits shared among
/// them. In a cluster the bucket is kept under `storage_max_bytes` while `blobs` lives.
pub(super) fn replicas(
    config: &Config,
    caches: &ManifestCaches,
    blobs: &Arc<BlobStore>,
    default_name: &str,
    upstream: &Arc<Upstream>,
) -> anyhow::Result<Arc<Replicas>> {
    let peers = match caches.clustered {
        true => {
            let cluster = Cluster::new(&config.redis_url.0, config.advertised())
                .map_err(|e| anyhow::anyhow!("invalid value for key \"redis_url\": {e}"))?;
            Some(Peers::new(config, Arc::new(cluster))?)
        }
        false => None,
    };
    let bucket = caches.objects.clone().map(|objects| {
        let cluster = peers.as_ref().map(|p| Arc::clone(&p.cluster));
        Arc::new(Bucket::new(
            objects,
            cluster,
            config.storage_max_bytes.as_u64(),
        ))
    });
    let replicas = Arc::new(Replicas { bucket, peers });
    if let Some(cluster) = replicas.cluster() {
        cluster.share_limits(default_name, Arc::clone(upstream));
    }
    if let Some(bucket) = &replicas.bucket {
        bucket.spawn_eviction(Arc::downgrade(blobs));
    }
    Ok(replicas)
}

/// The proxies of the `[[upstreams]]`, in order: each with its own upstream client, manifest
/// cache (in its own directory and object storage prefix) and the shared blob store.
pub(super) fn other_proxies(
    config: &Config,
    layout: &Layout,
    metrics: &Arc<Metrics>,
    blobs: &Arc<BlobStore>,
    replicas: &Arc<Replicas>,
    caches: &ManifestCaches,
    offline: &Arc<Offline>,
) -> anyhow::Result<Vec<Arc<Proxy>>> {
    let mut others = Vec::new();
    for (i, u) in config.upstreams.iter().enumerate() {
        let derived = config.for_upstream(u);
        let upstream = Arc::new(Upstream::new(
            &derived,
            metrics.for_upstream(i + 1),
            Arc::clone(offline),
        )?);
        if let Some(cluster) = replicas.cluster() {
            cluster.share_limits(&u.host, Arc::clone(&upstream));
        }
        let dir = u.host.replace(':', "_");
        let manifests = Arc::new(caches.open(layout.upstream(&dir)?, format!("upstreams/{dir}/"))?);
        let (blobs, replicas) = (Arc::clone(blobs), Arc::clone(replicas));
        let proxy =
            Proxy::new(&derived, upstream, manifests, blobs, replicas)?.named(&u.host, false);
        others.push(Arc::new(proxy));
    }
    Ok(others)
}

/// In a cluster, applies the purges other replicas announce to the proxy of their upstream.
pub(super) fn follow_purges(proxy: &Arc<Proxy>, others: &[Arc<Proxy>]) {
    let Some(cluster) = proxy.replicas.cluster() else {
        return;
    };
    // Weak: the purge follower lives with the cluster, which the proxies hold.
    let proxies: Vec<Weak<Proxy>> = std::iter::once(proxy)
        .chain(others)
        .map(Arc::downgrade)
        .collect();
    cluster.follow_purges(Arc::new(move |purged: crate::cluster::Purged| {
        let proxy = proxies
            .iter()
            .filter_map(Weak::upgrade)
            .find(|p| p.name() == purged.upstream);
        Box::pin(async move {
            if let Some(proxy) = proxy {
                proxy.apply_purge(&purged).await;
            }
        })
    }));
}

/// One line per upstream, so a first run shows what it will ask and with what.
pub(super) fn log_upstreams<'a>(proxies: impl Iterator<Item = &'a Arc<Proxy>>) {
    for p in proxies {
        let (_, _, tags) = p.manifests.sizes();
        tracing::info!(
            host = %p.name(),
            url = %p.upstream.base(),
            credentials = p.upstream.has_credentials(),
            tags,
            "upstream"
        );
    }
}

/// The `ns` values and path prefixes that mean the default upstream, lowercased: the
/// configured `namespaces`, else Docker Hub's names and the default upstream's own host.
pub(super) fn default_names(config: &Config, default_name: String) -> Vec<String> {
    let mut names: Vec<String> = if config.namespaces.is_empty() {
        crate::config::DOCKER_HUB_NAMES
            .iter()
            .map(|n| (*n).to_owned())
            .chain([default_name])
            .collect()
    } else {
        config.namespaces.clone()
    };
    names.iter_mut().for_each(|n| n.make_ascii_lowercase());
    names
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::UpstreamConfig;

    #[test]
    fn the_default_upstream_is_named_by_docker_hubs_names_or_the_configured_ones() {
        let config = Config::default();
        let names = default_names(&config, "mirror.example:5000".to_owned());
        assert!(names.iter().any(|n| n == "docker.io"));
        assert_eq!(
            names.last().map(String::as_str),
            Some("mirror.example:5000")
        );
        let config = Config {
            namespaces: vec!["Registry.Example".to_owned(), "docker.io".to_owned()],
            ..Config::default()
        };
        assert_eq!(
            default_names(&config, "ignored".to_owned()),
            ["registry.example", "docker.io"]
        );
    }

    #[test]
    fn upstreams_are_counted_default_first() {
        let url = |u: &str| url::Url::parse(u).unwrap();
        let config = Config {
            upstreams: vec![
                UpstreamConfig::new("ghcr.io", url("https://ghcr.io")),
                UpstreamConfig::new("quay.io", url("https://quay.io")),
            ],
            ..Config::default()
        };
        assert_eq!(
            upstream_hosts(&config, "docker.io"),
            ["docker.io", "ghcr.io", "quay.io"]
        );
    }
}
