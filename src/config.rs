//! Runtime settings, layered by figment: built-in defaults < `config/pullthrough.toml` (or
//! `--config`/`PULLTHROUGH_CONFIG`) < `PULLTHROUGH_<KEY>` environment variables (nested tables
//! joined by `__`) < command-line flags. `config/pullthrough.toml` documents every key.

use bytesize::ByteSize;
use figment::Figment;
use figment::providers::{Format, Serialized, Toml};
use figment::value::{Dict, Map, Value};
use figment::{Metadata, Profile, Provider};
use serde::{Deserialize, Deserializer, Serialize};
use std::fmt;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;
use url::Url;

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
}

/// One more registry: the name it stands for, where it is, its credential, and its own tag
/// policy and concurrency (each falling back to the top-level setting).
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct UpstreamConfig {
    /// The registry name clients use: `ghcr.io`, `quay.io`, `registry.example:5000`.
    pub host: String,
    /// Where to reach it.
    #[serde(deserialize_with = "registry_url")]
    pub url: Url,
    /// Account name.
    #[serde(default)]
    pub username: Option<String>,
    /// Password or access token.
    #[serde(default)]
    pub password: Option<Secret>,
    /// File holding the password.
    #[serde(default)]
    pub password_file: Option<PathBuf>,
    /// `tag_ttl` for this registry.
    #[serde(default, with = "humantime_serde::option")]
    pub tag_ttl: Option<Duration>,
    /// `max_stale` for this registry.
    #[serde(default, with = "humantime_serde::option")]
    pub max_stale: Option<Duration>,
    /// `immutable_tags` for this registry.
    #[serde(default)]
    pub immutable_tags: Option<Vec<String>>,
    /// `upstream_max_concurrency` for this registry.
    #[serde(default)]
    pub max_concurrency: Option<usize>,
}

/// Who may pull what: the rule with the longest matching `prefix` (for the request's upstream,
/// or `*`) decides. Without a matching rule, authenticated clients may pull and anonymous ones
/// may not.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AccessRule {
    /// The registry: `docker.io` (the default upstream), an `[[upstreams]]` host, or `*`.
    #[serde(default = "any_upstream")]
    pub upstream: String,
    /// Repository prefix, e.g. `team/` (empty: every repository).
    #[serde(default)]
    pub prefix: String,
    /// Users (or token names) allowed; `*` for any authenticated client.
    #[serde(default)]
    pub users: Vec<String>,
    /// Clients without credentials are allowed too.
    #[serde(default)]
    pub anonymous: bool,
}

fn any_upstream() -> String {
    "*".to_owned()
}

/// Hosts that mean Docker Hub, as clients name it.
pub const DOCKER_HUB_NAMES: &[&str] = &[
    "docker.io",
    "index.docker.io",
    "registry-1.docker.io",
    "registry.hub.docker.com",
];

impl UpstreamConfig {
    /// A further upstream `host` at `url`, anonymous, with the top-level policy.
    pub fn new(host: &str, url: Url) -> UpstreamConfig {
        UpstreamConfig {
            host: host.to_owned(),
            url,
            username: None,
            password: None,
            password_file: None,
            tag_ttl: None,
            max_stale: None,
            immutable_tags: None,
            max_concurrency: None,
        }
    }

    /// Whether `host` is a registry host name (`name[.name...][:port]`, lower case).
    fn valid_host(host: &str) -> bool {
        let (name, port) = match host.rsplit_once(':') {
            Some((name, port)) => (name, Some(port)),
            None => (host, None),
        };
        !name.is_empty()
            && name.len() <= 253
            && name.split('.').all(|label| {
                !label.is_empty()
                    && label.len() <= 63
                    && label
                        .bytes()
                        .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
                    && !label.starts_with('-')
                    && !label.ends_with('-')
            })
            && port.is_none_or(|p| {
                !p.is_empty()
                    && !p.starts_with('0')
                    && p.bytes().all(|b| b.is_ascii_digit())
                    && p.parse::<u16>().is_ok()
            })
    }
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

impl Default for Config {
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

/// Overrides given as command-line flags, already parsed by clap (which names the flag when a
/// value does not parse); `None` leaves the lower layers alone.
#[derive(Debug, Default, Serialize)]
pub struct Overrides {
    /// `--listen`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub listen: Option<SocketAddr>,
    /// `--upstream`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub upstream: Option<Url>,
    /// `--tag-ttl`.
    #[serde(
        skip_serializing_if = "Option::is_none",
        with = "humantime_serde::option"
    )]
    pub tag_ttl: Option<Duration>,
    /// `--data-dir`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub data_dir: Option<PathBuf>,
    /// `--log-format`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub log_format: Option<LogFormat>,
}

/// The longest duration any setting accepts: ten years. Larger values are typos, and they would
/// overflow the clock arithmetic they feed.
const MAX_DURATION: Duration = Duration::from_secs(10 * 365 * 24 * 3600);
/// Provider names, for error messages that say where a bad value came from.
const ENV_SOURCE: &str = "environment variable";

