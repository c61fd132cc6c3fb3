//! `AppState`: every shared handle, built once from `Config` at startup.

use crate::blobs::{BlobStore, DiskLimits};
use crate::cluster::{Bucket, Cluster, Peers, Replicas};
use crate::config::Config;
use crate::disk::Layout;
use crate::error::Error;
use crate::manifests::ManifestCache;
use crate::metrics::{Gauges, Metrics, UpstreamGauges};
use crate::objects::ObjectStorage;
use crate::proxy::Proxy;
use crate::registry::RepoName;
use crate::upstream::Upstream;
use anyhow::Context;
use std::sync::Arc;
use std::sync::atomic::{AtomicU8, Ordering};

/// The file under the data directory that remembers what the upstream is.
const UPSTREAM_STATE: &str = "upstream.json";

/// What the upstream was found to be, remembered across restarts.
#[derive(Debug, serde::Serialize, serde::Deserialize)]
struct UpstreamState {
    /// The upstream URL it was learned for.
    upstream: url::Url,
    /// Whether one-component names mean `library/<name>` there.
    docker_hub: bool,
}

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

/// Who is reading the cache API or the status page.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Viewer {
    /// Sees everything: the admin token, or no access control and no admin token.
    Admin,
    /// With access control: sees the repositories the rules let it pull.
    Client(crate::access::Identity),
    /// `admin_token` is set and was not given: sees no names.
    Nobody,
}

/// Shared state of a running pullthrough.
#[derive(Debug)]
pub struct AppState {
    /// Cache-or-fetch for everything served; holds the upstream client.
    pub proxy: Arc<Proxy>,
    /// Every counter.
    pub metrics: Arc<Metrics>,
    /// `cache_max_disk`, for the status page.
    pub disk_limit: u64,
    /// The cache API's bearer token, if set.
    pub admin_token: Option<crate::config::Secret>,
    /// Whether the upstream is Docker Hub: 0 not known yet, 1 no, 2 yes.
    docker_hub: AtomicU8,
    layout: Layout,
    upstream_url: url::Url,
    /// Client access control, when configured.
    pub access: Option<crate::access::Access>,
    /// The `[[upstreams]]`, by the host name clients use.
    pub others: Vec<Arc<Proxy>>,
    /// `ns` values that mean the default upstream.
    default_names: Vec<String>,
    /// `upstream_deadline`: the longest any request waits for its response headers.
    pub deadline: std::time::Duration,
}

