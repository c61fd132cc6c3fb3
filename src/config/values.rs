//! How one setting's text becomes its value: the serde readers that the file and the environment
//! share, and the parsers that the flags use for the same settings.

use serde::{Deserialize, Deserializer};
use std::net::SocketAddr;
use url::Url;

/// `listen` from the file or the environment: an address, or `host:port` resolved once.
pub(super) fn listen_address<'de, D: Deserializer<'de>>(d: D) -> Result<SocketAddr, D::Error> {
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
pub(super) fn registry_url<'de, D: Deserializer<'de>>(d: D) -> Result<Url, D::Error> {
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

/// A number with a fraction, from a number or from a string parsed exactly (figment's lossy
/// reading goes through `f32` and would turn "0.95" into 0.949999988).
pub(super) fn fraction<'de, D: Deserializer<'de>>(d: D) -> Result<f64, D::Error> {
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
pub(super) fn list<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<String>, D::Error> {
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