impl Config {
    /// Layers defaults, the file (if any), `PULLTHROUGH_*` variables from `env`, and flags.
    /// `env` is passed in so tests never touch the process environment. Environment values
    /// are taken byte for byte as strings; numbers and booleans are read from them only where
    /// the setting is a number or a boolean.
    pub fn load(
        file: Option<&std::path::Path>,
        env: impl IntoIterator<Item = (String, String)>,
        overrides: &Overrides,
    ) -> Result<Config, ConfigError> {
        let mut figment = Figment::from(Serialized::defaults(Config::default()));
        if let Some(path) = file {
            if !path.is_file() {
                return Err(ConfigError(format!(
                    "config file {} does not exist",
                    path.display()
                )));
            }
            // Checked here first, so a syntax error names the file and shows the line.
            let text = std::fs::read_to_string(path).map_err(|e| {
                ConfigError(format!("cannot read config file {}: {e}", path.display()))
            })?;
            if let Err(e) = toml::from_str::<toml::Table>(&text) {
                return Err(syntax_error(path, &text, &e));
            }
            figment = figment.merge(Toml::file_exact(path));
        }
        let vars: Vec<(String, String)> = env
            .into_iter()
            .filter_map(|(k, v)| {
                let key = k.strip_prefix("PULLTHROUGH_")?.to_ascii_lowercase();
                (key != "config").then_some((key.replace("__", "."), v))
            })
            .collect();
        if let Some((key, _)) = vars.iter().find(|(k, _)| k.split('.').any(str::is_empty)) {
            return Err(ConfigError(format!(
                "unknown setting: environment variable PULLTHROUGH_{}; {}",
                key.replace('.', "__").to_ascii_uppercase(),
                known_keys_hint(key)
            )));
        }
        figment = figment.merge(EnvVars(vars));
        figment = figment.merge(Serialized::defaults(overrides));
        let config: Config = figment.extract_lossy().map_err(|e| describe(&figment, e))?;
        // Of a pair that contradicts itself, blame the key that was set, not the default.
        let set = |key: &str| {
            figment
                .find_metadata(key)
                .is_some_and(|m| !m.name.ends_with("Config"))
        };
        if config.cache_low_watermark >= config.cache_high_watermark
            && set("cache_high_watermark")
            && !set("cache_low_watermark")
        {
            return Err(ConfigError(format!(
                "invalid value for {}: must be above cache_low_watermark ({})",
                source_of(&figment, "cache_high_watermark"),
                config.cache_low_watermark
            )));
        }
        if config.credentials_open_to_all()
            && !config.listen.ip().to_canonical().is_loopback()
            && !config.allow_open_credentials
        {
            return Err(ConfigError(format!(
                "invalid value for {}: upstream credentials are configured and pullthrough has no client access control, so every client that reaches {} could read the account's private images; listen on loopback, or set allow_open_credentials = true to accept that",
                source_of(&figment, "listen"),
                config.listen
            )));
        }
        config.validate().map_err(|(key, why)| {
            ConfigError(format!(
                "invalid value for {}: {why}",
                source_of(&figment, key)
            ))
        })?;
        Ok(config)
    }

