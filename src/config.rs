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

/// Every setting pullthrough reads. Defaults live in [`Config::default`] and nowhere else.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default)]
pub struct Config {
    /// Address to listen on.
    pub listen: SocketAddr,
    /// Registry to pull through.
    pub upstream: Url,
    /// How long a tag → digest answer is trusted before it is revalidated with an upstream HEAD.
    #[serde(with = "humantime_serde")]
    pub tag_ttl: Duration,
    /// How long past `tag_ttl` a tag may still be served while revalidating (in the
    /// background) or while upstream fails. Zero makes every expired tag wait for upstream.
    #[serde(with = "humantime_serde")]
    pub max_stale: Duration,
    /// Registries (containerd's `?ns=` values) this pullthrough mirrors; requests naming another
    /// get 404 so containerd moves on to its next host. Empty accepts every `ns`.
    pub namespaces: Vec<String>,
    /// Regular expressions for tags that never change once seen, and so are never revalidated.
    pub immutable_tags: Vec<String>,
    /// Response headers reach the client within this time, whatever upstream does.
    #[serde(with = "humantime_serde")]
    pub upstream_deadline: Duration,
    /// Fraction of upstream's rate limit kept for content pullthrough does not have yet.
    pub ratelimit_reserve: f64,
    /// Most requests in flight to the upstream at once.
    pub upstream_max_concurrency: usize,
    /// Root of the on-disk cache (blobs, manifests, tag index).
    pub data_dir: PathBuf,
    /// Upstream account name, for private repositories and a larger Docker Hub budget.
    #[serde(deserialize_with = "optional_string")]
    pub upstream_username: Option<String>,
    /// Upstream password or access token.
    #[serde(deserialize_with = "optional_secret")]
    pub upstream_password: Option<Secret>,
    /// File holding the upstream password (as container secrets are mounted).
    pub upstream_password_file: Option<PathBuf>,
    /// Memory for manifests held in RAM, in bytes (all manifests are also kept on disk).
    pub manifest_cache_bytes: ByteSize,
    /// Most disk the blob store may use before least recently used blobs are evicted.
    pub cache_max_disk: ByteSize,
    /// Eviction starts above this fraction of `cache_max_disk`...
    pub cache_high_watermark: f64,
    /// ...and stops below this one.
    pub cache_low_watermark: f64,
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
    /// Log format.
    pub log_format: LogFormat,
}

/// How log events are written.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
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
            data_dir: PathBuf::from("pullthrough-data"),
            upstream_username: None,
            upstream_password: None,
            upstream_password_file: None,
            manifest_cache_bytes: ByteSize::mib(32),
            cache_max_disk: ByteSize::gib(20),
            cache_high_watermark: 0.9,
            cache_low_watermark: 0.8,
            tags_list_ttl: Duration::from_secs(30),
            connect_timeout: Duration::from_secs(5),
            request_timeout: Duration::from_secs(30),
            log_format: LogFormat::Text,
        }
    }
}

/// A string that never appears in `Debug` output or logs.
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
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

/// Overrides given as command-line flags; `None` leaves the lower layers alone.
#[derive(Debug, Default, Serialize)]
pub struct Overrides {
    /// `--listen`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub listen: Option<String>,
    /// `--upstream`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub upstream: Option<String>,
    /// `--tag-ttl`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub tag_ttl: Option<String>,
    /// `--data-dir`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub data_dir: Option<String>,
    /// `--log-format`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub log_format: Option<String>,
}