impl AppState {
    /// Opens the data directory and builds every component.
    pub fn new(config: &Config) -> anyhow::Result<AppState> {
        let layout =
            Layout::open(&config.data_dir).context("invalid value for key \"data_dir\"")?;
        let default_name = config.default_host().unwrap_or_default();
        let metrics = Metrics::new(
            std::iter::once(default_name.clone())
                .chain(config.upstreams.iter().map(|u| u.host.clone()))
                .collect(),
        );
        let upstream = Arc::new(Upstream::new(config, metrics.for_upstream(0))?);
        let objects = match config.storage_url.as_str() {
            "" => None,
            url => Some(Arc::new(ObjectStorage::from_url(url).map_err(|e| {
                anyhow::anyhow!("invalid value for key \"storage_url\": {e}")
            })?)),
        };
        // Each upstream's manifests, shared through object storage under its own prefix.
        let clustered = !config.redis_url.0.is_empty();
        let manifest_cache = |layout: Layout, prefix: String| -> std::io::Result<ManifestCache> {
            let cache = ManifestCache::open(layout, config.manifest_cache_bytes.as_u64())?;
            Ok(match &objects {
                Some(objects) => cache.shared(Arc::clone(objects), prefix, clustered),
                None => cache,
            })
        };
        let manifests = Arc::new(manifest_cache(layout.clone(), String::new())?);
        let limits = DiskLimits {
            max: config.cache_max_disk.as_u64(),
            high: config.cache_high_watermark,
            low: config.cache_low_watermark,
            min_free: config.cache_min_free_disk.as_u64(),
            scrub_rate: config.scrub_rate.as_u64(),
            scrub_interval: config.scrub_interval,
            verify_on_serve: config.verify_on_serve,
        };
        let blobs = BlobStore::open(layout.clone(), limits, Arc::clone(&metrics))?;
        let peers = match clustered {
            true => {
                let cluster = Cluster::new(&config.redis_url.0, config.advertised())
                    .map_err(|e| anyhow::anyhow!("invalid value for key \"redis_url\": {e}"))?;
                Some(Peers::new(config, Arc::new(cluster))?)
            }
            false => None,
        };
        let bucket = objects.clone().map(|objects| {
            let cluster = peers.as_ref().map(|p| Arc::clone(&p.cluster));
            Arc::new(Bucket::new(
                objects,
                cluster,
                config.storage_max_bytes.as_u64(),
            ))
        });
        let replicas = Arc::new(Replicas { bucket, peers });
        if let Some(cluster) = replicas.cluster() {
            cluster.share_limits(&default_name, Arc::clone(&upstream));
        }
        if let Some(bucket) = &replicas.bucket {
            bucket.spawn_eviction(Arc::downgrade(&blobs));
        }
        blobs.warn_if_short_of_space();
        blobs.spawn_maintenance();
        let mut others = Vec::new();
        for (i, u) in config.upstreams.iter().enumerate() {
            let derived = config.for_upstream(u);
            let upstream = Arc::new(Upstream::new(&derived, metrics.for_upstream(i + 1))?);
            if let Some(cluster) = replicas.cluster() {
                cluster.share_limits(&u.host, Arc::clone(&upstream));
            }
            let dir = u.host.replace(':', "_");
            let manifests = Arc::new(manifest_cache(
                layout.upstream(&dir)?,
                format!("upstreams/{dir}/"),
            )?);
            let proxy = Proxy::new(
                &derived,
                upstream,
                manifests,
                Arc::clone(&blobs),
                Arc::clone(&replicas),
            )?
            .named(&u.host, false);
            others.push(Arc::new(proxy));
        }
        let proxy = Arc::new(
            Proxy::new(config, Arc::clone(&upstream), manifests, blobs, replicas)?
                .named(&default_name, true),
        );
        if let Some(cluster) = proxy.replicas.cluster() {
            // Weak: the purge follower lives with the cluster, which the proxies hold.
            let proxies: Vec<std::sync::Weak<Proxy>> = std::iter::once(&proxy)
                .chain(&others)
                .map(Arc::downgrade)
                .collect();
            cluster.follow_purges(Arc::new(move |purged: crate::cluster::Purged| {
                let proxy = proxies
                    .iter()
                    .filter_map(std::sync::Weak::upgrade)
                    .find(|p| p.name() == purged.upstream);
                Box::pin(async move {
                    if let Some(proxy) = proxy {
                        proxy.apply_purge(&purged).await;
                    }
                })
            }));
        }
        // One line per upstream, so a first run shows what it will ask and with what.
        for p in std::iter::once(&proxy).chain(&others) {
            let (_, _, tags) = p.manifests.sizes();
            tracing::info!(
                host = %p.name(),
                url = %p.upstream.base(),
                credentials = p.upstream.has_credentials(),
                tags,
                "upstream"
            );
        }
        let mut default_names: Vec<String> = if config.namespaces.is_empty() {
            crate::config::DOCKER_HUB_NAMES
                .iter()
                .map(|n| (*n).to_owned())
                .chain([default_name])
                .collect()
        } else {
            config.namespaces.clone()
        };
        default_names
            .iter_mut()
            .for_each(|n| n.make_ascii_lowercase());
        let known = layout
            .read_state(UPSTREAM_STATE)
            .and_then(|raw| serde_json::from_slice::<UpstreamState>(&raw).ok())
            .filter(|s| s.upstream == config.upstream)
            .map_or(0, |s| if s.docker_hub { 2 } else { 1 });
        Ok(AppState {
            proxy,
            metrics,
            admin_token: config.admin_token.clone(),
            disk_limit: config.cache_max_disk.as_u64(),
            docker_hub: AtomicU8::new(known),
            layout,
            upstream_url: config.upstream.clone(),
            others,
            default_names,
            access: crate::access::Access::from_config(config)?,
            deadline: config.upstream_deadline,
        })
    }

