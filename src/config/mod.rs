//! Runtime settings, layered by figment: built-in defaults < `config/pullthrough.toml` (or
//! `--config`/`PULLTHROUGH_CONFIG`) < `PULLTHROUGH_<KEY>` environment variables (nested tables
//! joined by `__`) < command-line flags. `config/pullthrough.toml` documents every key.
//!
//! This file is the schema: [`Config`], its defaults and small accessors. `load` layers the
//! sources and words what cannot be read, `values` reads single values, `validate` checks
//! ranges, and `upstreams` and `access` hold the two file-only tables.

mod access;
mod load;
mod upstreams;
mod validate;
mod values;

pub use access::AccessRule;
pub use load::Overrides;
pub use upstreams::{DOCKER_HUB_NAMES, UpstreamConfig};
pub use values::{parse_url, resolve_listen};

use bytesize::ByteSize;
use serde::{Deserialize, Serialize};
use std::fmt;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;
use url::Url;
use values::{fraction, list, listen_address, registry_url};

/// Every setting pullthrough reads. Defaults live in [`Config::default`] and nowhere else; the
/// keys accepted from the file and the environment are this struct's fields (serde refuses any
/// other), so the list of keys cannot drift from the type.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Config {
    /// Address to listen on (a host name is resolved once, at startup).
    #[serde(deserialize_with = "listen_address")]
    pub listen: SocketAddr,
    /// Registry to pull through.
    #[serde(deserialize_with = "registry_url")]
    pub upstream: Url,
    /// How long a tag → digest answer is trusted before it is revalidated with an upstream HEAD.
    #[serde(with = "humantime_serde")]
    pub tag_ttl: Duration,
    /// How long past `tag_ttl` a tag may still be served while revalidating (in the
    /// background) or while upstream fails. Zero makes every expired tag wait for upstream.
    #[serde(with = "humantime_serde")]
    pub max_stale: Duration,
    /// The `ns` values (containerd's `?ns=`) that mean the default upstream. Empty: Docker Hub's
    /// names and the upstream's own host. Any other `ns` that is no `[[upstreams]]` host is 404.
    #[serde(deserialize_with = "list")]
    pub namespaces: Vec<String>,
    /// Regular expressions for tags that never change once seen, and so are never revalidated.
    #[serde(deserialize_with = "list")]
    pub immutable_tags: Vec<String>,
    /// Response headers reach the client within this time, whatever upstream does.
    #[serde(with = "humantime_serde")]
    pub upstream_deadline: Duration,
    /// Fraction of upstream's rate limit kept for content pullthrough does not have yet.
    #[serde(deserialize_with = "fraction")]
    pub ratelimit_reserve: f64,
    /// When a revalidation finds a tag moved, fetch in the background the new content clients
    /// pulled under the old digest (their platforms' manifests, configs and layers).
    pub prefetch_on_move: bool,
    /// Most requests in flight to the upstream at once, each counted until its body is read.
    pub upstream_max_concurrency: usize,
    /// The longest pause a 429's `Retry-After` can impose on upstream requests.
    #[serde(with = "humantime_serde")]
    pub max_upstream_pause: Duration,
    /// Root of the on-disk cache (blobs, manifests, tag index).
    pub data_dir: PathBuf,
    /// Upstream account name, for private repositories and a larger Docker Hub budget.
    pub upstream_username: Option<String>,
    /// Upstream password or access token.
    pub upstream_password: Option<Secret>,
    /// File holding the upstream password (as container secrets are mounted).
    pub upstream_password_file: Option<PathBuf>,
    /// Memory for manifests held in RAM, in bytes (all manifests are also kept on disk); each
    /// upstream (the default and every `[[upstreams]]` entry) has this much.
    pub manifest_cache_bytes: ByteSize,
    /// Memory for cached tags-list pages, in bytes, per upstream.
    pub tags_list_cache_bytes: ByteSize,
    /// Most disk the blob store may use before least recently used blobs are evicted.
    pub cache_max_disk: ByteSize,
    /// Eviction starts above this fraction of `cache_max_disk`...
    #[serde(deserialize_with = "fraction")]
    pub cache_high_watermark: f64,
    /// ...and stops below this one.
    #[serde(deserialize_with = "fraction")]
    pub cache_low_watermark: f64,
    /// Free space eviction keeps on the data directory's filesystem (0 disables).
    pub cache_min_free_disk: ByteSize,
    /// Bytes per second the background scrub re-hashes stored blobs at (0 disables it).
    pub scrub_rate: ByteSize,
    /// Pause between two scrub passes over the store.
    #[serde(with = "humantime_serde")]
    pub scrub_interval: Duration,
    /// Hash every blob served from the store, holding its last byte until it verifies.
    pub verify_on_serve: bool,
    /// Shared object storage for replicas, `s3://bucket[/prefix]`; empty: the local disk only.
    /// Endpoint, region and credentials come from the `AWS_*` environment variables.
    pub storage_url: String,
    /// Most bytes of blobs kept in object storage (least recently used across the cluster
    /// evicted first); 0: no limit. Needs `redis_url`.
    pub storage_max_bytes: ByteSize,
    /// Redis coordinating replicas (`redis://host:port/db`); empty: a single node. Needs
    /// `storage_url` and `cluster_secret`.
    /// (Redacted in `Debug`: the URL can carry Redis's password.)
    pub redis_url: Secret,
    /// This replica's address for the other replicas; empty: `http(s)://<listen>`.
    pub advertise_url: String,
    /// Shared secret of the replicas' internal requests.
    pub cluster_secret: Option<Secret>,
    /// How long a tags list answer is reused.
    #[serde(with = "humantime_serde")]
    pub tags_list_ttl: Duration,
    /// Ask no upstream anything (registry, token realm, blob CDN): serve what is cached, tags
    /// whatever their age, and answer 503 for the rest. Switchable at run time through the
    /// cache API (`PUT /_pullthrough/offline`).
    pub offline: bool,
    /// How long an upstream 404 for a tag or manifest is remembered, per upstream and
    /// repository, so repeated requests for something missing cost one upstream request per
    /// this time. `0s` turns the negative cache off.
    #[serde(with = "humantime_serde")]
    pub negative_ttl: Duration,
    /// Most upstream 404s remembered at once (least recently used forgotten first); 0 turns
    /// the negative cache off.
    pub negative_cache_entries: u64,
    /// Time allowed to open a connection to the upstream.
    #[serde(with = "humantime_serde")]
    pub connect_timeout: Duration,
    /// Time allowed for one upstream manifest, token or tags request, and the longest an
    /// upstream blob stream may stall.
    #[serde(with = "humantime_serde")]
    pub request_timeout: Duration,
    /// A client must send a complete request head within this time, counted from the
    /// connection's start or the end of its previous response.
    #[serde(with = "humantime_serde")]
    pub client_header_timeout: Duration,
    /// A client connection on which no byte moves for this long is closed (after the response
    /// in progress, if any).
    #[serde(with = "humantime_serde")]
    pub client_idle_timeout: Duration,
    /// Open client connections above which the quietest ones are closed to make room.
    pub max_client_connections: usize,
    /// More registries, chosen by containerd's `?ns=<host>` or a `/v2/<host>/...` path prefix.
    /// File only (`[[upstreams]]` tables); the top-level `upstream` stays the default.
    pub upstreams: Vec<UpstreamConfig>,
    /// PEM certificate chain for TLS on the listener (with `tls_key`); re-read when it changes.
    pub tls_cert: Option<PathBuf>,
    /// PEM private key for `tls_cert`.
    pub tls_key: Option<PathBuf>,
    /// Client users: an htpasswd file of bcrypt entries (`htpasswd -B`). With this or
    /// `client_tokens_file`, clients authenticate and `[[access]]` rules decide who may pull.
    pub htpasswd: Option<PathBuf>,
    /// Client bearer tokens: a file of `name:token` lines.
    pub client_tokens_file: Option<PathBuf>,
    /// Who may pull what, by upstream and repository prefix (file only, `[[access]]` tables).
    pub access: Vec<AccessRule>,
    /// Accept upstream credentials on a listener that is not loopback although there is no
    /// client access control (every client that reaches it can read the private images).
    pub allow_open_credentials: bool,
    /// Bearer token for the cache API under `/_pullthrough/` (then every endpoint needs it;
    /// without it, reading is open and purging is accepted from loopback clients only).
    pub admin_token: Option<Secret>,
    /// How long in-flight responses may finish after a shutdown signal.
    #[serde(with = "humantime_serde")]
    pub shutdown_grace: Duration,
    /// Log format.
    pub log_format: LogFormat,
    /// How client connections are spread over the cores.
    pub runtime: Runtime,
}