    /// Checks every value against its range; the error names the key.
    fn validate(&self) -> Result<(), (&'static str, String)> {
        let bad = |key: &'static str, why: &str| Err((key, why.to_owned()));
        if !matches!(self.upstream.scheme(), "http" | "https") || self.upstream.host_str().is_none()
        {
            return bad("upstream", "must be an http:// or https:// URL with a host");
        }
        if !self.upstream.username().is_empty() || self.upstream.password().is_some() {
            return bad(
                "upstream",
                "must not carry credentials; set upstream_username and upstream_password(_file)",
            );
        }
        if self.upstream.query().is_some() || !matches!(self.upstream.path(), "" | "/") {
            return bad(
                "upstream",
                "must be the registry root, without a path or query",
            );
        }
        if self.data_dir.as_os_str().is_empty() {
            return bad("data_dir", "must not be empty");
        }
        if self.upstream_username.as_deref() == Some("") {
            return bad("upstream_username", "must not be empty");
        }
        if let Some(token) = &self.admin_token {
            if token.0.trim() != token.0 {
                return bad(
                    "admin_token",
                    "must not start or end with white space (a newline from a file?)",
                );
            }
            if token.0.len() < 16 || !token.0.bytes().all(|b| b.is_ascii_graphic()) {
                return bad(
                    "admin_token",
                    "must be at least 16 visible ASCII characters",
                );
            }
        }
        if self.upstream_password.is_some() && self.upstream_password_file.is_some() {
            return bad(
                "upstream_password_file",
                "set either upstream_password or upstream_password_file, not both",
            );
        }
        if (self.upstream_password.is_some() || self.upstream_password_file.is_some())
            && self.upstream_username.is_none()
        {
            return bad("upstream_username", "a password is set but no username");
        }
        let durations = [
            ("tag_ttl", self.tag_ttl, true),
            ("max_stale", self.max_stale, false),
            ("upstream_deadline", self.upstream_deadline, true),
            ("max_upstream_pause", self.max_upstream_pause, true),
            ("scrub_interval", self.scrub_interval, true),
            ("tags_list_ttl", self.tags_list_ttl, false),
            ("connect_timeout", self.connect_timeout, true),
            ("request_timeout", self.request_timeout, true),
            ("client_header_timeout", self.client_header_timeout, true),
            ("client_idle_timeout", self.client_idle_timeout, true),
            ("shutdown_grace", self.shutdown_grace, false),
        ];
        for (key, value, positive) in durations {
            if positive && value.is_zero() {
                return bad(key, "must be greater than zero");
            }
            if value > MAX_DURATION {
                return bad(key, "must be at most 10 years");
            }
        }
        if !(0.0..1.0).contains(&self.ratelimit_reserve) {
            return bad(
                "ratelimit_reserve",
                "must be a fraction from 0 to below 1, such as 0.1",
            );
        }
        if !(1..=4096).contains(&self.upstream_max_concurrency) {
            return bad("upstream_max_concurrency", "must be from 1 to 4096");
        }
        if !(1..=1_000_000).contains(&self.max_client_connections) {
            return bad("max_client_connections", "must be from 1 to 1000000");
        }
        let sizes = [
            (
                "cache_max_disk",
                self.cache_max_disk,
                ByteSize::mib(1),
                ByteSize::pib(1),
            ),
            (
                "manifest_cache_bytes",
                self.manifest_cache_bytes,
                ByteSize::kib(64),
                ByteSize::gib(64),
            ),
            (
                "tags_list_cache_bytes",
                self.tags_list_cache_bytes,
                ByteSize::kib(64),
                ByteSize::gib(64),
            ),
            (
                "cache_min_free_disk",
                self.cache_min_free_disk,
                ByteSize::b(0),
                ByteSize::pib(1),
            ),
            (
                "scrub_rate",
                self.scrub_rate,
                ByteSize::b(0),
                ByteSize::pib(1),
            ),
        ];
        for (key, value, min, max) in sizes {
            if value < min || value > max {
                return bad(key, &format!("must be from {min} to {max}"));
            }
        }
        if !self.storage_url.is_empty()
            && let Err(e) = crate::objects::ObjectStorage::from_url(&self.storage_url)
        {
            return bad("storage_url", &e);
        }
        if !self.redis_url.0.is_empty() {
            if let Err(e) = redis::Client::open(self.redis_url.0.as_str()) {
                return bad("redis_url", &e.to_string());
            }
            if self.storage_url.is_empty() {
                return bad(
                    "redis_url",
                    "needs storage_url: replicas share content through object storage",
                );
            }
            if self.cluster_secret.as_ref().is_none_or(|s| s.0.len() < 16) {
                return bad(
                    "cluster_secret",
                    "must be set (16 characters or more) with redis_url: it authenticates requests between replicas",
                );
            }
            if self.advertise_url.is_empty() && self.listen.ip().is_unspecified() {
                return bad(
                    "advertise_url",
                    "must be set when listen is a wildcard address: the other replicas need this one's address",
                );
            }
        }
        if self.storage_max_bytes.as_u64() > 0 && self.redis_url.0.is_empty() {
            return bad(
                "storage_max_bytes",
                "needs redis_url: the cluster keeps the access order and evicts one replica at a time",
            );
        }
        if !self.advertise_url.is_empty() {
            match Url::parse(&self.advertise_url) {
                Ok(u) if matches!(u.scheme(), "http" | "https") && u.host_str().is_some() => {}
                _ => return bad("advertise_url", "must be an http(s) URL naming a host"),
            }
        }
        if !(self.cache_high_watermark > 0.0 && self.cache_high_watermark <= 1.0) {
            return bad(
                "cache_high_watermark",
                "must be a fraction above 0 and at most 1",
            );
        }
        if !(self.cache_low_watermark > 0.0 && self.cache_low_watermark < self.cache_high_watermark)
        {
            return bad(
                "cache_low_watermark",
                "must be a fraction above 0 and below cache_high_watermark",
            );
        }
        self.password()
            .map_err(|e| ("upstream_password_file", e.0))?;
        self.validate_upstreams()?;
        self.validate_access()?;
        if self.tls_cert.is_some() != self.tls_key.is_some() {
            return bad("tls_key", "set both tls_cert and tls_key, or neither");
        }
        for pattern in &self.immutable_tags {
            if let Err(e) = regex::Regex::new(pattern) {
                return bad(
                    "immutable_tags",
                    &format!(
                        "{pattern:?} is not a regular expression: {}",
                        one_line_str(&e.to_string())
                    ),
                );
            }
        }
        Ok(())
    }

    /// Checks `[[upstreams]]`: host names, unique and not Docker Hub's (the default upstream
    /// stands for Docker Hub), and each as valid as a whole configuration.
    fn validate_upstreams(&self) -> Result<(), (&'static str, String)> {
        let mut seen: Vec<&str> = Vec::new();
        for u in &self.upstreams {
            let bad = |why: String| Err(("upstreams", format!("host {:?}: {why}", u.host)));
            if !UpstreamConfig::valid_host(&u.host) {
                return bad(
                    "must be a registry host name such as ghcr.io or registry.example:5000".into(),
                );
            }
            let without_port = u.host.split(':').next().unwrap_or_default();
            if DOCKER_HUB_NAMES.contains(&without_port) {
                return bad("is Docker Hub, which the top-level upstream stands for".into());
            }
            if self.default_host().as_deref() == Some(u.host.as_str()) {
                return bad("is the top-level upstream's own host".into());
            }
            if self
                .namespaces
                .iter()
                .any(|n| n.eq_ignore_ascii_case(&u.host))
            {
                return bad("is also in namespaces, which name the top-level upstream".into());
            }
            if seen.contains(&u.host.as_str()) {
                return bad("is configured twice".into());
            }
            seen.push(&u.host);
            if let Err((key, why)) = self.for_upstream(u).validate() {
                let key = match key {
                    "upstream" => "url",
                    "upstream_username" => "username",
                    "upstream_password_file" => "password_file",
                    "upstream_max_concurrency" => "max_concurrency",
                    other => other,
                };
                return bad(format!("{key}: {why}"));
            }
        }
        Ok(())
    }

