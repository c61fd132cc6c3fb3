//! The referrers lists' memory bound holds: what a list weighs for the cache
//! (`Referrers::weight`) is at least the heap it takes, counted by dhat's allocator, for lists
//! of every size a registry answers, and not far above it.

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    reason = "a test panics on what it did not expect"
)]

use pullthrough::manifests::{Referrers, ReferrersEntry, TagIndex};
use pullthrough::registry::RepoName;
use serde_json::{Value, json};

#[global_allocator]
static ALLOC: dhat::Alloc = dhat::Alloc;

/// A descriptor as registries list them: a cosign signature with its annotations, or a bare
/// SBOM entry.
fn descriptor(i: usize, signature: bool) -> Value {
    let digest = format!("sha256:{:064x}", i + 1);
    if signature {
        json!({
            "mediaType": "application/vnd.oci.image.manifest.v1+json",
            "digest": digest,
            "size": 1234,
            "artifactType": "application/vnd.dev.cosign.artifact.sig.v1+json",
            "annotations": {
                "dev.sigstore.cosign/signature": "MEUCIQDx".repeat(12),
                "org.opencontainers.image.created": "2026-12-07T00:00:00Z",
            },
        })
    } else {
        json!({
            "mediaType": "application/vnd.oci.image.manifest.v1+json",
            "digest": digest,
            "size": 1234,
            "artifactType": "application/spdx+json",
        })
    }
}

#[test]
fn a_referrers_list_weighs_at_least_the_heap_it_takes() {
    let _profiler = dhat::Profiler::builder().testing().build();
    let name = RepoName::parse("library/alpine", true).unwrap();
    // (descriptors, signatures or bare, also under the referrers tag schema, one digest
    // listed again and again: kept once in the union, but held as answered)
    for (n, signature, tagged, same) in [
        (0, false, false, false),
        (1, false, false, false),
        (1, true, true, false),
        (4, true, true, false),
        (20, true, false, false),
        (20, true, true, false),
        (200, true, true, false),
        (200, false, false, false),
        (500, true, false, true),
    ] {
        let before = dhat::HeapStats::get().curr_bytes;
        let api = (0..n)
            .map(|i| descriptor(if same { 0 } else { i }, signature))
            .collect();
        let tag = tagged.then(|| TagIndex {
            digest: format!("sha256:{:064x}", 7).parse().unwrap(),
            manifests: (0..n).map(|i| descriptor(i + 1000, signature)).collect(),
        });
        let referrers = std::sync::Arc::new(Referrers::new(ReferrersEntry {
            api: Some(api),
            tag,
            fetched_at: 1,
            validated_at: 1,
            truncated: false,
        }));
        let heap = dhat::HeapStats::get().curr_bytes - before;
        let weight = referrers.weight(&name) as usize;
        let case =
            format!("{n} descriptors (signatures {signature}, tagged {tagged}, one digest {same})");
        assert!(
            weight >= heap,
            "{case}: weighs {weight} bytes but takes {heap} on the heap"
        );
        assert!(
            weight <= 2 * heap + 512,
            "{case}: weighs {weight} bytes, far above the {heap} it takes"
        );
    }
}