/// How log events are written.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    /// Human-readable lines.
    Text,
    /// One JSON object per line.
    Json,
}

/// How the server's threads take client connections.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Runtime {
    /// One thread per core, each with a current-thread runtime; one of them accepts on the
    /// listener and serves each connection itself or hands it to the thread holding the fewest
    /// (nginx's workers, balanced): a connection's tasks stay on one thread and are run in the
    /// order they were woken. The default.
    PerCore,
    /// One listener and tokio's multi-thread runtime, whose threads steal each other's tasks.
    WorkStealing,
}

impl Default for Config {
    #[allow(clippy::expect_used, reason = "a constant URL, parsed in every test")]
    fn default() -> Self {
        Config {
            listen: SocketAddr::from(([127, 0, 0, 1], 5000)),
            upstream: Url::parse("https://registry-1.docker.io").expect("constant URL"),
            tag_ttl: Duration::from_secs(60),
            max_stale: Duration::from_secs(24 * 3600),
            namespaces: Vec::new(),
            immutable_tags: Vec::new(),
            upstream_deadline: Duration::from_secs(10),
            ratelimit_reserve: 0.1,
            prefetch_on_move: true,
            upstream_max_concurrency: 32,
            max_upstream_pause: Duration::from_secs(3600),
            data_dir: PathBuf::from("pullthrough-data"),
            upstream_username: None,
            upstream_password: None,
            upstream_password_file: None,
            manifest_cache_bytes: ByteSize::mib(32),
            tags_list_cache_bytes: ByteSize::mib(16),
            cache_max_disk: ByteSize::gib(20),
            cache_high_watermark: 0.9,
            cache_low_watermark: 0.8,
            cache_min_free_disk: ByteSize::gib(1),
            scrub_rate: ByteSize::mib(16),
            scrub_interval: Duration::from_secs(24 * 3600),
            verify_on_serve: false,
            storage_url: String::new(),
            storage_max_bytes: ByteSize::b(0),
            redis_url: Secret::default(),
            advertise_url: String::new(),
            cluster_secret: None,
            tags_list_ttl: Duration::from_secs(30),
            offline: false,
            negative_ttl: Duration::from_secs(10),
            negative_cache_entries: 10_000,
            connect_timeout: Duration::from_secs(5),
            request_timeout: Duration::from_secs(30),
            client_header_timeout: Duration::from_secs(20),
            client_idle_timeout: Duration::from_secs(60),
            max_client_connections: 1024,
            upstreams: Vec::new(),
            htpasswd: None,
            client_tokens_file: None,
            access: Vec::new(),
            tls_cert: None,
            tls_key: None,
            allow_open_credentials: false,
            admin_token: None,
            shutdown_grace: Duration::from_secs(30),
            log_format: LogFormat::Text,
            runtime: Runtime::PerCore,
        }
    }
}