impl Config {
    /// Layers defaults, the file (if any), `PULLTHROUGH_*` variables from `env`, and flags.
    /// `env` is passed in so tests never touch the process environment.
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
            figment = figment.merge(Toml::file_exact(path));
        }
        let vars: Vec<(String, String)> = env
            .into_iter()
            .filter_map(|(k, v)| {
                let key = k.strip_prefix("PULLTHROUGH_")?.to_ascii_lowercase();
                (key != "config").then_some((key.replace("__", "."), v))
            })
            .collect();
        let unknown: Vec<String> = vars
            .iter()
            .map(|(k, _)| k.split('.').next().unwrap_or_default().to_owned())
            .filter(|k| !KNOWN_KEYS.contains(&k.as_str()))
            .collect();
        if let Some(key) = unknown.first() {
            return Err(ConfigError(format!(
                "unknown setting PULLTHROUGH_{}: known keys are {}",
                key.to_ascii_uppercase(),
                KNOWN_KEYS.join(", ")
            )));
        }
        figment = figment.merge(EnvVars(vars));
        figment = figment.merge(Serialized::defaults(overrides));
        let config: Config = figment.extract().map_err(one_line)?;
        config.validate()?;
        Ok(config)
    }

    fn validate(&self) -> Result<(), ConfigError> {
        let bad = |key: &str, why: &str| {
            Err(ConfigError(format!("invalid value for key {key:?}: {why}")))
        };
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
        for (key, value) in [
            ("tag_ttl", self.tag_ttl),
            ("upstream_deadline", self.upstream_deadline),
            ("connect_timeout", self.connect_timeout),
            ("request_timeout", self.request_timeout),
        ] {
            if value.is_zero() {
                return bad(key, "must be greater than zero");
            }
        }
        if !(0.0..1.0).contains(&self.ratelimit_reserve) {
            return bad(
                "ratelimit_reserve",
                "must be a fraction from 0 to below 1, such as 0.1",
            );
        }
        if self.upstream_max_concurrency == 0 {
            return bad("upstream_max_concurrency", "must be at least 1");
        }
        if !(self.cache_low_watermark > 0.0
            && self.cache_low_watermark < self.cache_high_watermark
            && self.cache_high_watermark <= 1.0)
        {
            return bad(
                "cache_low_watermark",
                "need 0 < cache_low_watermark < cache_high_watermark <= 1",
            );
        }
        self.password()?;
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

    /// The upstream password, read from `upstream_password_file` if that is set.
    pub fn password(&self) -> Result<Option<Secret>, ConfigError> {
        match (&self.upstream_password, &self.upstream_password_file) {
            (Some(p), _) => Ok(Some(p.clone())),
            (None, Some(path)) => std::fs::read_to_string(path)
                .map(|s| Some(Secret(s.trim_end_matches(['\r', '\n']).to_owned())))
                .map_err(|e| {
                    ConfigError(format!(
                        "invalid value for key \"upstream_password_file\": cannot read {}: {e}",
                        path.display()
                    ))
                }),
            (None, None) => Ok(None),
        }
    }
}

/// `PULLTHROUGH_*` variables as a figment provider, parsed as figment's own `Env` does
/// (`30` is a number, `[..]` an array), but from a list the caller passes in.
struct EnvVars(Vec<(String, String)>);

impl Provider for EnvVars {
    fn metadata(&self) -> Metadata {
        Metadata::named("environment variable").interpolater(|_: &Profile, keys: &[&str]| {
            format!("PULLTHROUGH_{}", keys.join("__").to_ascii_uppercase())
        })
    }

    fn data(&self) -> Result<Map<Profile, Dict>, figment::Error> {
        let mut dict = Dict::new();
        for (key, raw) in &self.0 {
            let value: Value = raw.parse().expect("parsing a figment Value is infallible");
            if let Some(nested) = figment::util::nest(key, value).into_dict() {
                for (k, v) in nested {
                    dict.insert(k, v);
                }
            }
        }
        Ok(Profile::Default.collect(dict))
    }
}

const KNOWN_KEYS: &[&str] = &[
    "listen",
    "upstream",
    "tag_ttl",
    "max_stale",
    "immutable_tags",
    "upstream_deadline",
    "ratelimit_reserve",
    "upstream_max_concurrency",
    "data_dir",
    "upstream_username",
    "upstream_password",
    "upstream_password_file",
    "manifest_cache_bytes",
    "cache_max_disk",
    "cache_high_watermark",
    "cache_low_watermark",
    "tags_list_ttl",
    "connect_timeout",
    "request_timeout",
    "log_format",
];

fn one_line(e: figment::Error) -> ConfigError {
    let mut text = e.to_string();
    if let Some(path) = e.path.first().filter(|_| !text.contains("for key")) {
        text = format!("{text} for key {path:?}");
    }
    ConfigError(format!("invalid configuration: {}", one_line_str(&text)))
}

fn one_line_str(s: &str) -> String {
    s.split_whitespace().collect::<Vec<_>>().join(" ")
}

/// Environment values that look like numbers arrive as numbers; a name is still a string.
fn optional_string<'de, D: Deserializer<'de>>(d: D) -> Result<Option<String>, D::Error> {
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum Scalar {
        S(String),
        U(u64),
        I(i64),
        F(f64),
        B(bool),
    }
    Ok(Option::<Scalar>::deserialize(d)?.map(|s| match s {
        Scalar::S(s) => s,
        Scalar::U(n) => n.to_string(),
        Scalar::I(n) => n.to_string(),
        Scalar::F(n) => n.to_string(),
        Scalar::B(b) => b.to_string(),
    }))
}

fn optional_secret<'de, D: Deserializer<'de>>(d: D) -> Result<Option<Secret>, D::Error> {
    Ok(optional_string(d)?.map(Secret))
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
            listen: Some("127.0.0.1:2".into()),
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
