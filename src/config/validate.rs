//! Range and consistency checks of a loaded [`Config`]. Each check names the key to blame and
//! why; [`Config::load`] adds where that key was set. The checks run in a fixed order, and the
//! first failure is the one reported.

use super::{Config, one_line_str};
use bytesize::ByteSize;
use std::time::Duration;
use url::Url;

/// A failed check: the key to blame, and why its value is wrong.
pub(super) type Invalid = (&'static str, String);

/// The longest duration any setting accepts: ten years. Larger values are typos, and they would
/// overflow the clock arithmetic they feed.
const MAX_DURATION: Duration = Duration::from_secs(10 * 365 * 24 * 3600);

/// The failure of a check of `key`.
pub(super) fn bad(key: &'static str, why: &str) -> Result<(), Invalid> {
    Err((key, why.to_owned()))
}

impl Config {
    /// The checks of a whole loaded configuration: first those only the top level has, then
    /// [`Config::validate`]. `is_set` says whether a key was set (rather than defaulted), so
    /// that of a pair that contradicts itself, the key that was set is blamed.
    pub(super) fn validate_loaded(&self, is_set: impl Fn(&str) -> bool) -> Result<(), Invalid> {
        if self.cache_low_watermark >= self.cache_high_watermark
            && is_set("cache_high_watermark")
            && !is_set("cache_low_watermark")
        {
            return Err((
                "cache_high_watermark",
                format!(
                    "must be above cache_low_watermark ({})",
                    self.cache_low_watermark
                ),
            ));
        }
        if self.credentials_open_to_all()
            && !self.listen.ip().to_canonical().is_loopback()
            && !self.allow_open_credentials
        {
            return Err((
                "listen",
                format!(
                    "upstream credentials are configured and pullthrough has no client access control, so every client that reaches {} could read the account's private images; listen on loopback, or set allow_open_credentials = true to accept that",
                    self.listen
                ),
            ));
        }
        self.validate()?;
        // Of the whole configuration only: a rule may name any of `upstreams`, which the
        // configuration of one upstream (`for_upstream`) does not list.
        self.validate_access()
    }

    /// Checks every value against its range; the error names the key. Also run for each
    /// `[[upstreams]]` entry, as [`Config::for_upstream`] sees it.
    pub(super) fn validate(&self) -> Result<(), Invalid> {
        self.validate_upstream_url()?;
        if self.data_dir.as_os_str().is_empty() {
            return bad("data_dir", "must not be empty");
        }
        self.validate_credentials()?;
        self.validate_durations()?;
        self.validate_counts()?;
        self.validate_sizes()?;
        self.validate_replicas()?;
        self.validate_watermarks()?;
        self.password()
            .map_err(|e| ("upstream_password_file", e.0))?;
        self.validate_upstreams()?;
        if self.tls_cert.is_some() != self.tls_key.is_some() {
            return bad("tls_key", "set both tls_cert and tls_key, or neither");
        }
        self.validate_immutable_tags()
    }

    /// `upstream` is the root of an http(s) registry, without credentials.
    fn validate_upstream_url(&self) -> Result<(), Invalid> {
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
        Ok(())
    }

    /// The upstream account and the admin token: nothing empty or padded, a password only with
    /// a username, and from one place.
    fn validate_credentials(&self) -> Result<(), Invalid> {
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
        Ok(())
    }

    /// Every duration at most [`MAX_DURATION`], and those that divide or wait above zero.
    fn validate_durations(&self) -> Result<(), Invalid> {
        let durations = [
            ("tag_ttl", self.tag_ttl, true),
            ("max_stale", self.max_stale, false),
            ("upstream_deadline", self.upstream_deadline, true),
            ("max_upstream_pause", self.max_upstream_pause, true),
            ("scrub_interval", self.scrub_interval, true),
            ("tags_list_ttl", self.tags_list_ttl, false),
            ("negative_ttl", self.negative_ttl, false),
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
        Ok(())
    }

    /// The rate-limit reserve and the concurrency limits.
    fn validate_counts(&self) -> Result<(), Invalid> {
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
        if self.negative_cache_entries > 10_000_000 {
            return bad(
                "negative_cache_entries",
                "must be from 0 (no negative cache) to 10000000",
            );
        }
        Ok(())
    }

    /// Memory and disk sizes within their ranges.
    fn validate_sizes(&self) -> Result<(), Invalid> {
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
        Ok(())
    }

    /// Object storage, Redis and the replicas' shared secret and addresses: each setting with
    /// the others it needs.
    fn validate_replicas(&self) -> Result<(), Invalid> {
        if !self.storage_url.is_empty()
            && let Err(e) = crate::objects::ObjectStorage::from_url(&self.storage_url)
        {
            return bad("storage_url", &e);
        }
        if !self.redis_url.0.is_empty() {
            self.validate_cluster()?;
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
        Ok(())
    }

    /// With `redis_url` set: a Redis URL, object storage, a shared secret, and an address the
    /// other replicas can reach.
    fn validate_cluster(&self) -> Result<(), Invalid> {
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
        Ok(())
    }

    /// Eviction's two fractions, the low one below the high one.
    fn validate_watermarks(&self) -> Result<(), Invalid> {
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
        Ok(())
    }

    /// Every `immutable_tags` entry is a regular expression.
    fn validate_immutable_tags(&self) -> Result<(), Invalid> {
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
}

#[cfg(test)]
mod tests {
    use crate::config::tests::env;
    use crate::config::{Config, Overrides};

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
    fn offline_and_the_negative_cache_are_read_from_the_environment_and_checked() {
        let c = Config::load(
            None,
            env(&[
                ("PULLTHROUGH_OFFLINE", "true"),
                ("PULLTHROUGH_NEGATIVE_TTL", "0s"),
                ("PULLTHROUGH_NEGATIVE_CACHE_ENTRIES", "0"),
            ]),
            &Overrides::default(),
        )
        .unwrap();
        assert!(c.offline);
        assert!(c.negative_ttl.is_zero());
        assert_eq!(c.negative_cache_entries, 0);
        let defaults = Config::load(None, env(&[]), &Overrides::default()).unwrap();
        assert!(!defaults.offline);
        assert_eq!(defaults.negative_ttl.as_secs(), 10);
        assert_eq!(defaults.negative_cache_entries, 10_000);
        for (key, value) in [
            ("PULLTHROUGH_OFFLINE", "yes please"),
            ("PULLTHROUGH_NEGATIVE_TTL", "soon"),
            ("PULLTHROUGH_NEGATIVE_TTL", "11y"),
            ("PULLTHROUGH_NEGATIVE_CACHE_ENTRIES", "10000001"),
            ("PULLTHROUGH_NEGATIVE_CACHE_ENTRIES", "-1"),
        ] {
            let err = Config::load(None, env(&[(key, value)]), &Overrides::default())
                .unwrap_err()
                .to_string();
            let named = key.trim_start_matches("PULLTHROUGH_").to_lowercase();
            assert!(
                err.contains(&format!("\"{named}\"")),
                "{key}={value}: {err}"
            );
            assert!(!err.contains('\n'), "{err}");
        }
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
}
