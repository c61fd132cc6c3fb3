//! `Accept` lines against a stored `Content-Type`: never panics, and negotiation keeps
//! distribution's rules (no header serves anything; only a Docker list asked for by tag can
//! become its platform child; only OCI types and Docker lists can be refused).
//!
//! Input: one flag byte (bit 0: asked for by tag), then lines: the stored `Content-Type`, then
//! each `Accept` header line (none at all when there is no second line).
#![no_main]

use libfuzzer_sys::fuzz_target;
use pullthrough::registry::{Accept, MediaType, Negotiation};

fuzz_target!(|data: &[u8]| {
    let Some((&flags, rest)) = data.split_first() else {
        return;
    };
    let by_tag = flags & 1 == 1;
    let text = String::from_utf8_lossy(rest);
    let mut lines = text.split('\n');
    let content_type = lines.next().unwrap_or_default();
    let lines: Vec<&str> = lines.collect();

    let stored = MediaType::from_content_type(content_type);
    assert_eq!(MediaType::from_content_type(stored.as_str()), stored);

    let accept = Accept::parse(lines.iter().copied());
    let outcome = accept.negotiate(&stored, by_tag);
    let wildcard = lines.iter().any(|l| {
        l.split(',')
            .any(|t| t.split(';').next().unwrap_or_default().trim() == "*/*")
    });
    if lines.is_empty() || wildcard {
        assert_eq!(outcome, Negotiation::Serve, "{lines:?}");
    }
    let refusable = [
        MediaType::OCI_MANIFEST,
        MediaType::OCI_INDEX,
        MediaType::DOCKER_LIST,
    ];
    if !refusable.contains(&stored.as_str()) {
        assert_eq!(outcome, Negotiation::Serve);
    }
    if outcome == Negotiation::PlatformChild {
        assert!(by_tag && stored.as_str() == MediaType::DOCKER_LIST);
    }
    // Media types compare case-insensitively: upper-casing the lines changes nothing.
    let upper: Vec<String> = lines.iter().map(|l| l.to_ascii_uppercase()).collect();
    let upper = Accept::parse(upper.iter().map(String::as_str));
    assert_eq!(upper.negotiate(&stored, by_tag), outcome);
});
