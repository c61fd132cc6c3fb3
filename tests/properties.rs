//! Property tests for every parser that sees outside bytes (`/v2/` paths, names, tags, digests,
//! `Accept`, `Range`, `WWW-Authenticate`, rate-limit headers, manifest lists, referrers indexes and
//! their `artifactType` filter, configuration):
//! none panics on any input, and each round-trips where it has an inverse. `fuzz/` runs the
//! same properties under libFuzzer.

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::too_many_lines,
    reason = "a test panics on what it did not expect, and may read as one long story"
)]

use proptest::prelude::*;
use pullthrough::Config;
use pullthrough::config::Overrides;
use pullthrough::http::path::RegistryPath;
use pullthrough::registry::ByteRange;
use pullthrough::registry::{
    Accept, Algorithm, ArtifactFilter, Digest, MediaType, Negotiation, Reference, RepoName, Tag,
    index_descriptors, platform_child, referrers_tag, render_referrers, union_referrers,
};
use pullthrough::upstream::auth::{Challenge, parse_challenges};
use pullthrough::upstream::ratelimit::{RateLimits, parse_quota, retry_after};
use reqwest::header::{HeaderMap, HeaderName, HeaderValue};
use std::time::Duration;

/// Any string, or one drawn from the characters these grammars care about (so that valid and
/// nearly valid inputs come up often).
fn text(alphabet: &'static str) -> impl Strategy<Value = String> {
    prop_oneof![any::<String>(), alphabet]
}

fn component() -> impl Strategy<Value = String> {
    "[a-z0-9]{1,6}(([._]|__|-{1,3})[a-z0-9]{1,6}){0,2}"
}

fn repo_name() -> impl Strategy<Value = String> {
    prop::collection::vec(component(), 1..4).prop_map(|c| c.join("/"))
}

fn tag() -> impl Strategy<Value = String> {
    "[a-zA-Z0-9_][a-zA-Z0-9._-]{0,127}"
}

fn digest() -> impl Strategy<Value = String> {
    prop_oneof!["sha256:[0-9a-f]{64}", "sha512:[0-9a-f]{128}"]
}

fn header(name: &'static str, value: &str) -> HeaderMap {
    let mut h = HeaderMap::new();
    if let Ok(v) = HeaderValue::from_str(value) {
        h.insert(HeaderName::from_static(name), v);
    }
    h
}

