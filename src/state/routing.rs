//! Which upstream a `/v2/` request is for: containerd's `?ns=<host>`, a `<host>/` path prefix,
//! or the default.

use super::AppState;
use crate::error::Error;
use crate::proxy::Proxy;
use std::borrow::Cow;
use std::sync::Arc;

impl AppState {
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
        if let Some(ns) = ns_param(query) {
            return self
                .route_ns(&ns)
                .map(|(proxy, default)| (proxy, tail, default));
        }
        if let Some((first, rest)) = tail.split_once('/') {
            if let Some(proxy) = self.others.iter().find(|p| p.name() == first) {
                return Ok((Arc::clone(proxy), rest, false));
            }
            // A first component that names a registry, as clients read it: the default
            // upstream's own names (`docker.io/library/alpine`) mean it; any other is not
            // mirrored here, and is never asked of the default upstream.
            if names_a_registry(first) {
                if self.default_names.iter().any(|n| n == first) {
                    return Ok((Arc::clone(&self.proxy), rest, true));
                }
                return Err(upstream_unknown(first));
            }
        }
        Ok((Arc::clone(&self.proxy), tail, true))
    }

    /// The upstream `ns` names, and whether it is the default one.
    fn route_ns(&self, ns: &str) -> Result<(Arc<Proxy>, bool), Error> {
        // Compared without case and without a lowercased copy: containerd sends `ns` with
        // every request, cache hits included.
        if self
            .default_names
            .iter()
            .any(|n| n.eq_ignore_ascii_case(ns))
        {
            return Ok((Arc::clone(&self.proxy), true));
        }
        match self
            .others
            .iter()
            .find(|p| p.name().eq_ignore_ascii_case(ns))
        {
            Some(proxy) => Ok((Arc::clone(proxy), false)),
            None => Err(upstream_unknown(&ns.to_ascii_lowercase())),
        }
    }
}

/// containerd's `ns` query parameter: the registry host a mirror request is for.
fn ns_param(query: Option<&str>) -> Option<Cow<'_, str>> {
    url::form_urlencoded::parse(query?.as_bytes())
        .find(|(k, _)| k == "ns")
        .map(|(_, v)| v)
}

/// Whether a path's first component is a registry host by the reference grammar: it has a `.`
/// or a `:`, or is `localhost` (distribution's `reference` package).
fn names_a_registry(first: &str) -> bool {
    first.contains(['.', ':']) || first == "localhost"
}

/// The error for a registry not mirrored here, named as asked (at most 255 characters).
fn upstream_unknown(host: &str) -> Error {
    Error::UpstreamUnknown(host.chars().take(255).collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ns_is_read_from_the_query() {
        let cases = [
            (None, None),
            (Some(""), None),
            (Some("ns=docker.io"), Some("docker.io")),
            (Some("x=1&ns=ghcr.io&ns=quay.io"), Some("ghcr.io")),
            (Some("ns=localhost%3A5000"), Some("localhost:5000")),
            (Some("nsx=docker.io"), None),
        ];
        for (query, want) in cases {
            assert_eq!(ns_param(query).as_deref(), want, "{query:?}");
        }
    }

    #[test]
    fn a_first_component_names_a_registry_by_the_reference_grammar() {
        for host in [
            "docker.io",
            "localhost:5000",
            "localhost",
            "10.0.0.1",
            "host:443",
        ] {
            assert!(names_a_registry(host), "{host}");
        }
        for name in ["library", "team", "local-host", "LOCALHOST"] {
            assert!(!names_a_registry(name), "{name}");
        }
    }

    #[test]
    fn an_unknown_registry_is_named_within_bounds() {
        let long = "a".repeat(300);
        match upstream_unknown(&long) {
            Error::UpstreamUnknown(name) => assert_eq!(name.len(), 255),
            other => panic!("{other:?}"),
        }
    }
}