/// A string that never appears in `Debug` output or logs.
#[derive(Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(transparent)]
pub struct Secret(pub String);

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("\"<redacted>\"")
    }
}

/// A configuration problem, reported as one line naming the key.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct ConfigError(String);

/// `s` with every run of white space (newlines too) made one space, for one-line messages.
fn one_line_str(s: &str) -> String {
    s.split_whitespace().collect::<Vec<_>>().join(" ")
}

impl Config {
    /// The upstream password, read from `upstream_password_file` if that is set.
    pub fn password(&self) -> Result<Option<Secret>, ConfigError> {
        match (&self.upstream_password, &self.upstream_password_file) {
            (Some(p), _) => Ok(Some(p.clone())),
            (None, Some(path)) => std::fs::read_to_string(path)
                .map(|s| Some(Secret(s.trim_end_matches(['\r', '\n']).to_owned())))
                .map_err(|e| ConfigError(format!("cannot read {}: {e}", path.display()))),
            (None, None) => Ok(None),
        }
    }

    /// This replica's address for the others: `advertise_url`, or the listen address.
    pub fn advertised(&self) -> String {
        if !self.advertise_url.is_empty() {
            return self.advertise_url.trim_end_matches('/').to_owned();
        }
        let scheme = if self.tls_cert.is_some() {
            "https"
        } else {
            "http"
        };
        format!("{scheme}://{}", self.listen)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `PULLTHROUGH_*` variables for [`Config::load`], never the process's own.
    pub(super) fn env(pairs: &[(&str, &str)]) -> Vec<(String, String)> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    #[test]
    fn defaults_are_valid() {
        let c = Config::load(None, env(&[]), &Overrides::default()).unwrap();
        assert_eq!(c.listen.to_string(), "127.0.0.1:5000");
        assert_eq!(c.upstream.as_str(), "https://registry-1.docker.io/");
    }
}