    /// Whether one-component names mean `library/<name>`: known from the upstream's host name,
    /// else learned from its first challenge and remembered in the data directory. Never a
    /// guess: while it cannot be learned, the request fails (and the caller's deadline bounds
    /// the wait), so a name never depends on how fast the upstream answered.
    pub async fn docker_hub(&self) -> Result<bool, Error> {
        match self.docker_hub.load(Ordering::Relaxed) {
            1 => return Ok(false),
            2 => return Ok(true),
            _ => {}
        }
        let docker_hub = Box::pin(self.proxy.upstream.is_docker_hub()).await?;
        if self
            .docker_hub
            .swap(1 + u8::from(docker_hub), Ordering::Relaxed)
            == 0
        {
            let state = UpstreamState {
                upstream: self.upstream_url.clone(),
                docker_hub,
            };
            let (layout, path) = (self.layout.clone(), self.layout.root().join(UPSTREAM_STATE));
            tokio::task::spawn_blocking(move || {
                let written = serde_json::to_vec(&state)
                    .map_err(std::io::Error::other)
                    .and_then(|json| layout.write_atomic(&path, &[&json], false));
                if let Err(e) = written {
                    tracing::warn!(error = %e, "could not remember what the upstream is");
                }
            });
        }
        Ok(docker_hub)
    }