    /// Every `[[access]]` rule names a registry clients can reach: a rule that matches nothing
    /// would silently leave open what it meant to close.
    fn validate_access(&self) -> Result<(), (&'static str, String)> {
        for rule in &self.access {
            let known = rule.upstream == "*"
                || rule.upstream.eq_ignore_ascii_case("docker.io")
                || self
                    .upstreams
                    .iter()
                    .any(|u| u.host.eq_ignore_ascii_case(&rule.upstream));
            if !known {
                let accepted: Vec<String> = ["docker.io", "*"]
                    .into_iter()
                    .map(str::to_owned)
                    .chain(self.upstreams.iter().map(|u| u.host.clone()))
                    .map(|h| format!("{h:?}"))
                    .collect();
                return Err((
                    "access",
                    format!(
                        "upstream {:?} is not a registry mirrored here; a rule names {} (the top-level upstream is \"docker.io\", whatever its URL)",
                        rule.upstream,
                        accepted.join(", ")
                    ),
                ));
            }
        }
        Ok(())
    }

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

    /// The settings of one of `upstreams`, as a whole configuration: its URL and credential,
    /// and its tag policy and concurrency where set, the top-level values elsewhere.
    pub fn for_upstream(&self, u: &UpstreamConfig) -> Config {
        Config {
            upstream: u.url.clone(),
            upstream_username: u.username.clone(),
            upstream_password: u.password.clone(),
            upstream_password_file: u.password_file.clone(),
            tag_ttl: u.tag_ttl.unwrap_or(self.tag_ttl),
            max_stale: u.max_stale.unwrap_or(self.max_stale),
            immutable_tags: u
                .immutable_tags
                .clone()
                .unwrap_or_else(|| self.immutable_tags.clone()),
            upstream_max_concurrency: u.max_concurrency.unwrap_or(self.upstream_max_concurrency),
            upstreams: Vec::new(),
            ..self.clone()
        }
    }

    /// Whether clients authenticate and `[[access]]` rules apply (`htpasswd` or
    /// `client_tokens_file` set). Then cached content reaches a repository only where its own
    /// upstream shows it, whoever fetched it.
    pub fn access_control(&self) -> bool {
        self.htpasswd.is_some() || self.client_tokens_file.is_some()
    }

    /// The top-level upstream's `host[:port]`, as clients name a registry.
    pub fn default_host(&self) -> Option<String> {
        let host = self.upstream.host_str()?;
        Some(match self.upstream.port() {
            Some(port) => format!("{host}:{port}"),
            None => host.to_owned(),
        })
    }

    /// Whether any upstream has credentials (then cached content may be private).
    pub fn has_credentials(&self) -> bool {
        self.upstream_username.is_some() || self.upstreams.iter().any(|u| u.username.is_some())
    }

    /// Upstream credentials without client access control: every client reads what they can.
    pub fn credentials_open_to_all(&self) -> bool {
        self.has_credentials() && self.htpasswd.is_none() && self.client_tokens_file.is_none()
    }

    /// Every key the file and the environment accept, read from the type itself.
    pub fn keys() -> &'static [&'static str] {
        struct_fields::<Config>()
    }
}

/// The field names serde knows for `T`: a deserializer that only records what
/// `deserialize_struct` is told and then fails.
fn struct_fields<T: serde::de::DeserializeOwned>() -> &'static [&'static str] {
    use serde::de::{self, Visitor};
    struct Capture<'a>(&'a mut &'static [&'static str]);
    impl<'de> Deserializer<'de> for Capture<'_> {
        type Error = de::value::Error;
        fn deserialize_any<V: Visitor<'de>>(self, _: V) -> Result<V::Value, Self::Error> {
            Err(de::Error::custom("not a struct"))
        }
        fn deserialize_struct<V: Visitor<'de>>(
            self,
            _: &'static str,
            fields: &'static [&'static str],
            _: V,
        ) -> Result<V::Value, Self::Error> {
            *self.0 = fields;
            Err(de::Error::custom("fields captured"))
        }
        serde::forward_to_deserialize_any! {
            bool i8 i16 i32 i64 i128 u8 u16 u32 u64 u128 f32 f64 char str string bytes byte_buf
            option unit unit_struct newtype_struct seq tuple tuple_struct map enum identifier
            ignored_any
        }
    }
    let mut fields: &'static [&'static str] = &[];
    let _ = T::deserialize(Capture(&mut fields));
    fields
}

/// `PULLTHROUGH_*` variables as a figment provider: every value a string, byte for byte (nested
/// tables joined by `__`), from a list the caller passes in.
struct EnvVars(Vec<(String, String)>);

impl Provider for EnvVars {
    fn metadata(&self) -> Metadata {
        Metadata::named(ENV_SOURCE).interpolater(|_: &Profile, keys: &[&str]| {
            format!("PULLTHROUGH_{}", keys.join("__").to_ascii_uppercase())
        })
    }

