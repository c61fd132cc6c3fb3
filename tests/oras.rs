//! OCI artifacts with a real artifact client, PyPI's `oras` (oras-py, in its own venv that
//! `.ci/run` makes at /opt/pullthrough-oras, or `$ORAS_VENV`), and Debian's registry 2.8
//! (`docker-registry`) as the upstream: a registry without the referrers API, so the referrers
//! tag schema is all there is. oras pushes a Helm chart and an SBOM that refers to an image
//! there, then pulls them through pullthrough byte for byte, and pullthrough's referrers API
//! finds the SBOM. Ignored by a plain `cargo test` (it needs those programs).

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::too_many_lines,
    reason = "a test panics on what it did not expect, and may read as one long story"
)]

mod support;

use serde_json::Value;
use std::path::PathBuf;
use std::process::Command;
use support::{TestProxy, reference_registry};

/// oras's venv (`.ci/run` makes it), or `$ORAS_VENV`.
fn venv() -> PathBuf {
    let venv = std::env::var_os("ORAS_VENV")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("/opt/pullthrough-oras"));
    assert!(
        venv.join("bin/python").exists(),
        "no oras venv at {} (bash .ci/run makes it)",
        venv.display()
    );
    venv
}

/// Runs tests/support/oras_client.py with `args`; its JSON answer.
fn oras(args: &[&str]) -> Value {
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/support/oras_client.py");
    let out = Command::new(venv().join("bin/python"))
        .arg(script)
        .args(args)
        .env_remove("HTTP_PROXY")
        .env_remove("HTTPS_PROXY")
        .env_remove("http_proxy")
        .env_remove("https_proxy")
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "oras_client.py {args:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).unwrap_or_else(|e| {
        panic!(
            "oras_client.py {args:?} printed no JSON ({e}): {}",
            String::from_utf8_lossy(&out.stdout)
        )
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs docker-registry and oras in /opt/pullthrough-oras (run by .ci/run)"]
async fn oras_pushes_to_a_registry_without_the_api_and_pulls_and_finds_referrers_through_pullthrough()
 {
    let dir = tempfile::tempdir().unwrap();
    let (_registry, url) = reference_registry(dir.path()).await;
    let host = url.trim_start_matches("http://");
    let work = dir.path().join("push");
    std::fs::create_dir_all(&work).unwrap();
    let pushed = oras(&["push", host, work.to_str().unwrap()]);
    assert_eq!(
        pushed["api_status"], 404,
        "registry 2.8 has no referrers API"
    );
    assert_eq!(pushed["tag_before"], 404, "no referrers index yet");
    assert_eq!(pushed["tag_put"], 201, "the tag-schema index was pushed");
    let (subject, sbom, chart) = (
        pushed["subject"].as_str().unwrap().to_owned(),
        pushed["sbom"].as_str().unwrap().to_owned(),
        pushed["chart"].as_str().unwrap().to_owned(),
    );

    let proxy = TestProxy::start_with_upstream(&url).await;
    let proxy_host = proxy.url.trim_start_matches("http://").to_owned();
    let pull_dir = dir.path().join("pull");
    std::fs::create_dir_all(&pull_dir).unwrap();
    let pulled = oras(&["pull", &proxy_host, pull_dir.to_str().unwrap(), &sbom]);
    let chart_layer: Vec<u8> = (0..=255u8).cycle().take(256 * 40).collect();
    assert_eq!(
        pulled["chart_files"]["demo-1.0.0.tgz"],
        support::hub::sha256(&chart_layer).trim_start_matches("sha256:"),
        "the chart arrives byte for byte"
    );
    assert_eq!(pulled["sbom_artifact_type"], "application/spdx+json");
    assert_eq!(pulled["sbom_subject"], subject.as_str());
    assert_eq!(pulled["sbom_files"], serde_json::json!(["sbom.spdx.json"]));

    // Every manifest through pullthrough is the registry's, byte for byte.
    let client = support::client();
    for (repo, reference) in [
        ("demo/chart", "1.0.0"),
        ("demo/app", sbom.as_str()),
        ("demo/chart", chart.as_str()),
    ] {
        let get = |base: String| {
            client
                .get(format!("{base}/v2/{repo}/manifests/{reference}"))
                .header("accept", "application/vnd.oci.image.manifest.v1+json")
                .send()
        };
        let direct = get(url.clone()).await.unwrap();
        let through = get(proxy.url.clone()).await.unwrap();
        assert_eq!(through.status(), 200);
        assert_eq!(
            through.headers()["docker-content-digest"],
            direct.headers()["docker-content-digest"]
        );
        assert_eq!(
            through.headers()["content-type"],
            "application/vnd.oci.image.manifest.v1+json"
        );
        assert_eq!(
            through.bytes().await.unwrap(),
            direct.bytes().await.unwrap()
        );
    }

    // The referrers API through pullthrough finds the SBOM under the tag schema.
    let r = proxy
        .get(&format!("/v2/demo/app/referrers/{subject}"))
        .await;
    assert_eq!(r.status(), 200);
    assert_eq!(
        r.headers()["content-type"],
        "application/vnd.oci.image.index.v1+json"
    );
    let index: Value = r.json().await.unwrap();
    let listed = index["manifests"].as_array().unwrap();
    assert_eq!(listed.len(), 1);
    assert_eq!(listed[0]["digest"], sbom.as_str());
    assert_eq!(listed[0]["artifactType"], "application/spdx+json");
    assert_eq!(listed[0]["size"], pushed["sbom_size"]);
    let r = proxy
        .get(&format!(
            "/v2/demo/app/referrers/{subject}?artifactType=application%2Fvnd.dev.cosign.artifact.sig.v1%2Bjson"
        ))
        .await;
    assert_eq!(r.headers()["oci-filters-applied"], "artifactType");
    let index: Value = r.json().await.unwrap();
    assert_eq!(index["manifests"], serde_json::json!([]));
    // A subject nothing refers to: the empty index, not registry 2.8's 404.
    let r = proxy.get(&format!("/v2/demo/app/referrers/{chart}")).await;
    assert_eq!(r.status(), 200);
    let index: Value = r.json().await.unwrap();
    assert_eq!(index["manifests"], serde_json::json!([]));
}