    /// Whether the upstream is known to be Docker Hub, without asking it (for the cache API).
    pub fn docker_hub_known(&self) -> bool {
        self.docker_hub.load(Ordering::Relaxed) == 2 || self.proxy.upstream.known_docker_hub()
    }

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
            upstreams,
            blobs: self.proxy.blobs.count(),
            blob_bytes: self.proxy.blobs.total_bytes(),
            downloads: self.proxy.blobs.downloads(),
            object_storage: (self.proxy.replicas.bucket.as_ref()).map(|b| b.objects().counts()),
            redis: self.proxy.replicas.cluster().map(|c| c.counts()),
        }
    }

    /// Which upstream a `/v2/` request is for: containerd's `?ns=<host>`, else a path prefix
    /// `<host>/` naming a configured upstream, else the default. Returns the proxy, the path
    /// tail without the prefix, and whether it is the default upstream. A host that is not
    /// configured is 404 `NAME_UNKNOWN`, with no outbound request: pullthrough never fetches
    /// from an address a client chose.
    pub async fn route<'a>(
        &self,
        tail: &'a str,
        query: Option<&str>,
    ) -> Result<(Arc<Proxy>, &'a str, bool), Error> {
        // Compared without case and without a lowercased copy: containerd sends `ns` with
        // every request, cache hits included.
        let ns = query.and_then(|q| {
            url::form_urlencoded::parse(q.as_bytes())
                .find(|(k, _)| k == "ns")
                .map(|(_, v)| v)
        });
        let by_host = |host: &str| self.others.iter().find(|p| p.name() == host).cloned();
        if let Some(ns) = ns {
            if self
                .default_names
                .iter()
                .any(|n| n.eq_ignore_ascii_case(&ns))
            {
                return Ok((Arc::clone(&self.proxy), tail, true));
            }
            return match self
                .others
                .iter()
                .find(|p| p.name().eq_ignore_ascii_case(&ns))
            {
                Some(proxy) => Ok((Arc::clone(proxy), tail, false)),
                None => Err(Error::UpstreamUnknown(
                    ns.to_ascii_lowercase().chars().take(255).collect(),
                )),
            };
        }
        if let Some((first, rest)) = tail.split_once('/') {
            if let Some(proxy) = by_host(first) {
                return Ok((proxy, rest, false));
            }
            // A first component that is a host by the reference grammar (a `.` or `:`, or
            // `localhost`: distribution's `reference` package) names a registry, as clients
            // read it. The default upstream's own names (`docker.io/library/alpine`) mean it;
            // any other is not mirrored here, and is never asked of the default upstream.
            if first.contains(['.', ':']) || first == "localhost" {
                if self.default_names.iter().any(|n| n == first) {
                    return Ok((Arc::clone(&self.proxy), rest, true));
                }
                return Err(Error::UpstreamUnknown(first.chars().take(255).collect()));
            }
        }
        Ok((Arc::clone(&self.proxy), tail, true))
    }

    /// Who a request of the cache API or the status page is from: `admin` when it carries the
    /// admin token. With access control on, a client is identified as for a pull (and wrong
    /// credentials are refused as there).
    pub async fn viewer(
        &self,
        admin: bool,
        authorization: Option<&str>,
        peer: Option<std::net::IpAddr>,
    ) -> Result<Viewer, Error> {
        if admin {
            return Ok(Viewer::Admin);
        }
        match (&self.access, &self.admin_token) {
            (_, Some(_)) => Ok(Viewer::Nobody),
            (None, None) => Ok(Viewer::Admin),
            (Some(access), None) => Box::pin(access.identify(authorization, peer))
                .await
                .map(Viewer::Client)
                .map_err(refused),
        }
    }

    /// Whether `viewer` may see `repository` of `proxy`'s upstream: the same rule as pulling.
    pub fn may_see(&self, viewer: &Viewer, proxy: &Proxy, repository: &RepoName) -> bool {
        self.check_view(viewer, proxy, repository).is_ok()
    }

    /// [`Self::may_see`], with the error a refused viewer gets.
    pub fn check_view(
        &self,
        viewer: &Viewer,
        proxy: &Proxy,
        repository: &RepoName,
    ) -> Result<(), Error> {
        match (viewer, &self.access) {
            (Viewer::Admin, _) => Ok(()),
            (Viewer::Nobody, _) | (Viewer::Client(_), None) => Err(Error::AccessDenied),
            (Viewer::Client(identity), Some(access)) => access
                .allows(identity, self.rule_host(proxy), repository.as_str())
                .map_err(refused),
        }
    }

    /// How `[[access]]` rules name `proxy`'s upstream: `docker.io` for the default one.
    fn rule_host<'a>(&self, proxy: &'a Proxy) -> &'a str {
        if std::ptr::eq(proxy, Arc::as_ptr(&self.proxy)) {
            "docker.io"
        } else {
            proxy.name()
        }
    }

    /// Whether the client may pull `repository` from `proxy`'s upstream (always, without access
    /// control). Credentials are checked before anything is looked up or fetched, so private
    /// content, cached or downloading, is never served to a client that may not see it.
    pub async fn authorize(
        &self,
        authorization: Option<&str>,
        peer: Option<std::net::IpAddr>,
        proxy: &Proxy,
        repository: &str,
    ) -> Result<(), Error> {
        let Some(access) = &self.access else {
            return Ok(());
        };
        let identity = Box::pin(access.identify(authorization, peer))
            .await
            .map_err(refused)?;
        access
            .allows(&identity, self.rule_host(proxy), repository)
            .map_err(refused)
    }

    /// `GET /v2/` with access control: 200 for valid credentials, else 401 with the Basic
    /// challenge, so clients send the credentials they have.
    pub async fn check_login(
        &self,
        authorization: Option<&str>,
        peer: Option<std::net::IpAddr>,
    ) -> Result<(), Error> {
        use crate::access::Identity;
        let Some(access) = &self.access else {
            return Ok(());
        };
        match access
            .identify(authorization, peer)
            .await
            .map_err(refused)?
        {
            Identity::User(_) => Ok(()),
            Identity::Anonymous => Err(Error::Unauthenticated("authentication required")),
        }
    }

    /// Waits until the cache writes started so far are on disk.
    pub async fn flushed(&self) {
        for proxy in self.proxies() {
            proxy.manifests.flushed().await;
        }
    }

    /// Every proxy: the default first.
    pub fn proxies(&self) -> impl Iterator<Item = &Arc<Proxy>> {
        std::iter::once(&self.proxy).chain(self.others.iter())
    }
}

/// The registry error for an access refusal.
fn refused(refusal: crate::access::Refusal) -> Error {
    use crate::access::Refusal;
    match refusal {
        Refusal::Unauthenticated(why) => Error::Unauthenticated(why),
        Refusal::Denied => Error::AccessDenied,
        Refusal::Braked {
            address,
            retry_after,
        } => Error::LoginsBraked {
            address: crate::access::brake_label(address),
            retry_after,
        },
    }
}