    fn data(&self) -> Result<Map<Profile, Dict>, figment::Error> {
        let mut dict = Dict::new();
        for (key, raw) in &self.0 {
            let value = Value::from(raw.clone());
            if let Some(nested) = figment::util::nest(key, value).into_dict() {
                for (k, v) in nested {
                    dict.insert(k, v);
                }
            }
        }
        Ok(Profile::Default.collect(dict))
    }
}

/// The key and where its value came from, for messages: `key "k" (PULLTHROUGH_K)`,
/// `key "k" (--k)`, `key "k" in <file>`, or `key "k"`.
fn source_of(figment: &Figment, key: &str) -> String {
    match figment.find_metadata(key) {
        Some(m) if m.name == ENV_SOURCE => {
            format!("key {key:?} (PULLTHROUGH_{})", key.to_ascii_uppercase())
        }
        // figment names a `Serialized` provider after the type: the flags are `Overrides`.
        Some(m) if m.name.ends_with("Overrides") => {
            format!("key {key:?} (--{})", key.replace('_', "-"))
        }
        Some(m) => match &m.source {
            Some(figment::Source::File(path)) => format!("key {key:?} in {}", path.display()),
            _ => format!("key {key:?}"),
        },
        None => format!("key {key:?}"),
    }
}

/// A figment error as one line naming the key and where it was set.
fn describe(figment: &Figment, e: figment::Error) -> ConfigError {
    use figment::error::Kind;
    let key = e.path.join(".");
    let text = match &e.kind {
        Kind::UnknownField(field, _) => {
            let place = match e.metadata.as_ref().map(|m| (m.name.as_ref(), &m.source)) {
                Some((ENV_SOURCE, _)) => {
                    format!(
                        "environment variable PULLTHROUGH_{}",
                        field.to_ascii_uppercase()
                    )
                }
                Some((_, Some(figment::Source::File(path)))) => {
                    format!("key {field:?} in {}", path.display())
                }
                _ => format!("key {field:?}"),
            };
            return ConfigError(format!(
                "unknown setting: {place}; {}",
                known_keys_hint(field)
            ));
        }
        // Never echo a secret's value, even a mistyped one.
        _ if key.contains("password") || key.contains("token") => {
            "must be a string (quote it in the file)".to_owned()
        }
        kind => kind.to_string(),
    };
    let place = if key.is_empty() {
        "configuration".to_owned()
    } else {
        source_of(figment, &key)
    };
    ConfigError(format!(
        "invalid value for {place}: {}",
        one_line_str(&text)
    ))
}

/// `listen` from the file or the environment: an address, or `host:port` resolved once.
fn listen_address<'de, D: Deserializer<'de>>(d: D) -> Result<SocketAddr, D::Error> {
    let text = String::deserialize(d)?;
    resolve_listen(&text).map_err(serde::de::Error::custom)
}

/// `127.0.0.1:5000`, `[::]:5000` or a host name with a port (`localhost:5000`, resolved now,
/// its first address taken), as servers users know accept.
pub fn resolve_listen(text: &str) -> Result<SocketAddr, String> {
    if let Ok(addr) = text.parse() {
        return Ok(addr);
    }
    use std::net::ToSocketAddrs as _;
    match text.to_socket_addrs() {
        Ok(mut addrs) => addrs
            .next()
            .ok_or_else(|| format!("{text} resolves to no address")),
        Err(_) if !text.contains(':') => Err(format!(
            "{text:?} has no port; write host:port, e.g. 127.0.0.1:5000"
        )),
        Err(e) => Err(format!(
            "{text:?} is not an address or a host:port that resolves: {e}"
        )),
    }
}

/// A registry URL from the file or the environment, read as [`parse_url`] reads a flag.
fn registry_url<'de, D: Deserializer<'de>>(d: D) -> Result<Url, D::Error> {
    let text = String::deserialize(d)?;
    parse_url(&text).map_err(serde::de::Error::custom)
}

/// An upstream or other registry URL, with a message that says what a bare `host:port` lacks.
pub fn parse_url(text: &str) -> Result<Url, String> {
    let hint = || format!("a URL needs http:// or https:// in front, e.g. http://{text}");
    match Url::parse(text) {
        Ok(url) if matches!(url.scheme(), "http" | "https") => Ok(url),
        Ok(url) if text.contains("://") => Err(format!(
            "must be an http:// or https:// URL, not {}://",
            url.scheme()
        )),
        // `127.0.0.1:5000` parses as a URL of scheme "127.0.0.1"; `host:5000` of scheme "host".
        Ok(_) | Err(url::ParseError::RelativeUrlWithoutBase) => Err(hint()),
        Err(e) => Err(format!("{text:?} is not a URL: {e}")),
    }
}

/// The known key nearest to `field`, if one is near enough to be what was meant.
fn nearest_key(field: &str) -> Option<&'static str> {
    Config::keys()
        .iter()
        .map(|k| (strsim::damerau_levenshtein(field, k), *k))
        .filter(|(d, k)| *d <= 2.max(k.len() / 4))
        .min_by_key(|(d, _)| *d)
        .map(|(_, k)| k)
}

