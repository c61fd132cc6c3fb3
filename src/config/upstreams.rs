//! `[[upstreams]]`: the registries mirrored besides the top-level `upstream`, each named by the
//! host clients use, and the checks that keep those names unambiguous.

use super::validate::Invalid;
use super::values::registry_url;
use super::{Config, Secret};
use serde::{Deserialize, Serialize};
use std::path::PathBuf;
use std::time::Duration;
use url::Url;

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

impl Config {
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

    /// The top-level upstream's `host[:port]`, as clients name a registry.
    pub fn default_host(&self) -> Option<String> {
        let host = self.upstream.host_str()?;
        Some(match self.upstream.port() {
            Some(port) => format!("{host}:{port}"),
            None => host.to_owned(),
        })
    }

    /// Checks `[[upstreams]]`: host names, unique and not Docker Hub's (the default upstream
    /// stands for Docker Hub), and each as valid as a whole configuration.
    pub(super) fn validate_upstreams(&self) -> Result<(), Invalid> {
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
}
