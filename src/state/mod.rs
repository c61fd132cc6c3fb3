//! `AppState`: every shared handle, built once from `Config` at startup (the steps are in
//! `build`), with what is asked of all of them together: which upstream a request is for
//! (`routing`), who may see and pull what (`authorization`), and the stats and gauges
//! (`stats`).

mod authorization;
mod build;
mod routing;
mod stats;

pub use authorization::Viewer;
pub use stats::{CacheSizes, Readiness, Stats, StoreSizes, UpstreamStats};

use crate::config::Config;
use crate::disk::Layout;
use crate::error::Error;
use crate::metrics::Metrics;
use crate::proxy::Proxy;
use crate::upstream::{Offline, Upstream};
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
    /// The offline switch every upstream client reads (`offline`, `PUT /_pullthrough/offline`).
    pub offline: Arc<Offline>,
}

impl AppState {
    /// Opens the data directory and builds every component.
    pub fn new(config: &Config) -> anyhow::Result<AppState> {
        let layout =
            Layout::open(&config.data_dir).context("invalid value for key \"data_dir\"")?;
        let default_name = config.default_host().unwrap_or_default();
        let metrics = Metrics::new(build::upstream_hosts(config, &default_name));
        let offline = Arc::new(Offline::new(config.offline));
        let upstream = Arc::new(Upstream::new(
            config,
            metrics.for_upstream(0),
            Arc::clone(&offline),
        )?);
        let caches = build::ManifestCaches::new(config)?;
        let manifests = Arc::new(caches.open(layout.clone(), String::new())?);
        let blobs = build::open_blobs(config, &layout, &metrics)?;
        let replicas = build::replicas(config, &caches, &blobs, &default_name, &upstream)?;
        blobs.warn_if_short_of_space();
        blobs.spawn_maintenance();
        let others = build::other_proxies(
            config, &layout, &metrics, &blobs, &replicas, &caches, &offline,
        )?;
        let proxy = Arc::new(
            Proxy::new(config, Arc::clone(&upstream), manifests, blobs, replicas)?
                .named(&default_name, true),
        );
        build::follow_purges(&proxy, &others);
        build::log_upstreams(std::iter::once(&proxy).chain(&others));
        if config.offline {
            tracing::warn!("offline: nothing is asked upstream; what is not cached answers 503");
        }
        Ok(AppState {
            offline,
            proxy,
            metrics,
            admin_token: config.admin_token.clone(),
            disk_limit: config.cache_max_disk.as_u64(),
            docker_hub: AtomicU8::new(remembered_docker_hub(&layout, config)),
            layout,
            upstream_url: config.upstream.clone(),
            others,
            default_names: build::default_names(config, default_name),
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
        let docker_hub = match Box::pin(self.proxy.upstream.is_docker_hub()).await {
            Ok(docker_hub) => docker_hub,
            Err(crate::upstream::Error::Offline) => {
                return Err(Error::Offline(
                    "pullthrough is offline and has not learned yet whether its upstream is Docker Hub, which a one-component name needs: name the repository in full (library/<name>)"
                        .to_owned(),
                ));
            }
            Err(e) => return Err(e.into()),
        };
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

/// What the data directory remembers the upstream to be: 0 not known (or known for another
/// upstream URL), 1 not Docker Hub, 2 Docker Hub.
fn remembered_docker_hub(layout: &Layout, config: &Config) -> u8 {
    layout
        .read_state(UPSTREAM_STATE)
        .and_then(|raw| serde_json::from_slice::<UpstreamState>(&raw).ok())
        .filter(|s| s.upstream == config.upstream)
        .map_or(0, |s| if s.docker_hub { 2 } else { 1 })
}