/// What to say after an unknown key: the nearest known one, or where they are listed.
fn known_keys_hint(field: &str) -> String {
    match nearest_key(&field.to_ascii_lowercase()) {
        Some(key) => format!("did you mean {key:?}?"),
        None => "config/pullthrough.toml documents every key".to_owned(),
    }
}

/// A TOML syntax error in `path`, as one line naming the file, the line and its text.
fn syntax_error(path: &std::path::Path, text: &str, e: &toml::de::Error) -> ConfigError {
    let at = e.span().map_or(0, |s| s.start).min(text.len());
    let line = text
        .get(..at)
        .map_or(0, |before| before.matches('\n').count());
    let shown: String = text
        .lines()
        .nth(line)
        .unwrap_or_default()
        .trim()
        .chars()
        .take(120)
        .collect();
    ConfigError(format!(
        "config file {} is not valid TOML: line {}: {}: {shown}",
        path.display(),
        line + 1,
        one_line_str(e.message())
    ))
}

fn one_line_str(s: &str) -> String {
    s.split_whitespace().collect::<Vec<_>>().join(" ")
}

/// A number with a fraction, from a number or from a string parsed exactly (figment's lossy
/// reading goes through `f32` and would turn "0.95" into 0.949999988).
fn fraction<'de, D: Deserializer<'de>>(d: D) -> Result<f64, D::Error> {
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum Raw {
        Number(f64),
        Text(String),
    }
    match Raw::deserialize(d)? {
        Raw::Number(n) => Ok(n),
        Raw::Text(s) => s
            .trim()
            .parse()
            .map_err(|_| serde::de::Error::custom(format!("{s:?} is not a number"))),
    }
}

/// A list setting: a TOML array, or from the environment a string holding one (`["a", "b"]`),
/// or a single plain string (one element, so a regex may contain commas).
fn list<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<String>, D::Error> {
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum Raw {
        List(Vec<String>),
        One(String),
    }
    match Raw::deserialize(d)? {
        Raw::List(items) => Ok(items),
        Raw::One(s) if s.trim_start().starts_with('[') => {
            // A TOML array, read by the toml crate (figment's own value parser panics on some
            // escapes after non-ASCII text).
            #[derive(Deserialize)]
            struct Wrapped {
                v: Vec<String>,
            }
            toml::from_str::<Wrapped>(&format!("v = {s}"))
                .map(|w| w.v)
                .map_err(|_| {
                    serde::de::Error::custom(
                        "expected a TOML list of strings, such as [\"a\", 'b']",
                    )
                })
        }
        Raw::One(s) if s.is_empty() => Ok(Vec::new()),
        Raw::One(s) => Ok(vec![s]),
    }
}

impl Config {
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

    fn env(pairs: &[(&str, &str)]) -> Vec<(String, String)> {
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

    #[test]
    fn layers_file_env_and_flags() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("p.toml");
        std::fs::write(
            &file,
            "tag_ttl = \"10s\"\nlisten = \"127.0.0.1:1\"\nupstream_username = \"bob\"\n",
        )
        .unwrap();
        let vars = env(&[
            ("PULLTHROUGH_TAG_TTL", "5m"),
            ("PULLTHROUGH_UPSTREAM_PASSWORD", "1234"),
            ("HOME", "/root"),
            ("PULLTHROUGH_CONFIG", "x"),
        ]);
        let flags = Overrides {
            listen: Some("127.0.0.1:2".parse().unwrap()),
            ..Overrides::default()
        };
        let c = Config::load(Some(&file), vars, &flags).unwrap();
        assert_eq!(c.tag_ttl, Duration::from_secs(300));
        assert_eq!(c.listen.port(), 2);
        assert_eq!(c.upstream_username.as_deref(), Some("bob"));
        assert_eq!(c.password().unwrap(), Some(Secret("1234".into())));
        assert!(!format!("{c:?}").contains("1234"));
    }

    #[test]
    fn replica_settings_are_checked_at_startup() {
        let secret = ("PULLTHROUGH_CLUSTER_SECRET", "0123456789abcdef0123");
        let storage = ("PULLTHROUGH_STORAGE_URL", "s3://bucket/prefix");
        let redis = ("PULLTHROUGH_REDIS_URL", "redis://127.0.0.1:6379/0");
        let cases: [(&[(&str, &str)], &str); 8] = [
            (
                &[("PULLTHROUGH_STORAGE_URL", "http://bucket")],
                "storage_url",
            ),
            (
                &[("PULLTHROUGH_STORAGE_URL", "s3:///prefix")],
                "storage_url",
            ),
            (
                &[("PULLTHROUGH_STORAGE_URL", "s3://bucket/p?x=1")],
                "storage_url",
            ),
            (&[redis, secret], "needs storage_url"),
            (&[redis, storage], "cluster_secret"),
            (
                &[redis, storage, ("PULLTHROUGH_CLUSTER_SECRET", "short")],
                "cluster_secret",
            ),
            (
                &[
                    redis,
                    storage,
                    secret,
                    ("PULLTHROUGH_LISTEN", "0.0.0.0:5000"),
                ],
                "advertise_url",
            ),
            (
                &[storage, ("PULLTHROUGH_STORAGE_MAX_BYTES", "1 GiB")],
                "redis_url",
            ),
        ];
        for (vars, want) in cases {
            let err = Config::load(None, env(vars), &Overrides::default())
                .unwrap_err()
                .to_string();
            assert!(err.contains(want), "{vars:?}: {err}");
            assert!(!err.contains('\n'), "{err}");
        }
        let ok = Config::load(None, env(&[redis, storage, secret]), &Overrides::default()).unwrap();
        assert_eq!(ok.advertised(), "http://127.0.0.1:5000");
        // The Redis URL (it can carry a password) and the secret stay out of Debug output.
        let shown = format!("{ok:?}");
        assert!(
            !shown.contains("6379") && !shown.contains("0123456789abcdef"),
            "{shown}"
        );
    }

