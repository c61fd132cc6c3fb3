//! The referrers lists' memory bound holds: what a list weighs for the cache
//! (`Referrers::weight`) is at least the heap it takes, counted by dhat's allocator, for lists
//! parsed as they come from an upstream, ordinary and hostile, and not far above it.

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    reason = "a test panics on what it did not expect"
)]

use pullthrough::manifests::{Referrers, ReferrersEntry, TagIndex};
use pullthrough::registry::{RepoName, index_descriptors};
use serde_json::{Value, json};

#[global_allocator]
static ALLOC: dhat::Alloc = dhat::Alloc;

/// What a list's descriptors are like.
#[derive(Debug, Clone, Copy)]
enum Shape {
    /// A cosign signature with its annotations.
    Signature,
    /// A bare SBOM entry.
    Sbom,
    /// One digest listed again and again (the union keeps it once).
    SameDigest,
    /// Each with 2,000 annotations, keys in order (B-tree nodes half full).
    ManyAnnotations,
    /// Each with an array of 1,025 nulls (an array's room doubled past a power of two).
    LongArray,
}

fn descriptor(i: usize, shape: Shape) -> Value {
    let digest = format!("sha256:{:064x}", i + 1);
    let mut d = json!({
        "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "digest": digest,
        "size": 1234,
        "artifactType": "application/spdx+json",
    });
    match shape {
        Shape::Sbom => {}
        Shape::Signature | Shape::SameDigest => {
            d["artifactType"] = json!("application/vnd.dev.cosign.artifact.sig.v1+json");
            d["annotations"] = json!({
                "dev.sigstore.cosign/signature": "MEUCIQDx".repeat(12),
                "org.opencontainers.image.created": "2026-12-07T00:00:00Z",
            });
        }
        Shape::ManyAnnotations => {
            let many: serde_json::Map<String, Value> = (0..2000)
                .map(|k| (format!("org.example.{k:05}"), json!("v")))
                .collect();
            d["annotations"] = Value::Object(many);
        }
        Shape::LongArray => d["x-list"] = Value::Array(vec![Value::Null; 1025]),
    }
    d
}

/// An image index of `descriptors` and `junk` entries that are no descriptors, as upstream
/// sends it, read as pullthrough reads it.
fn parsed(descriptors: &[Value], junk: usize) -> Vec<Value> {
    let mut manifests = descriptors.to_vec();
    manifests.extend(std::iter::repeat_n(json!(0), junk));
    let body = serde_json::to_vec(&json!({"schemaVersion": 2, "manifests": manifests})).unwrap();
    index_descriptors(&body).unwrap()
}

#[test]
fn a_referrers_list_weighs_at_least_the_heap_it_takes() {
    let _profiler = dhat::Profiler::builder().testing().build();
    let name = RepoName::parse("library/alpine", true).unwrap();
    // (descriptors, shape, also under the referrers tag schema, entries that are no
    // descriptors in the tag's index)
    for (n, shape, tagged, junk) in [
        (0, Shape::Sbom, false, 0),
        (1, Shape::Sbom, false, 0),
        (1, Shape::Signature, true, 0),
        (4, Shape::Signature, true, 0),
        (20, Shape::Signature, false, 0),
        (20, Shape::Signature, true, 0),
        (200, Shape::Signature, true, 0),
        (200, Shape::Sbom, false, 0),
        (500, Shape::SameDigest, false, 0),
        (1, Shape::Signature, true, 500_000),
        (20, Shape::ManyAnnotations, false, 0),
        (20, Shape::LongArray, true, 0),
    ] {
        let same = matches!(shape, Shape::SameDigest);
        let made = |from: usize| -> Vec<Value> {
            (0..n)
                .map(|i| descriptor(if same { 0 } else { from + i }, shape))
                .collect()
        };
        // dhat counts the whole process: another thread's allocation inside the window (the
        // test harness's own) would be counted as the list's. The smallest of a few builds is
        // the list's own heap.
        let built = || {
            let before = dhat::HeapStats::get().curr_bytes;
            let api = parsed(&made(0), 0);
            let tag = tagged.then(|| TagIndex {
                digest: format!("sha256:{:064x}", 7).parse().unwrap(),
                manifests: parsed(&made(1000), junk),
            });
            let referrers = std::sync::Arc::new(Referrers::new(ReferrersEntry {
                api: Some(api),
                tag,
                fetched_at: 1,
                validated_at: 1,
                truncated: false,
            }));
            let heap = dhat::HeapStats::get().curr_bytes.saturating_sub(before);
            (referrers, heap)
        };
        let (referrers, mut heap) = built();
        for _ in 1..3 {
            heap = heap.min(built().1);
        }
        let weight = referrers.weight(&name) as usize;
        let case = format!("{n} descriptors ({shape:?}, tagged {tagged}, junk {junk})");
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
