//! `Config::load` over an arbitrary TOML file, arbitrary `PULLTHROUGH_*` variables and
//! arbitrary flags: Ok or Err, never a panic; an Ok config satisfies its own validation rules.
//!
//! Input: NUL-separated parts. The first is one flag byte (bit 0: load a file) and the file's
//! text. Each later part is `--listen=`, `--upstream=`, `--tag-ttl=`, `--data-dir=` or
//! `--log-format=` and a flag value, else `KEY=VALUE` for the variable `PULLTHROUGH_KEY`.
#![no_main]

use libfuzzer_sys::fuzz_target;
use pullthrough::Config;
use pullthrough::config::{LogFormat, Overrides};
use std::path::PathBuf;
use std::sync::OnceLock;

fn file_path() -> &'static PathBuf {
    static PATH: OnceLock<PathBuf> = OnceLock::new();
    PATH.get_or_init(|| {
        let dir = tempfile::tempdir().expect("temp dir").keep();
        dir.join("pullthrough.toml")
    })
}

/// `upstream_password_file` makes `load` read that file: keep it off devices and FIFOs, which
/// could block or never end (TOML `\u` escapes could spell such a path too).
fn reads_special_files(text: &str) -> bool {
    ["/dev", "/proc", "/sys", "\\u", "\\U"]
        .iter()
        .any(|s| text.contains(s))
}

fuzz_target!(|data: &[u8]| {
    let Some((&flags, rest)) = data.split_first() else {
        return;
    };
    let text = String::from_utf8_lossy(rest);
    if reads_special_files(&text) {
        return;
    }
    let mut parts = text.split('\0');
    let file_text = parts.next().unwrap_or_default();
    let mut overrides = Overrides::default();
    let mut env = Vec::new();
    for part in parts {
        let (key, value) = part.split_once('=').unwrap_or((part, ""));
        // Flags reach `load` typed, as clap parses them in the binary.
        match key {
            "--listen" => overrides.listen = value.parse().ok(),
            "--upstream" => overrides.upstream = value.parse().ok(),
            "--tag-ttl" => overrides.tag_ttl = humantime::parse_duration(value).ok(),
            "--data-dir" => overrides.data_dir = Some(value.into()),
            "--log-format" => {
                overrides.log_format = match value {
                    "text" => Some(LogFormat::Text),
                    "json" => Some(LogFormat::Json),
                    _ => None,
                }
            }
            _ => env.push((format!("PULLTHROUGH_{key}"), value.to_owned())),
        }
    }
    let file = (flags & 1 == 1).then(|| {
        let path = file_path();
        std::fs::write(path, file_text).expect("write config");
        path.as_path()
    });
    if let Ok(c) = Config::load(file, env, &overrides) {
        assert!(matches!(c.upstream.scheme(), "http" | "https"));
        assert!(c.upstream.host_str().is_some());
        assert!(!c.tag_ttl.is_zero() && !c.request_timeout.is_zero());
        assert!((0.0..1.0).contains(&c.ratelimit_reserve));
        assert!(c.upstream_max_concurrency >= 1);
        assert!(c.cache_low_watermark > 0.0 && c.cache_low_watermark < c.cache_high_watermark);
        assert!(c.cache_high_watermark <= 1.0);
    }
});