    #[test]
    fn bad_values_name_the_key() {
        let cases = [
            (("PULLTHROUGH_TAG_TTL", "soon"), "tag_ttl"),
            (("PULLTHROUGH_LISTEN", "nowhere"), "listen"),
            (("PULLTHROUGH_UPSTREAM", "ftp://x"), "upstream"),
            (("PULLTHROUGH_LOG_FORMAT", "xml"), "log_format"),
            (
                ("PULLTHROUGH_UPSTREAM", "https://me:secret@registry.example"),
                "upstream",
            ),
            (
                ("PULLTHROUGH_MANIFEST_CACHE_BYTES", "lots"),
                "manifest_cache_bytes",
            ),
            (("PULLTHROUGH_RATELIMIT_RESERVE", "2"), "ratelimit_reserve"),
            (("PULLTHROUGH_IMMUTABLE_TAGS", "[\"(\"]"), "immutable_tags"),
            (("PULLTHROUGH_TAG_TLL", "1s"), "TAG_TLL"),
            (
                (
                    "PULLTHROUGH_UPSTREAM_MAX_CONCURRENCY",
                    "3000000000000000000",
                ),
                "PULLTHROUGH_UPSTREAM_MAX_CONCURRENCY",
            ),
            (
                ("PULLTHROUGH_MAX_STALE", "600000000y"),
                "PULLTHROUGH_MAX_STALE",
            ),
            (
                ("PULLTHROUGH_CACHE_MAX_DISK", "0"),
                "PULLTHROUGH_CACHE_MAX_DISK",
            ),
            (("PULLTHROUGH_DATA_DIR", ""), "PULLTHROUGH_DATA_DIR"),
            (
                ("PULLTHROUGH_CACHE_HIGH_WATERMARK", "1.5"),
                "PULLTHROUGH_CACHE_HIGH_WATERMARK",
            ),
            (
                ("PULLTHROUGH_CACHE_LOW_WATERMARK", "0.95"),
                "PULLTHROUGH_CACHE_LOW_WATERMARK",
            ),
            (
                ("PULLTHROUGH_VERIFY_ON_SERVE", "maybe"),
                "PULLTHROUGH_VERIFY_ON_SERVE",
            ),
            (
                ("PULLTHROUGH_MAX_CLIENT_CONNECTIONS", "0"),
                "PULLTHROUGH_MAX_CLIENT_CONNECTIONS",
            ),
            (
                ("PULLTHROUGH_MAX_UPSTREAM_PAUSE", "0s"),
                "PULLTHROUGH_MAX_UPSTREAM_PAUSE",
            ),
        ];
        for ((k, v), key) in cases {
            let err = Config::load(None, env(&[(k, v)]), &Overrides::default())
                .unwrap_err()
                .to_string();
            assert!(
                err.to_lowercase().contains(&key.to_lowercase()),
                "{k}={v}: {err}"
            );
            assert!(!err.contains('\n'), "{err}");
        }
    }

    #[test]
    fn environment_strings_arrive_byte_for_byte() {
        for password in [
            "007",
            "0123456",
            "1.50",
            "+1",
            "\"quoted\"",
            " spaced ",
            "true",
            "[1]",
        ] {
            let vars = env(&[
                ("PULLTHROUGH_UPSTREAM_USERNAME", "0042"),
                ("PULLTHROUGH_UPSTREAM_PASSWORD", password),
            ]);
            let c = Config::load(None, vars, &Overrides::default()).unwrap();
            assert_eq!(c.password().unwrap(), Some(Secret(password.into())));
            assert_eq!(c.upstream_username.as_deref(), Some("0042"));
        }
        // Numbers, booleans and lists are still read from strings where the key wants them.
        let vars = env(&[
            ("PULLTHROUGH_UPSTREAM_MAX_CONCURRENCY", "7"),
            ("PULLTHROUGH_VERIFY_ON_SERVE", "true"),
            ("PULLTHROUGH_CACHE_HIGH_WATERMARK", "0.95"),
            ("PULLTHROUGH_IMMUTABLE_TAGS", r#"["^v\\d+$", "a,b"]"#),
            ("PULLTHROUGH_NAMESPACES", "docker.io"),
        ]);
        let c = Config::load(None, vars, &Overrides::default()).unwrap();
        assert_eq!(c.upstream_max_concurrency, 7);
        assert!(c.verify_on_serve);
        assert_eq!(c.cache_high_watermark, 0.95);
        assert_eq!(c.immutable_tags, vec![r"^v\d+$".to_owned(), "a,b".into()]);
        assert_eq!(c.namespaces, vec!["docker.io".to_owned()]);
    }

    #[test]
    fn a_typo_in_the_file_is_refused_naming_the_key_and_file() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("p.toml");
        std::fs::write(&file, "tag_tl = \"5s\"\n").unwrap();
        let err = Config::load(Some(&file), env(&[]), &Overrides::default())
            .unwrap_err()
            .to_string();
        assert!(err.contains("tag_tl"), "{err}");
        assert!(err.contains(&file.display().to_string()), "{err}");
        assert!(!err.contains('\n'), "{err}");
        std::fs::write(&file, "tag_ttl = \"soon\"\n").unwrap();
        let err = Config::load(Some(&file), env(&[]), &Overrides::default())
            .unwrap_err()
            .to_string();
        assert!(err.contains("\"tag_ttl\""), "{err}");
        assert!(!err.contains("default."), "{err}");
        // A flag's bad range names the flag.
        let flags = Overrides {
            tag_ttl: Some(Duration::ZERO),
            ..Overrides::default()
        };
        let err = Config::load(None, env(&[]), &flags)
            .unwrap_err()
            .to_string();
        assert!(err.contains("--tag-ttl"), "{err}");
    }

