//! `pullthrough warm` and `pullthrough healthcheck` against a running pullthrough: what warm-up
//! fetched, what it cost upstream, and that a second run costs nothing.

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::too_many_lines,
    reason = "a test panics on what it did not expect, and may read as one long story"
)]

mod support;

use axum::body::Body;
use axum::http::Method;
use bytes::Bytes;
use pullthrough::config::Secret;
use pullthrough::registry::Digest;
use std::collections::HashMap;
use std::time::Duration;
use support::binary::Pullthrough;
use support::hostile::{Hostile, respond};
use support::{FakeHub, Image, TestProxy};

const OCI_INDEX: &str = "application/vnd.oci.image.index.v1+json";
const OCI_MANIFEST: &str = "application/vnd.oci.image.manifest.v1+json";

async fn pullthrough(args: &[&str]) -> (bool, String) {
    run(args, &[]).await
}

/// The binary with `args` and `env` (and none of the test's own `PULLTHROUGH_*` settings, such
/// as an admin token or a config file); it must end within 60 s.
async fn run(args: &[&str], env: &[(&str, &str)]) -> (bool, String) {
    run_within(Duration::from_secs(60), args, env).await
}

async fn run_within(limit: Duration, args: &[&str], env: &[(&str, &str)]) -> (bool, String) {
    let out = Pullthrough::new()
        .args(args)
        .listen("127.0.0.1:1")
        .envs(env.iter().copied())
        .output_within(limit)
        .await;
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status.success(), text)
}

/// A body that never ends: 64 KiB of `x` every 10 ms (slow enough that code reading it all
/// grows by only a few MB a second while the test waits for it).
fn endless() -> Body {
    let chunk = Bytes::from(vec![b'x'; 64 * 1024]);
    let chunks = futures_util::stream::unfold(chunk, |chunk| async move {
        // The pace of the body, not a wait.
        tokio::time::sleep(Duration::from_millis(10)).await;
        Some((Ok::<_, std::io::Error>(chunk.clone()), chunk))
    });
    Body::from_stream(chunks)
}

fn digest(bytes: &[u8]) -> String {
    Digest::sha256(bytes).to_string()
}

/// An OCI index of these manifests (`platform` `linux/<arch>` when given).
fn index(children: &[(&Bytes, Option<&str>)]) -> Bytes {
    let manifests: Vec<_> = children
        .iter()
        .map(|(child, arch)| {
            let mut entry = serde_json::json!({
                "mediaType": OCI_MANIFEST, "digest": digest(child), "size": child.len(),
            });
            if let Some(arch) = arch {
                entry["platform"] = serde_json::json!({ "os": "linux", "architecture": arch });
            }
            entry
        })
        .collect();
    let body =
        serde_json::json!({ "schemaVersion": 2, "mediaType": OCI_INDEX, "manifests": manifests });
    Bytes::from(body.to_string())
}

/// An OCI image manifest of a config and layers, given as (digest, size).
fn image(config: &Bytes, layers: &[(String, usize)]) -> Bytes {
    let layers: Vec<_> = layers
        .iter()
        .map(|(d, size)| serde_json::json!({ "digest": d, "size": size }))
        .collect();
    let body = serde_json::json!({
        "schemaVersion": 2, "mediaType": OCI_MANIFEST,
        "config": { "digest": digest(config), "size": config.len() },
        "layers": layers,
    });
    Bytes::from(body.to_string())
}

/// Serves `contents` (path to body) for every GET under `/v2/`; anything else is a 404.
fn serve(up: &Hostile, contents: HashMap<String, Bytes>) {
    up.on(Method::GET, "/v2/", move |request, _| {
        match contents.get(&request.path) {
            Some(body) => respond(200, &[("content-type", OCI_MANIFEST)], body.clone()),
            None => respond(404, &[], "not here"),
        }
    });
}

