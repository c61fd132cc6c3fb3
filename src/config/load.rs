//! Figment layering: built-in defaults, then the file, then `PULLTHROUGH_*` variables, then
//! flags. Also the messages for what cannot be read: a TOML syntax error with the file's name
//! and line, an unknown key with the nearest known one, a bad value with where it was set.

use super::{Config, ConfigError, LogFormat, one_line_str};
use figment::Figment;
use figment::providers::{Format, Serialized, Toml};
use figment::value::{Dict, Map, Value};
use figment::{Metadata, Profile, Provider};
use serde::{Deserializer, Serialize};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;
use url::Url;

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

/// Provider names, for error messages that say where a bad value came from.
const ENV_SOURCE: &str = "environment variable";

impl Config {
    /// Layers defaults, the file (if any), `PULLTHROUGH_*` variables from `env`, and flags.
    /// `env` is passed in so tests never touch the process environment. Environment values
    /// are taken byte for byte as strings; numbers and booleans are read from them only where
    /// the setting is a number or a boolean.
    pub fn load(
        file: Option<&Path>,
        env: impl IntoIterator<Item = (String, String)>,
        overrides: &Overrides,
    ) -> Result<Config, ConfigError> {
        let mut figment = Figment::from(Serialized::defaults(Config::default()));
        if let Some(path) = file {
            check_file(path)?;
            figment = figment.merge(Toml::file_exact(path));
        }
        figment = figment.merge(EnvVars::from_env(env)?);
        figment = figment.merge(Serialized::defaults(overrides));
        let config: Config = figment.extract_lossy().map_err(|e| describe(&figment, e))?;
        // Of a pair that contradicts itself, blame the key that was set, not the default.
        let is_set = |key: &str| {
            figment
                .find_metadata(key)
                .is_some_and(|m| !m.name.ends_with("Config"))
        };
        config.validate_loaded(is_set).map_err(|(key, why)| {
            ConfigError(format!(
                "invalid value for {}: {why}",
                source_of(&figment, key)
            ))
        })?;
        Ok(config)
    }

    /// Every key the file and the environment accept, read from the type itself.
    pub fn keys() -> &'static [&'static str] {
        struct_fields::<Config>()
    }
}

/// Checks that the file at `path` exists and is TOML before figment reads it, so that a syntax
/// error names the file and shows the line.
fn check_file(path: &Path) -> Result<(), ConfigError> {
    if !path.is_file() {
        return Err(ConfigError(format!(
            "config file {} does not exist",
            path.display()
        )));
    }
    let text = std::fs::read_to_string(path)
        .map_err(|e| ConfigError(format!("cannot read config file {}: {e}", path.display())))?;
    match toml::from_str::<toml::Table>(&text) {
        Ok(_) => Ok(()),
        Err(e) => Err(syntax_error(path, &text, &e)),
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

impl EnvVars {
    /// The `PULLTHROUGH_*` entries of `env` (but `PULLTHROUGH_CONFIG`, which names the file),
    /// keys lower case and nested at `__`. A key with an empty part (`PULLTHROUGH__X`) is an
    /// unknown setting.
    fn from_env(env: impl IntoIterator<Item = (String, String)>) -> Result<EnvVars, ConfigError> {
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
        Ok(EnvVars(vars))
    }
}

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
fn syntax_error(path: &Path, text: &str, e: &toml::de::Error) -> ConfigError {
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

#[cfg(test)]
mod tests {
    use crate::config::tests::env;
    use crate::config::{Config, Overrides, Runtime, Secret};
    use bytesize::ByteSize;
    use std::time::Duration;

    #[test]
    fn an_access_rule_may_name_any_configured_upstream() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("p.toml");
        let htpasswd = dir.path().join("htpasswd");
        std::fs::write(&htpasswd, "").unwrap();
        let text = format!(
            "htpasswd = {htpasswd:?}\n\
             [[upstreams]]\nhost = \"ghcr.io\"\nurl = \"https://ghcr.io\"\n\
             [[access]]\nupstream = \"ghcr.io\"\nanonymous = true\n"
        );
        std::fs::write(&file, &text).unwrap();
        let c = Config::load(Some(&file), env(&[]), &Overrides::default()).unwrap();
        assert_eq!(c.access[0].upstream, "ghcr.io");
        // A host that is not configured is still refused.
        std::fs::write(
            &file,
            text.replace("upstream = \"ghcr.io\"", "upstream = \"quay.io\""),
        )
        .unwrap();
        let e = Config::load(Some(&file), env(&[]), &Overrides::default()).unwrap_err();
        assert!(e.to_string().contains("quay.io"), "{e}");
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
    fn the_runtime_is_per_core_or_work_stealing() {
        for (text, runtime) in [
            ("per-core", Runtime::PerCore),
            ("work-stealing", Runtime::WorkStealing),
        ] {
            let vars = env(&[("PULLTHROUGH_RUNTIME", text)]);
            let c = Config::load(None, vars, &Overrides::default()).unwrap();
            assert_eq!(c.runtime, runtime);
        }
    }

    #[test]
    fn bad_values_name_the_key() {
        let cases = [
            (("PULLTHROUGH_TAG_TTL", "soon"), "tag_ttl"),
            (("PULLTHROUGH_LISTEN", "nowhere"), "listen"),
            (("PULLTHROUGH_UPSTREAM", "ftp://x"), "upstream"),
            (("PULLTHROUGH_LOG_FORMAT", "xml"), "log_format"),
            (("PULLTHROUGH_RUNTIME", "threads"), "runtime"),
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
        let documented = include_str!("../../config/pullthrough.toml");
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