    #[test]
    fn every_documented_key_can_be_set_through_the_environment() {
        let documented = include_str!("../config/pullthrough.toml");
        let mut seen = Vec::new();
        for line in documented.lines() {
            if line.trim() == "# [[upstreams]]" {
                // Tables, file only: documented, not settable through the environment.
                seen.push("upstreams".to_owned());
                seen.push("access".to_owned());
                assert!(documented.contains("# [[access]]"));
                break;
            }
            let line = line.trim_start_matches("# ").trim();
            let Some((key, value)) = line.split_once(" = ") else {
                continue;
            };
            if !key.bytes().all(|b| b.is_ascii_lowercase() || b == b'_') {
                continue;
            }
            let value: toml::Value = toml::from_str(&format!("v = {value}"))
                .map(|t: toml::Table| t["v"].clone())
                .unwrap_or_else(|e| panic!("{key}: {e}"));
            let raw = match value {
                toml::Value::String(s) => s,
                other => other.to_string(),
            };
            let mut vars = vec![(format!("PULLTHROUGH_{}", key.to_ascii_uppercase()), raw)];
            if key.starts_with("upstream_password") {
                vars.push(("PULLTHROUGH_UPSTREAM_USERNAME".into(), "u".into()));
            }
            if key == "tls_cert" {
                vars.push(("PULLTHROUGH_TLS_KEY".into(), "/k.pem".into()));
            }
            if key == "tls_key" {
                vars.push(("PULLTHROUGH_TLS_CERT".into(), "/c.pem".into()));
            }
            if key == "upstream_password_file" {
                vars[0].1 = "/dev/null".into();
            }
            Config::load(None, vars, &Overrides::default())
                .unwrap_or_else(|e| panic!("{key}: {e}"));
            seen.push(key.to_owned());
        }
        for key in Config::keys() {
            assert!(
                seen.iter().any(|k| k == key),
                "{key} is not in config/pullthrough.toml"
            );
        }
    }

    #[test]
    fn a_mistyped_password_is_never_echoed() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("p.toml");
        std::fs::write(
            &file,
            "upstream_username = \"u\"\nupstream_password = 123456789\n",
        )
        .unwrap();
        let err = Config::load(Some(&file), env(&[]), &Overrides::default())
            .unwrap_err()
            .to_string();
        assert!(err.contains("upstream_password"), "{err}");
        assert!(!err.contains("123456789"), "{err}");
    }

    #[test]
    fn credentials_on_an_open_listener_need_consent() {
        let creds = [
            ("PULLTHROUGH_UPSTREAM_USERNAME", "u"),
            ("PULLTHROUGH_UPSTREAM_PASSWORD", "p"),
        ];
        let open = [creds[0], creds[1], ("PULLTHROUGH_LISTEN", "0.0.0.0:5000")];
        let err = Config::load(None, env(&open), &Overrides::default())
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("allow_open_credentials") && err.contains("listen"),
            "{err}"
        );
        let consented = [
            open[0],
            open[1],
            open[2],
            ("PULLTHROUGH_ALLOW_OPEN_CREDENTIALS", "true"),
        ];
        assert!(Config::load(None, env(&consented), &Overrides::default()).is_ok());
        assert!(
            Config::load(None, env(&creds), &Overrides::default()).is_ok(),
            "loopback"
        );
        let anonymous = [("PULLTHROUGH_LISTEN", "0.0.0.0:5000")];
        assert!(Config::load(None, env(&anonymous), &Overrides::default()).is_ok());
    }

    #[test]
    fn reads_password_file_and_nested_env() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("secret");
        std::fs::write(&file, "s3cret\n").unwrap();
        let vars = env(&[
            ("PULLTHROUGH_UPSTREAM_USERNAME", "u"),
            ("PULLTHROUGH_UPSTREAM_PASSWORD_FILE", file.to_str().unwrap()),
            ("PULLTHROUGH_MANIFEST_CACHE_BYTES", "1 MiB"),
        ]);
        let c = Config::load(None, vars, &Overrides::default()).unwrap();
        assert_eq!(c.password().unwrap(), Some(Secret("s3cret".into())));
        assert_eq!(c.manifest_cache_bytes, ByteSize::mib(1));
    }
}