/// The `Authorization` of every stats request `up` received, in order.
fn stats_authorizations(up: &Hostile) -> Vec<String> {
    up.requests()
        .iter()
        .filter(|r| r.path == "/_pullthrough/stats")
        .map(|r| r.header("authorization").to_owned())
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn warm_fetches_every_platform_once_and_reports_its_cost() {
    let hub = FakeHub::start().await;
    let app = Image::index(
        OCI_INDEX,
        vec![
            ("amd64", Image::single("warm-amd64", OCI_MANIFEST, 40_000)),
            ("arm64", Image::single("warm-arm64", OCI_MANIFEST, 50_000)),
        ],
    );
    hub.push("library/app", "1", &app);
    let tool = Image::index(
        OCI_INDEX,
        vec![
            ("amd64", Image::single("tool-amd64", OCI_MANIFEST, 1000)),
            ("arm64", Image::single("tool-arm64", OCI_MANIFEST, 2000)),
        ],
    );
    hub.push("team/tool", "v2", &tool);
    let proxy = TestProxy::start(&hub).await;
    let list = tempfile::NamedTempFile::new().unwrap();
    std::fs::write(
        list.path(),
        "# images for CI\nteam/tool:v2   # arm runners\n",
    )
    .unwrap();

    // app: all platforms; team/tool from the file, arm64 only.
    let (ok, out) = pullthrough(&["warm", "--url", &proxy.url, "app:1"]).await;
    assert!(ok, "{out}");
    assert!(
        out.contains("manifests 3 fetched upstream, 0 cached"),
        "{out}"
    );
    assert!(out.contains("blobs 4 fetched upstream"), "{out}");
    assert!(out.contains("upstream manifest GETs: 3"), "{out}");
    assert_eq!(hub.count("manifest_get"), 3);
    assert_eq!(hub.count("blob_get"), 4);

    let file = list.path().to_str().unwrap();
    let (ok, out) = pullthrough(&[
        "warm",
        "--url",
        &proxy.url,
        "--file",
        file,
        "--platform",
        "linux/arm64",
    ])
    .await;
    assert!(ok, "{out}");
    assert!(out.contains("manifests 2 fetched upstream"), "{out}");
    assert!(out.contains("blobs 2 fetched upstream"), "{out}");
    assert_eq!(
        hub.count("blob_get"),
        6,
        "only the arm64 blobs of team/tool"
    );

    // Warm again: everything is cached, nothing is asked upstream.
    let (ok, out) = pullthrough(&["warm", "--url", &proxy.url, "app:1"]).await;
    assert!(ok, "{out}");
    assert!(
        out.contains("manifests 0 fetched upstream, 3 cached"),
        "{out}"
    );
    assert!(out.contains("upstream manifest GETs: 0"), "{out}");
    assert_eq!(hub.count("manifest_get"), 5);
    // All platforms of team/tool: only the amd64 manifest and blobs are new.
    let (ok, out) = pullthrough(&["warm", "--url", &proxy.url, "team/tool:v2"]).await;
    assert!(ok, "{out}");
    assert!(out.contains("upstream manifest GETs: 1"), "{out}");
    assert_eq!(hub.count("blob_get"), 6 + 2);

    // An image that does not exist fails the run, naming it.
    let (ok, out) = pullthrough(&["warm", "--url", &proxy.url, "nope:1"]).await;
    assert!(!ok);
    assert!(
        out.contains("nope:1 FAILED") && out.contains("404"),
        "{out}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn healthcheck_exits_0_when_ready_and_1_otherwise() {
    let hub = FakeHub::start().await;
    let proxy = TestProxy::start(&hub).await;
    let (ok, out) = pullthrough(&["healthcheck", "--url", &proxy.url]).await;
    assert!(ok, "{out}");
    let tmp = proxy.config.data_dir.join("tmp");
    std::fs::remove_dir_all(&tmp).unwrap();
    std::fs::write(&tmp, "not a directory").unwrap();
    let (ok, out) = pullthrough(&["healthcheck", "--url", &proxy.url]).await;
    assert!(!ok && out.contains("503"), "{out}");
    let (ok, out) = pullthrough(&["healthcheck"]).await;
    assert!(!ok && out.contains("not reachable"), "{out}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn warm_reads_a_bounded_part_of_endless_bodies() {
    let up = Hostile::start().await;
    let manifest =
        |status| move |_, _| respond(status, &[("content-type", OCI_MANIFEST)], endless());
    up.on(Method::GET, "/v2/endless/manifests/", manifest(200));
    up.on(Method::GET, "/v2/error/manifests/", manifest(500));
    // An image of one 2-byte blob whose body never ends.
    let config = Bytes::from_static(b"{}");
    let one_blob = image(&config, &[]);
    up.on(Method::GET, "/v2/blob/manifests/", move |_, _| {
        respond(200, &[("content-type", OCI_MANIFEST)], one_blob.clone())
    });
    up.on(Method::GET, "/v2/blob/blobs/", |_, _| {
        respond(200, &[], endless())
    });
    up.on(Method::GET, "/_pullthrough/stats", |_, _| {
        respond(200, &[], endless())
    });

    let args = ["warm", "--url", &up.url, "endless:1", "error:1", "blob:1"];
    let (ok, out) = run_within(Duration::from_secs(20), &args, &[]).await;
    assert!(!ok, "{out}");
    let max = pullthrough::upstream::MAX_MANIFEST_BYTES;
    assert!(
        out.contains(&format!(
            "endless:1 FAILED: manifest endless:1: larger than {max} bytes"
        )),
        "{out}"
    );
    assert!(
        out.contains("error:1 FAILED: manifest error:1: HTTP 500: xxx"),
        "{out}"
    );
    assert!(
        out.contains(&format!(
            "blob:1 FAILED: blob {}: longer than the 2 bytes",
            digest(&config)
        )),
        "{out}"
    );
    assert!(
        out.contains("upstream manifest GETs: unknown (the stats endpoint could not be read)"),
        "{out}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn warm_verifies_manifests_and_ends_loops_and_deep_nesting() {
    let up = Hostile::start().await;
    let config = Bytes::from_static(b"{\"architecture\":\"amd64\"}");
    let layer = Bytes::from_static(b"layer");
    let leaf = image(&config, &[(digest(&layer), layer.len())]);
    // Six indexes, each naming the next; the last names the image.
    let mut chain = vec![leaf.clone()];
    for _ in 0..6 {
        let inner = chain.last().unwrap().clone();
        chain.push(index(&[(&inner, None)]));
    }
    // Two platforms of the same manifest, and a second one sharing its blobs.
    let other = image(&config, &[(digest(&layer), layer.len()), (digest(b"x"), 1)]);
    let shared = index(&[
        (&leaf, Some("amd64")),
        (&leaf, Some("arm64")),
        (&other, Some("s390x")),
    ]);
    // An index naming a child that the server answers with the index itself, forever.
    let looping = index(&[(&Bytes::from_static(b"something else"), None)]);
    let mut contents = HashMap::new();
    let mut put = |repo: &str, reference: String, body: &Bytes| {
        contents.insert(format!("/v2/{repo}/manifests/{reference}"), body.clone());
    };
    for manifest in &chain {
        put("deep", digest(manifest), manifest);
        put("shared", digest(manifest), manifest);
    }
    put("deep", "six".into(), &chain[6]);
    put("shared", "1".into(), &shared);
    put("shared", digest(&other), &other);
    put("loop", "1".into(), &looping);
    put("loop", digest(b"something else"), &looping);
    for repo in ["deep", "shared"] {
        for blob in [&config, &layer, &Bytes::from_static(b"x")] {
            contents.insert(format!("/v2/{repo}/blobs/{}", digest(blob)), blob.clone());
        }
    }
    serve(&up, contents);
    let manifest_gets = |repo: &str| up.count(Method::GET, &format!("/v2/{repo}/manifests/"));

    // What is named twice is fetched once.
    let (ok, out) = run(&["warm", "--url", &up.url, "shared:1"], &[]).await;
    assert!(ok, "{out}");
    assert!(
        out.contains("manifests 3 fetched upstream") && out.contains("blobs 3 fetched"),
        "{out}"
    );
    assert_eq!(manifest_gets("shared"), 3);
    assert_eq!(up.count(Method::GET, "/v2/shared/blobs/"), 3);

    // Four levels of indexes are warmed; five are refused before the fifth's children.
    let four = format!("deep@{}", digest(&chain[4]));
    let (ok, out) = run(&["warm", "--url", &up.url, &four], &[]).await;
    assert!(ok, "{out}");
    assert!(
        out.contains("manifests 5 fetched upstream") && out.contains("blobs 2 fetched"),
        "{out}"
    );
    let (ok, out) = run(&["warm", "--url", &up.url, "deep:six"], &[]).await;
    assert!(!ok, "{out}");
    assert!(out.contains("indexes nested more than 4 deep"), "{out}");
    assert_eq!(manifest_gets("deep"), 5 + 5);

    // The child comes back with another digest: an error, not a loop.
    let (ok, out) = run(&["warm", "--url", &up.url, "loop:1"], &[]).await;
    assert!(!ok, "{out}");
    let child = digest(b"something else");
    assert!(
        out.contains(&format!(
            "manifest loop:{child}: content does not match its digest"
        )),
        "{out}"
    );
    assert_eq!(manifest_gets("loop"), 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn warm_fails_an_image_whose_blob_does_not_match_its_digest() {
    let up = Hostile::start().await;
    let config = Bytes::from_static(b"{}");
    let layer = Bytes::from_static(b"right");
    let manifest = image(&config, &[(digest(&layer), layer.len())]);
    let mut contents = HashMap::new();
    contents.insert("/v2/app/manifests/1".to_owned(), manifest);
    contents.insert(format!("/v2/app/blobs/{}", digest(&config)), config);
    // The same size, other bytes.
    contents.insert(
        format!("/v2/app/blobs/{}", digest(&layer)),
        Bytes::from_static(b"wrong"),
    );
    serve(&up, contents);
    let (ok, out) = run(&["warm", "--url", &up.url, "app:1"], &[]).await;
    assert!(!ok, "{out}");
    assert!(
        out.contains(&format!(
            "app:1 FAILED: blob {}: content does not match its digest",
            digest(&layer)
        )),
        "{out}"
    );
    assert!(out.contains("warmed 0 image(s), 1 failed"), "{out}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn warm_refuses_a_manifest_with_too_many_layers() {
    let up = Hostile::start().await;
    // 40,000 distinct layers: as many as fit in a manifest pullthrough accepts.
    let layers: Vec<_> = (0..40_000u32)
        .map(|i| (digest(&i.to_be_bytes()), 1))
        .collect();
    let manifest = image(&Bytes::from_static(b"{}"), &layers);
    assert!(manifest.len() < pullthrough::upstream::MAX_MANIFEST_BYTES);
    serve(
        &up,
        HashMap::from([("/v2/many/manifests/1".to_owned(), manifest)]),
    );
    let (ok, out) = run_within(
        Duration::from_secs(30),
        &["warm", "--url", &up.url, "many:1"],
        &[],
    )
    .await;
    assert!(!ok, "{out}");
    assert!(
        out.contains("manifest 1 lists 40001 descriptors, more than the 10000 allowed"),
        "{out}"
    );
    assert_eq!(
        up.count(Method::GET, "/v2/many/blobs/"),
        0,
        "no blob is asked for"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn warm_prints_no_control_characters_from_the_server() {
    let up = Hostile::start().await;
    let mut body =
        b"\x1b]0;pwned\x07\x1b[2J\x1b[31mred \xc2\x9b2J \x9b \x7f\r\nmore\xe2\x80\xae".to_vec();
    body.extend(std::iter::repeat_n(b'A', 10_000));
    let body = Bytes::from(body);
    up.on(Method::GET, "/v2/term/", move |_, _| {
        respond(500, &[], body.clone())
    });
    let (ok, out) = run(&["warm", "--url", &up.url, "term:1"], &[]).await;
    assert!(!ok, "{out}");
    let failed = out
        .lines()
        .find(|l| l.contains("term:1 FAILED"))
        .unwrap_or_else(|| panic!("{out}"));
    assert!(
        failed.contains("HTTP 500:") && failed.contains("pwned") && failed.contains("more"),
        "{out}"
    );
    assert!(
        out.chars().all(|c| c == '\n' || !c.is_control()) && !out.contains('\u{202e}'),
        "{out:?}"
    );
    // Cut, not 10,000 characters.
    assert!(
        failed.ends_with('…') && failed.chars().count() < 400,
        "{failed}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn warm_sends_the_configured_admin_token_only_to_the_configured_listener() {
    let up = Hostile::start().await;
    let token = "configured-admin-token";
    let configured = [("PULLTHROUGH_ADMIN_TOKEN", token)];

    // Another URL: not sent, and warm says so.
    let (_, out) = run(&["warm", "--url", &up.url, "app:1"], &configured).await;
    assert!(
        up.requests()
            .iter()
            .all(|r| r.header("authorization").is_empty()),
        "no request carries a token"
    );
    assert!(
        out.contains(&format!("admin_token is not sent to {}", up.url)),
        "{out}"
    );
    // Given on the command line: sent where it is asked to go.
    let args = [
        "warm",
        "--url",
        &up.url,
        "--admin-token",
        "given-token",
        "app:1",
    ];
    run(&args, &configured).await;
    // The configured listener, by default or named: sent, as before.
    let listen = format!("127.0.0.1:{}", up.port);
    let listener = [
        ("PULLTHROUGH_ADMIN_TOKEN", token),
        ("PULLTHROUGH_LISTEN", &listen),
    ];
    run(&["warm", "app:1"], &listener).await;
    let localhost = format!("http://localhost:{}/", up.port);
    run(&["warm", "--url", &localhost, "app:1"], &listener).await;

    let given = "Bearer given-token".to_owned();
    let mine = format!("Bearer {token}");
    assert_eq!(
        stats_authorizations(&up),
        ["", "", &given, &given, &mine, &mine, &mine, &mine]
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn warm_says_the_upstream_cost_is_unknown_without_the_admin_token() {
    let hub = FakeHub::start().await;
    hub.push(
        "library/app",
        "1",
        &Image::single("cost", OCI_MANIFEST, 1000),
    );
    let token = "the-servers-admin-token";
    let proxy = TestProxy::start_with(&hub, |c| c.admin_token = Some(Secret(token.into()))).await;

    let (ok, out) = run(&["warm", "--url", &proxy.url, "app:1"], &[]).await;
    assert!(ok, "{out}");
    assert!(
        out.contains(
            "; upstream manifest GETs: unknown (the stats endpoint needs the admin token)"
        ),
        "{out}"
    );
    assert!(!out.contains("Docker Hub pulls"), "{out}");
    let wrong = [
        "warm",
        "--url",
        &proxy.url,
        "--admin-token",
        "wrong-token",
        "app:1",
    ];
    let (_, out) = run(&wrong, &[]).await;
    assert!(
        out.contains("unknown (the stats endpoint refused the admin token)"),
        "{out}"
    );
    // Its own listener with the configured token: counted (all cached by now).
    let listen = proxy.url.trim_start_matches("http://");
    let env = [
        ("PULLTHROUGH_ADMIN_TOKEN", token),
        ("PULLTHROUGH_LISTEN", listen),
    ];
    let (ok, out) = run(&["warm", "app:1"], &env).await;
    assert!(ok, "{out}");
    assert!(out.contains("upstream manifest GETs: 0"), "{out}");
}