proptest! {
    #[test]
    fn registry_path_never_panics_and_round_trips(
        tail in text("[a-zA-Z0-9._:/%_-]{0,60}(/(manifests|blobs|tags|referrers)/[a-z0-9:._-]{0,70})?"),
        docker_hub: bool,
    ) {
        if let Ok(path) = RegistryPath::parse(&tail, docker_hub) {
            let rendered = match &path {
                RegistryPath::Manifest { name, reference } => format!("{name}/manifests/{reference}"),
                RegistryPath::Blob { name, digest } => format!("{name}/blobs/{digest}"),
                RegistryPath::TagsList { name } => format!("{name}/tags/list"),
                RegistryPath::Referrers { name, digest } => format!("{name}/referrers/{digest}"),
            };
            let hub_name = format!("library/{tail}");
            prop_assert!(rendered == tail || (docker_hub && rendered == hub_name), "{tail:?} rendered as {rendered:?}");
            prop_assert_eq!(RegistryPath::parse(&rendered, docker_hub).ok(), Some(path));
        }
    }

    #[test]
    fn valid_registry_paths_parse(
        name in repo_name(),
        tag in tag(),
        digest in digest(),
        docker_hub: bool,
    ) {
        let full = if docker_hub && !name.contains('/') { format!("library/{name}") } else { name.clone() };
        let parsed = RegistryPath::parse(&format!("{name}/manifests/{tag}"), docker_hub).unwrap();
        prop_assert_eq!(parsed.name().as_str(), full.as_str());
        let ok = matches!(&parsed, RegistryPath::Manifest { reference: Reference::Tag(t), .. } if t.as_str() == tag);
        prop_assert!(ok, "{parsed:?}");
        let parsed = RegistryPath::parse(&format!("{name}/manifests/{digest}"), docker_hub).unwrap();
        let ok = matches!(&parsed, RegistryPath::Manifest { reference: Reference::Digest(d), .. } if d.to_string() == digest);
        prop_assert!(ok, "{parsed:?}");
        let parsed = RegistryPath::parse(&format!("{name}/blobs/{digest}"), docker_hub).unwrap();
        let ok = matches!(&parsed, RegistryPath::Blob { digest: d, .. } if d.to_string() == digest);
        prop_assert!(ok, "{parsed:?}");
        let parsed = RegistryPath::parse(&format!("{name}/tags/list"), docker_hub).unwrap();
        let ok = matches!(&parsed, RegistryPath::TagsList { .. });
        prop_assert!(ok, "{parsed:?}");
        let parsed = RegistryPath::parse(&format!("{name}/referrers/{digest}"), docker_hub).unwrap();
        let ok = matches!(&parsed, RegistryPath::Referrers { digest: d, .. } if d.to_string() == digest);
        prop_assert!(ok, "{parsed:?}");
    }

    #[test]
    fn names_tags_references_digests_round_trip(
        s in text("[a-zA-Z0-9._:/_+=-]{0,40}|(sha256|sha512|md5):[0-9a-fA-F]{60,130}"),
        docker_hub: bool,
    ) {
        if let Ok(name) = RepoName::parse(&s, docker_hub) {
            let shown = name.to_string();
            prop_assert!(shown.len() <= 255);
            let hub_name = format!("library/{s}");
            prop_assert!(shown == s || (docker_hub && !s.contains('/') && shown == hub_name), "{s:?} shown as {shown:?}");
            prop_assert_eq!(RepoName::parse(&shown, docker_hub), Ok(name));
        }
        let tag = Tag::parse(&s);
        if let Ok(t) = &tag {
            prop_assert_eq!(t.as_str(), s.as_str());
            prop_assert!(s.len() <= 128);
        }
        let digest = s.parse::<Digest>();
        if let Ok(d) = &digest {
            prop_assert_eq!(d.to_string(), s.clone());
            let want = match d.algorithm() { Algorithm::Sha256 => 64, Algorithm::Sha512 => 128 };
            prop_assert_eq!(d.hex().len(), want);
        }
        match Reference::parse(&s) {
            Ok(r) => {
                prop_assert_eq!(r.to_string(), s.clone());
                prop_assert_eq!(Reference::parse(&r.to_string()), Ok(r));
            }
            Err(_) if s.contains(':') => prop_assert!(digest.is_err()),
            Err(_) => prop_assert!(tag.is_err()),
        }
    }

    #[test]
    fn valid_names_tags_digests_parse(name in repo_name(), tag in tag(), digest in digest()) {
        prop_assert_eq!(RepoName::parse(&name, false).map(|n| n.to_string()), Ok(name));
        prop_assert_eq!(Tag::parse(&tag).map(|t| t.to_string()), Ok(tag));
        prop_assert_eq!(digest.parse::<Digest>().map(|d| d.to_string()), Ok(digest));
    }

    #[test]
    fn accept_negotiation_follows_distribution(
        lines in prop::collection::vec(
            text("((application/vnd\\.(docker|oci)\\.[a-z.]{0,30}\\+json|\\*/\\*|application/json)(; ?q=0\\.[0-9])?(, ?)?){0,4}"),
            0..4,
        ),
        content_type in text("application/vnd\\.(docker\\.distribution\\.manifest\\.(list\\.)?v2|oci\\.image\\.(index|manifest)\\.v1)\\+json(; charset=utf-8)?"),
        by_tag: bool,
    ) {
        let stored = MediaType::from_content_type(&content_type);
        prop_assert_eq!(MediaType::from_content_type(stored.as_str()), stored.clone());
        let accept = Accept::parse(lines.iter().map(String::as_str));
        let outcome = accept.negotiate(&stored, by_tag);
        if lines.is_empty() {
            prop_assert_eq!(&outcome, &Negotiation::Serve);
        }
        let refusable = [MediaType::OCI_MANIFEST, MediaType::OCI_INDEX, MediaType::DOCKER_LIST];
        if !refusable.contains(&stored.as_str()) {
            prop_assert_eq!(&outcome, &Negotiation::Serve);
        }
        if outcome == Negotiation::PlatformChild {
            prop_assert!(by_tag && stored.as_str() == MediaType::DOCKER_LIST);
        }
    }

    #[test]
    fn ranges_parse_and_resolve_within_bounds(
        value in text("(bytes|items)= ?[0-9+-]{0,22}(-[0-9]{0,21})?(,[0-9]-[0-9])?"),
        size in prop_oneof![0..4096u64, any::<u64>()],
    ) {
        if let Some(range) = ByteRange::parse(&value) {
            match range {
                ByteRange::From(a, Some(b)) => prop_assert!(a <= b),
                ByteRange::Suffix(n) => prop_assert!(n > 0),
                ByteRange::From(_, None) => {}
            }
            if let Some((a, b)) = range.resolve(size) {
                prop_assert!(a <= b && b < size, "{range:?} in {size}: {a}-{b}");
            }
        }
    }

    #[test]
    fn every_well_formed_range_resolves_within_bounds(
        x: u64,
        y: u64,
        size in prop_oneof![0..4096u64, any::<u64>()],
    ) {
        let (a, b) = (x.min(y), x.max(y));
        for (header, range) in [
            (format!("bytes={a}-{b}"), ByteRange::From(a, Some(b))),
            (format!("bytes={a}-"), ByteRange::From(a, None)),
            (format!("bytes=-{}", x.max(1)), ByteRange::Suffix(x.max(1))),
        ] {
            prop_assert_eq!(ByteRange::parse(&header), Some(range));
            match range.resolve(size) {
                Some((lo, hi)) => prop_assert!(lo <= hi && hi < size, "{range:?} in {size}: {lo}-{hi}"),
                None => {
                    let refusable = size == 0 || matches!(range, ByteRange::From(s, _) if s >= size);
                    prop_assert!(refusable, "{range:?} in {size} refused");
                }
            }
        }
    }

    #[test]
    fn parse_quota_never_panics(value in text("[0-9]{0,22} ?(; ?w=[0-9]{0,22})?(, ?[0-9]{1,5};w=[0-9]{1,6})?")) {
        if let Some((count, window)) = parse_quota(&value) {
            let canonical = match window {
                Some(w) => format!("{count};w={w}"),
                None => count.to_string(),
            };
            prop_assert_eq!(parse_quota(&canonical), Some((count, window)));
        }
    }

    #[test]
    fn quotas_parse(count: u64, window: u64, other: u64) {
        prop_assert_eq!(parse_quota(&format!("{count};w={window}, {other};w=1")), Some((count, Some(window))));
        prop_assert_eq!(parse_quota(&format!(" {count} ")), Some((count, None)));
    }

    #[test]
    fn challenge_parser_is_total_and_round_trips(
        value in text("((Bearer|Basic|[A-Za-z]{1,5}) ?([a-zA-Z]{1,6} ?= ?(\"[^\"]{0,12}\"|[a-z:/.]{0,10}) ?,? ?){0,3},? ?){0,3}"),
    ) {
        let challenges = parse_challenges(&value);
        prop_assert!(challenges.len() <= value.len());
        for c in &challenges {
            prop_assert!(!c.scheme.is_empty() && c.scheme == c.scheme.to_ascii_lowercase());
            prop_assert!(c.params.keys().all(|k| !k.is_empty() && *k == k.to_ascii_lowercase()));
        }
        let rendered = render_challenges(&challenges);
        prop_assert_eq!(parse_challenges(&rendered), challenges);
    }

    #[test]
    fn retry_after_and_rate_limits_never_panic(
        retry in text("[0-9]{0,12}|(Sun|Mon), [0-9]{1,2} (Jan|Nov|Dec) [0-9]{4} [0-9:]{8} GMT|[0-9]{4}-[0-9]{2}-[0-9]{2}T[0-9:]{8}Z"),
        limit in text("[0-9]{0,22}(;w=[0-9]{0,22})?"),
        remaining in text("[0-9]{0,22}(;w=[0-9]{0,22})?"),
        source in any::<String>(),
        abuse: bool,
        manifest_get: bool,
    ) {
        let mut headers = header("retry-after", &retry);
        headers.extend(header("ratelimit-limit", &limit));
        headers.extend(header("ratelimit-remaining", &remaining));
        headers.extend(header("docker-ratelimit-source", &source));
        let limits = RateLimits::default();
        limits.observe(&headers);
        let wait = retry_after(&headers);
        limits.pause(wait, abuse);
        if let (Some(left), Some(wait)) = (limits.paused_for(manifest_get), wait) {
            prop_assert!(left <= wait);
        }
        let _ = limits.below_reserve(0.1);
    }

    #[test]
    fn platform_child_never_panics(bytes in prop::collection::vec(any::<u8>(), 0..512)) {
        let _ = platform_child(&bytes);
    }

    #[test]
    fn platform_child_finds_linux_amd64(
        platforms in prop::collection::vec(("(linux|windows|[a-z]{0,6})", "(amd64|arm64|arm|[a-z0-9]{0,6})"), 0..6),
        digests in prop::collection::vec(digest(), 6),
    ) {
        let entries: Vec<String> = platforms
            .iter()
            .zip(&digests)
            .map(|((os, arch), d)| format!(r#"{{"digest":"{d}","size":1,"platform":{{"architecture":"{arch}","os":"{os}"}}}}"#))
            .collect();
        let list = format!(r#"{{"schemaVersion":2,"manifests":[{}]}}"#, entries.join(","));
        let want = platforms
            .iter()
            .zip(&digests)
            .find(|((os, arch), _)| os == "linux" && arch == "amd64")
            .map(|(_, d)| d.clone());
        prop_assert_eq!(platform_child(list.as_bytes()).map(|d| d.to_string()), want);
    }

    #[test]
    fn config_load_never_panics(
        file in proptest::option::of(text("([a-z_]{1,24} ?= ?(\"[a-z0-9:./ ]{0,20}\"|[0-9.]{1,8}|\\[\\]|true)\n){0,4}")),
        env in prop::collection::vec(
            (
                "(TAG_TTL|LISTEN|UPSTREAM|LOG_FORMAT|CACHE_LOW_WATERMARK|IMMUTABLE_TAGS|[A-Z_]{0,10})",
                text("[a-z0-9:./\\[\\]\"()\\\\\u{e9} -]{0,20}"),
            ),
            0..4,
        ),
        listen in proptest::option::of(text("[0-9.:]{0,20}")),
    ) {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("pullthrough.toml");
        if let Some(text) = &file {
            std::fs::write(&path, text).unwrap();
        }
        let env = env.into_iter().map(|(k, v)| (format!("PULLTHROUGH_{k}"), v));
        let listen = listen.and_then(|l| l.parse().ok());
        let overrides = Overrides { listen, ..Overrides::default() };
        if let Ok(c) = Config::load(file.as_ref().map(|_| path.as_path()), env, &overrides) {
            prop_assert!(matches!(c.upstream.scheme(), "http" | "https"));
            prop_assert!((0.0..1.0).contains(&c.ratelimit_reserve));
            prop_assert!(c.cache_low_watermark > 0.0 && c.cache_low_watermark < c.cache_high_watermark);
        }
    }
}

fn render_challenges(challenges: &[Challenge]) -> String {
    let rendered: Vec<String> = challenges
        .iter()
        .map(|c| {
            let params: Vec<String> = c
                .params
                .iter()
                .map(|(k, v)| format!("{k}=\"{}\"", v.replace('\\', "\\\\").replace('"', "\\\"")))
                .collect();
            if params.is_empty() {
                c.scheme.clone()
            } else {
                format!("{} {}", c.scheme, params.join(", "))
            }
        })
        .collect();
    rendered.join(", ")
}

/// A 429's pause must survive any `Retry-After` upstream sends, however large.
#[test]
fn pause_never_panics_for_any_retry_after() {
    proptest!(|(secs: u64, abuse: bool)| {
        let headers = header("retry-after", &secs.to_string());
        let wait = retry_after(&headers);
        prop_assert_eq!(wait, Some(Duration::from_secs(secs)));
        let limits = RateLimits::default();
        limits.pause(wait, abuse);
        let left = limits.paused_for(true);
        prop_assert!(left.is_some_and(|left| left <= Duration::from_secs(secs)) || secs == 0);
        // Never longer than max_upstream_pause (1 h by default).
        prop_assert!(left.is_none_or(|left| left <= Duration::from_secs(3600)));
    });
}

/// The same, for any `Retry-After` a real registry sends: up to a year.
#[test]
fn pause_is_bounded_by_retry_after() {
    proptest!(|(secs in 0..366 * 24 * 3600u64, abuse: bool)| {
        let headers = header("retry-after", &secs.to_string());
        let limits = RateLimits::default();
        limits.pause(retry_after(&headers), abuse);
        if let Some(left) = limits.paused_for(true) {
            prop_assert!(left <= Duration::from_secs(secs));
        }
    });
}

/// `PULLTHROUGH_*` strings are taken byte for byte, and a list may be a TOML array holding
/// escapes: neither may panic (figment's own value parser did, on non-ASCII before an escape).
#[test]
fn config_env_escapes_never_panic() {
    proptest!(|(key in "(UPSTREAM_USERNAME|IMMUTABLE_TAGS|NAMESPACES|TAG_TTL)", value in "\\[?\"[a-z\u{e9}\u{65e5}]{0,3}\\\\[nt\"\\\\]\"\\]?")| {
        let env = [(format!("PULLTHROUGH_{key}"), value.clone())];
        let loaded = Config::load(None, env, &Overrides::default());
        if key == "UPSTREAM_USERNAME" {
            prop_assert_eq!(loaded.unwrap().upstream_username, Some(value));
        }
    });
}

/// A referrers index from upstream (the API's pages, the tag-schema index) never panics, keeps
/// only descriptors with a valid digest, and what pullthrough renders from them is an image
/// index holding each digest once and only what the filter admits.
#[test]
fn referrers_indexes_and_filters_never_panic() {
    let descriptor = "\\{\"mediaType\":\"[a-z/+.]{0,12}\",\"digest\":\"sha256:[0-9a-f]{64}\",\"size\":[0-9]{1,3}(,\"artifactType\":\"(a/b|c/d|)\")?\\}";
    let bodies = prop_oneof![
        any::<Vec<u8>>(),
        prop::collection::vec(descriptor, 0..6).prop_map(|d| format!(
            "{{\"schemaVersion\":2,\"manifests\":[{}]}}",
            d.join(",")
        )
        .into_bytes()),
    ];
    proptest!(|(a in bodies.clone(), b in bodies, query in text("artifactType=(a%2Fb|c/d|%0A|)&ns=x"))| {
        let lists: Vec<Vec<serde_json::Value>> = [a, b]
            .iter()
            .map(|body| index_descriptors(body).unwrap_or_default())
            .collect();
        let merged = union_referrers(lists.iter().map(Vec::as_slice));
        let mut digests: Vec<_> = merged.iter().map(|r| r.digest.to_string()).collect();
        digests.sort();
        digests.dedup();
        prop_assert_eq!(digests.len(), merged.len());
        if let Ok(filter) = ArtifactFilter::parse(Some(&query)) {
            let index: serde_json::Value = serde_json::from_slice(&render_referrers(&merged, &filter)).unwrap();
            prop_assert_eq!(&index["mediaType"], "application/vnd.oci.image.index.v1+json");
            let shown = index["manifests"].as_array().unwrap();
            prop_assert!(shown.len() <= merged.len());
            if !filter.is_active() {
                prop_assert_eq!(shown.len(), merged.len());
            }
        }
    });
    proptest!(|(d in digest())| {
        let d: Digest = d.parse().unwrap();
        let tag = referrers_tag(&d).unwrap();
        prop_assert!(tag.as_str().starts_with(d.algorithm().as_str()));
        prop_assert!(tag.as_str().len() <= 128);
    });
}
