//! Operating pullthrough: the cache API (listing, filters, paging, one entry, explain, stats,
//! purges and their access rules), `/metrics` read with a Prometheus text parser, `/readyz`,
//! request ids, and the status page's values.

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::too_many_lines,
    reason = "a test panics on what it did not expect, and may read as one long story"
)]

mod support;

use serde_json::Value;
use std::time::Duration;
use support::{FULL_ACCEPT, FakeHub, Image, TestProxy};

use support::DOCKER_MANIFEST;
const OCI_INDEX: &str = "application/vnd.oci.image.index.v1+json";
const OCI_MANIFEST: &str = "application/vnd.oci.image.manifest.v1+json";

fn multi_arch(seed: &str) -> Image {
    Image::index(
        OCI_INDEX,
        vec![
            (
                "amd64",
                Image::single(&format!("{seed}-amd64"), OCI_MANIFEST, 2000),
            ),
            (
                "arm64",
                Image::single(&format!("{seed}-arm64"), OCI_MANIFEST, 3000),
            ),
        ],
    )
}

async fn json(proxy: &TestProxy, path: &str) -> Value {
    let r = proxy.get(path).await;
    assert_eq!(r.status(), 200, "GET {path}");
    assert_eq!(r.headers()["content-type"], "application/json");
    r.json().await.unwrap()
}

/// GETs a manifest as a modern client would; the body must hash to its Docker-Content-Digest.
async fn pull_manifest(proxy: &TestProxy, path: &str) -> bytes::Bytes {
    let r = proxy
        .request(reqwest::Method::GET, path, &[("accept", FULL_ACCEPT)])
        .await;
    assert_eq!(r.status(), 200, "{path}");
    let digest = r.headers()["docker-content-digest"]
        .to_str()
        .unwrap()
        .to_owned();
    let body = r.bytes().await.unwrap();
    assert_eq!(support::hub::sha256(&body), digest, "{path}");
    body
}

/// Pulls an image as a client would: index, the amd64 manifest, its blobs.
async fn pull_image(proxy: &TestProxy, repo: &str, tag: &str, image: &Image) {
    pull_manifest(proxy, &format!("/v2/{repo}/manifests/{tag}")).await;
    let child = &image.children[0];
    pull_manifest(proxy, &format!("/v2/{repo}/manifests/{}", child.digest)).await;
    for blob in &child.blobs {
        let digest = support::hub::sha256(blob);
        assert_eq!(
            proxy.get_ok(&format!("/v2/{repo}/blobs/{digest}")).await,
            *blob
        );
    }
}

#[tokio::test]
async fn the_cache_api_lists_explains_and_purges() {
    let hub = FakeHub::start().await;
    let app = multi_arch("app");
    hub.push("library/app", "1", &app);
    hub.push(
        "library/app",
        "2",
        &Image::single("app2", DOCKER_MANIFEST, 100),
    );
    hub.push(
        "team/tool",
        "latest",
        &Image::single("tool", DOCKER_MANIFEST, 100),
    );
    let proxy = TestProxy::start_with(&hub, |c| c.tag_ttl = Duration::from_secs(600)).await;

    // Before any pull: nothing listed, and a pull would cost a manifest GET.
    let listing = json(&proxy, "/_pullthrough/cache").await;
    assert_eq!(listing["total"], 0);
    let explain = json(
        &proxy,
        "/_pullthrough/cache/library/app/manifests/1?explain=pull",
    )
    .await;
    assert_eq!(explain["manifest_gets"], 1);
    assert_eq!(explain["more_unknown"], true);
    assert_eq!(hub.total(), 0, "the cache API never asks upstream");

    pull_image(&proxy, "library/app", "1", &app).await;
    pull_manifest(&proxy, "/v2/library/app/manifests/2").await;
    pull_manifest(&proxy, "/v2/library/app/manifests/2").await;
    pull_manifest(&proxy, "/v2/team/tool/manifests/latest").await;
    let upstream_before = hub.total();

    // Listing, filters, paging.
    let listing = json(&proxy, "/_pullthrough/cache").await;
    assert_eq!(listing["total"], 3);
    let first = &listing["entries"][0];
    assert_eq!(
        (first["repository"].as_str(), first["tag"].as_str()),
        (Some("library/app"), Some("1"))
    );
    assert_eq!(first["digest"], app.digest.as_str());
    assert_eq!(first["media_type"], OCI_INDEX);
    assert_eq!(first["size"], app.bytes.len());
    assert_eq!(first["freshness"], "fresh");
    assert_eq!(first["manifest_cached"], true);
    assert_eq!(first["hits"], 1);
    assert_eq!(listing["entries"][1]["hits"], 2);
    assert!(first["fetched_at"].as_str().unwrap().ends_with('Z'));
    let team = json(&proxy, "/_pullthrough/cache?prefix=team/").await;
    assert_eq!(team["total"], 1);
    assert_eq!(team["entries"][0]["repository"], "team/tool");
    assert_eq!(
        json(&proxy, "/_pullthrough/cache?stale=true").await["total"],
        0
    );
    let page = json(&proxy, "/_pullthrough/cache?limit=2").await;
    assert_eq!(page["entries"].as_array().unwrap().len(), 2);
    let next = page["next"].as_str().unwrap().to_owned();
    let rest = json(&proxy, &format!("/_pullthrough/cache?limit=2&after={next}")).await;
    assert_eq!(rest["entries"].as_array().unwrap().len(), 1);
    assert_eq!(rest["next"], Value::Null);
    let r = proxy.get("/_pullthrough/cache?limit=many").await;
    assert_eq!(r.status(), 400);

    // One entry: the index's platforms, and which of their blobs are cached.
    let entry = json(&proxy, "/_pullthrough/cache/library/app/manifests/1").await;
    let platforms = entry["platforms"].as_array().unwrap();
    assert_eq!(platforms.len(), 2);
    assert_eq!(platforms[0]["platform"], "linux/amd64");
    assert_eq!(platforms[0]["manifest_cached"], true);
    assert!(
        platforms[0]["blobs"]
            .as_array()
            .unwrap()
            .iter()
            .all(|b| b["cached"] == true)
    );
    assert_eq!(platforms[1]["manifest_cached"], false);
    assert_eq!(platforms[1]["blobs"], Value::Null);
    // One-component names mean library/ here too.
    assert_eq!(
        json(&proxy, "/_pullthrough/cache/app/manifests/1").await["digest"],
        app.digest.as_str()
    );

    // Explain: amd64 costs nothing now; arm64 costs its manifest (its blobs are unknown yet).
    let explain = json(
        &proxy,
        "/_pullthrough/cache/library/app/manifests/1?explain=pull",
    )
    .await;
    assert_eq!(explain["upstream_requests"], serde_json::json!([]));
    let arm = json(
        &proxy,
        "/_pullthrough/cache/library/app/manifests/1?explain=pull&platform=linux/arm64",
    )
    .await;
    assert_eq!(arm["manifest_gets"], 1);
    assert_eq!(
        arm["upstream_requests"][0]["reference"],
        app.children[1].digest.as_str()
    );
    assert_eq!(
        hub.total(),
        upstream_before,
        "the cache API never asks upstream"
    );

    // Purges: a dry run lists, a purge removes, and the next pull fetches again.
    let blob = support::hub::sha256(&app.children[0].blobs[1]);
    let dry = proxy
        .request(
            reqwest::Method::DELETE,
            &format!("/_pullthrough/cache/blobs/{blob}?dry_run=true"),
            &[],
        )
        .await;
    assert_eq!(dry.status(), 200);
    let dry: Value = dry.json().await.unwrap();
    assert_eq!(
        (dry["dry_run"].clone(), dry["blobs"][0].clone()),
        (Value::Bool(true), Value::from(blob.as_str()))
    );
    let entry = json(
        &proxy,
        "/_pullthrough/cache/library/app/manifests/1?explain=pull",
    )
    .await;
    assert_eq!(entry["blob_gets"], 0, "a dry run removes nothing");
    // A misspelled key is refused, never taken as a real purge.
    for typo in ["dryrun=true", "dry-run=true", "dry_run=true&force=1"] {
        let r = proxy
            .request(
                reqwest::Method::DELETE,
                &format!("/_pullthrough/cache/blobs/{blob}?{typo}"),
                &[],
            )
            .await;
        assert_eq!(r.status(), 400, "{typo}");
        assert!(r.text().await.unwrap().contains("dry_run"));
    }
    for (path, key) in [
        ("/_pullthrough/cache?prefx=library", "prefix"),
        (
            "/_pullthrough/cache/library/app/manifests/1?explian=pull",
            "explain",
        ),
    ] {
        let r = proxy.get(path).await;
        assert_eq!(r.status(), 400, "{path}");
        assert!(r.text().await.unwrap().contains(key), "{path}");
    }
    let entry = json(
        &proxy,
        "/_pullthrough/cache/library/app/manifests/1?explain=pull",
    )
    .await;
    assert_eq!(entry["blob_gets"], 0, "nothing was purged");
    let r = proxy
        .request(
            reqwest::Method::DELETE,
            &format!("/_pullthrough/cache/blobs/{blob}"),
            &[],
        )
        .await;
    assert_eq!(r.status(), 200);
    let entry = json(
        &proxy,
        "/_pullthrough/cache/library/app/manifests/1?explain=pull",
    )
    .await;
    assert_eq!(entry["blob_gets"], 1);
    assert_eq!(entry["upstream_requests"][0]["reference"], blob.as_str());

    let r = proxy
        .request(
            reqwest::Method::DELETE,
            "/_pullthrough/cache/library/app/manifests/2",
            &[],
        )
        .await;
    let purged: Value = r.json().await.unwrap();
    assert_eq!(purged["tags"], serde_json::json!(["library/app:2"]));
    assert_eq!(json(&proxy, "/_pullthrough/cache").await["total"], 2);
    let gets = hub.count("manifest_get");
    pull_manifest(&proxy, "/v2/library/app/manifests/2").await;
    assert_eq!(
        hub.count("manifest_get"),
        gets + 1,
        "a purged tag is fetched again"
    );

    let r = proxy
        .request(
            reqwest::Method::DELETE,
            "/_pullthrough/cache/team/tool",
            &[],
        )
        .await;
    let purged: Value = r.json().await.unwrap();
    assert_eq!(purged["tags"], serde_json::json!(["team/tool:latest"]));
    assert_eq!(purged["manifests"].as_array().unwrap().len(), 1);
    assert_eq!(
        json(&proxy, "/_pullthrough/cache?prefix=team").await["total"],
        0
    );
}

#[tokio::test]
async fn stats_and_metrics_count_what_happens() {
    let hub = FakeHub::start().await;
    let image = Image::single("counted", DOCKER_MANIFEST, 5000);
    hub.push("library/counted", "1", &image);
    let proxy = TestProxy::start(&hub).await;
    let path = "/v2/library/counted/manifests/1";
    for _ in 0..3 {
        pull_manifest(&proxy, path).await;
    }
    let blob = support::hub::sha256(&image.blobs[1]);
    for _ in 0..2 {
        proxy
            .get_ok(&format!("/v2/library/counted/blobs/{blob}"))
            .await;
    }

    let stats = json(&proxy, "/_pullthrough/stats").await;
    let c = &stats["counters"];
    assert_eq!(c["requests"]["manifest"]["miss"], 1);
    assert_eq!(c["requests"]["manifest"]["hit"], 2);
    assert!((c["requests"]["manifest"]["hit_ratio"].as_f64().unwrap() - 2.0 / 3.0).abs() < 1e-9);
    assert_eq!(c["requests"]["blob"]["hit"], 1);
    assert_eq!(c["pulls_saved"], 2);
    assert_eq!(c["upstream_requests"]["manifest_get"]["200"], 1);
    assert_eq!(c["blob_bytes_fetched"], image.blobs[1].len());
    assert_eq!(c["blob_bytes_served_from_cache"], image.blobs[1].len());
    assert_eq!(stats["rate_limit"]["limit"], 100);
    assert_eq!(stats["rate_limit"]["remaining"], 99);
    assert_eq!(stats["blob_store"]["blobs"], 1);
    assert_eq!(stats["manifest_cache"]["tags"], 1);

    let (scrape, value) = (support::scrape, support::metric);
    let before = scrape(&proxy).await;
    assert!(
        before
            .samples
            .iter()
            .all(|s| s.metric.starts_with("pullthrough_"))
    );
    let hits = [
        ("kind", "manifest"),
        ("method", "GET"),
        ("status", "200"),
        ("cache", "hit"),
    ];
    assert_eq!(value(&before, "pullthrough_requests_total", &hits), 2.0);
    assert_eq!(value(&before, "pullthrough_pulls_saved_total", &[]), 2.0);
    assert_eq!(
        value(
            &before,
            "pullthrough_upstream_requests_total",
            &[("kind", "manifest_get"), ("status", "200")]
        ),
        1.0
    );
    assert_eq!(value(&before, "pullthrough_ratelimit_remaining", &[]), 99.0);
    assert_eq!(
        value(&before, "pullthrough_blob_store_bytes", &[]),
        image.blobs[1].len() as f64
    );
    assert!(
        before
            .samples
            .iter()
            .any(|s| s.metric == "pullthrough_request_duration_seconds"
                || s.metric.starts_with("pullthrough_request_duration_seconds"))
    );

    pull_manifest(&proxy, path).await;
    let after = scrape(&proxy).await;
    assert_eq!(value(&after, "pullthrough_requests_total", &hits), 3.0);
    assert_eq!(value(&after, "pullthrough_pulls_saved_total", &[]), 3.0);
}

#[tokio::test]
async fn the_admin_token_guards_every_cache_endpoint() {
    let hub = FakeHub::start().await;
    let token = "0123456789abcdef-admin";
    let proxy = TestProxy::start_with(&hub, |c| {
        c.admin_token = Some(pullthrough::config::Secret(token.into()));
    })
    .await;
    for (method, path) in [
        (reqwest::Method::GET, "/_pullthrough/cache"),
        (reqwest::Method::GET, "/_pullthrough/stats"),
        (reqwest::Method::DELETE, "/_pullthrough/cache/library/x"),
    ] {
        let r = proxy.request(method.clone(), path, &[]).await;
        assert_eq!(r.status(), 401, "{method} {path} without a token");
        assert!(r.headers().contains_key("www-authenticate"));
        let body: Value = r.json().await.unwrap();
        assert!(
            body["errors"][0]["message"]
                .as_str()
                .unwrap()
                .contains("admin_token")
        );
        let r = proxy
            .request(
                method.clone(),
                path,
                &[("authorization", "Bearer wrong-token-wrong")],
            )
            .await;
        assert_eq!(r.status(), 401, "{method} {path} with a wrong token");
        let bearer = format!("Bearer {token}");
        let r = proxy
            .request(method.clone(), path, &[("authorization", &bearer)])
            .await;
        assert_eq!(r.status(), 200, "{method} {path} with the token");
    }
    // Registry endpoints stay open.
    assert_eq!(proxy.get("/v2/").await.status(), 200);
}

#[tokio::test]
async fn readiness_follows_the_data_directory_and_request_ids_are_echoed() {
    let hub = FakeHub::start().await;
    let proxy = TestProxy::start(&hub).await;
    let r = proxy.get("/readyz").await;
    assert_eq!(r.status(), 200);
    let body: Value = r.json().await.unwrap();
    assert_eq!(body["ready"], true);

    // Requests carry an id: the client's, or a new one.
    let r = proxy
        .request(
            reqwest::Method::GET,
            "/v2/",
            &[("x-request-id", "build-42")],
        )
        .await;
    assert_eq!(r.headers()["x-request-id"], "build-42");
    let a = proxy.get("/v2/").await.headers()["x-request-id"].clone();
    let b = proxy.get("/v2/").await.headers()["x-request-id"].clone();
    assert!(!a.is_empty() && a != b);
    let r = proxy
        .request(
            reqwest::Method::GET,
            "/v2/",
            &[("x-request-id", &"x".repeat(300))],
        )
        .await;
    assert_ne!(r.headers()["x-request-id"], "x".repeat(300).as_str());

    // A data directory that takes no new files: not ready (upstream is not asked).
    let tmp = proxy.config.data_dir.join("tmp");
    std::fs::remove_dir_all(&tmp).unwrap();
    std::fs::write(&tmp, "not a directory").unwrap();
    let before = hub.total();
    let r = proxy.get("/readyz").await;
    assert_eq!(r.status(), 503);
    let body: Value = r.json().await.unwrap();
    assert_eq!(body["data_dir_writable"], false);
    assert_eq!(hub.total(), before);
    assert_eq!(
        proxy.get("/healthz").await.status(),
        200,
        "alive all the same"
    );
}

#[tokio::test]
async fn the_status_page_shows_what_the_stats_report() {
    let hub = FakeHub::start().await;
    hub.push(
        "library/page",
        "1",
        &Image::single("page", DOCKER_MANIFEST, 100),
    );
    let proxy = TestProxy::start(&hub).await;
    for _ in 0..4 {
        pull_manifest(&proxy, "/v2/library/page/manifests/1").await;
    }
    let stats = json(&proxy, "/_pullthrough/stats").await;
    let r = proxy.get("/").await;
    assert_eq!(r.status(), 200);
    assert!(
        r.headers()["content-type"]
            .to_str()
            .unwrap()
            .starts_with("text/html")
    );
    let html = r.text().await.unwrap();
    assert!(!html.contains("<script"), "no JavaScript");
    let pulls = stats["counters"]["pulls_saved"].as_u64().unwrap();
    assert_eq!(pulls, 3);
    assert!(
        html.contains(&format!("<b id=\"pulls-saved\">{pulls}</b>")),
        "{html}"
    );
    assert!(html.contains("<b id=\"hit-ratio\">75.0%</b>"), "{html}");
    assert!(html.contains("<b id=\"budget\">99 of 100</b>"), "{html}");
    assert!(html.contains("library/page:1"), "{html}");
}

/// The server takes registry requests straight to their handler, past the router
/// (`pullthrough::http::Front`): every answer is the router's own, but for the request id,
/// HEAD and GET, hits and errors.
#[tokio::test]
async fn registry_requests_past_the_router_are_answered_as_the_router_answers_them() {
    use tower::ServiceExt;
    let hub = FakeHub::start().await;
    let image = Image::single("same", DOCKER_MANIFEST, 100);
    hub.push("library/x", "1", &image);
    let dir = tempfile::tempdir().unwrap();
    let config = TestProxy::config(&hub.url, dir.path());
    let app = pullthrough::app(&config).unwrap();
    let (router, front) = (app.router.clone(), app.front());
    let request = |method: &str, uri: &str| {
        let mut request = axum::http::Request::builder()
            .method(method)
            .uri(uri)
            .header("accept", DOCKER_MANIFEST)
            .body(axum::body::Body::empty())
            .unwrap();
        let peer: std::net::SocketAddr = "127.0.0.1:40000".parse().unwrap();
        request
            .extensions_mut()
            .insert(axum::extract::ConnectInfo(peer));
        request
    };
    let seen = |r: axum::response::Response| async move {
        let (mut parts, body) = r.into_parts();
        assert!(parts.headers.remove("x-request-id").is_some());
        let body = axum::body::to_bytes(body, 1 << 20).await.unwrap();
        (parts.status, format!("{:?}", parts.headers), body)
    };
    let (manifest, layer) = (
        format!("/v2/library/x/manifests/{}", image.digest),
        format!(
            "/v2/library/x/blobs/{}",
            support::hub::sha256(&image.blobs[1])
        ),
    );
    // Cached first, so both are answered from the cache.
    for uri in ["/v2/library/x/manifests/1", &layer] {
        let r = router.clone().oneshot(request("GET", uri)).await.unwrap();
        assert_eq!(seen(r).await.0, 200, "{uri}");
    }
    let upstream = hub.total();
    let requests = [
        ("GET", "/v2/library/x/manifests/1"),
        ("HEAD", "/v2/library/x/manifests/1"),
        ("GET", &manifest),
        ("HEAD", &manifest),
        ("GET", &layer),
        ("HEAD", &layer),
        ("GET", "/v2/"),
        ("HEAD", "/v2/"),
        ("GET", "/v2"),
        ("POST", "/v2/"),
        ("GET", "/v2/Library/x/manifests/latest"),
        ("HEAD", "/v2/Library/x/manifests/latest"),
        ("GET", "/v2//x/manifests/latest"),
        ("POST", "/v2/library/x/manifests/latest"),
        ("GET", "/v2/library/x/manifests/bad:tag!"),
        ("GET", "/v2/library/x/blobs/sha256:short"),
        ("GET", "/v2/library/x/elsewhere"),
        ("GET", "/v2/_catalog"),
        ("GET", "/v3/"),
        ("GET", "/healthz"),
        ("GET", "/nope"),
    ];
    for (method, uri) in requests {
        let routed = seen(router.clone().oneshot(request(method, uri)).await.unwrap()).await;
        let peer = "127.0.0.1:40000".parse().unwrap();
        let direct = seen(front.answer(request(method, uri), peer).await).await;
        assert_eq!(direct, routed, "{method} {uri}");
        assert!(
            direct.1.contains("docker-distribution-api-version"),
            "{method} {uri}"
        );
        if method == "HEAD" {
            assert!(direct.2.is_empty(), "{method} {uri}");
        }
    }
    assert_eq!(
        hub.total(),
        upstream,
        "hits and bad requests ask upstream nothing"
    );
}

#[tokio::test]
async fn without_an_admin_token_purges_are_for_loopback_clients_only() {
    use tower::ServiceExt;
    let hub = FakeHub::start().await;
    let dir = tempfile::tempdir().unwrap();
    let config = TestProxy::config(&hub.url, dir.path());
    let app = pullthrough::app(&config).unwrap().router;
    let request = |peer: &str, method: &str| {
        let mut request = axum::http::Request::builder()
            .method(method)
            // dry_run is a purge's key: a listing refuses it as unknown.
            .uri(if method == "DELETE" {
                "/_pullthrough/cache/library/x?dry_run=true"
            } else {
                "/_pullthrough/cache/library/x"
            })
            .body(axum::body::Body::empty())
            .unwrap();
        let peer: std::net::SocketAddr = peer.parse().unwrap();
        request
            .extensions_mut()
            .insert(axum::extract::ConnectInfo(peer));
        request
    };
    // A client on the network (here: a documentation address, handed in as the peer; no packet
    // is sent anywhere) may read but not purge.
    let r = app
        .clone()
        .oneshot(request("192.0.2.7:40000", "GET"))
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let r = app
        .clone()
        .oneshot(request("192.0.2.7:40000", "DELETE"))
        .await
        .unwrap();
    assert_eq!(r.status(), 401);
    let body = axum::body::to_bytes(r.into_body(), 1 << 16).await.unwrap();
    assert!(String::from_utf8_lossy(&body).contains("loopback"));
    for peer in ["127.0.0.1:40000", "[::1]:40000", "[::ffff:127.0.0.1]:40000"] {
        let r = app.clone().oneshot(request(peer, "DELETE")).await.unwrap();
        assert_eq!(r.status(), 200, "{peer}");
    }
}

#[tokio::test]
async fn paging_walks_every_entry_and_hits_count_only_answers() {
    let hub = FakeHub::start().await;
    let image = Image::single("paged", DOCKER_MANIFEST, 10);
    // Names whose order as `repository:tag` text differs from their order as (repository, tag).
    for repo in [
        "library/node",
        "library/node-red",
        "library/node2",
        "library/node/sub",
    ] {
        hub.push(repo, "latest", &image);
    }
    let proxy = TestProxy::start(&hub).await;
    for repo in [
        "library/node",
        "library/node-red",
        "library/node2",
        "library/node/sub",
    ] {
        pull_manifest(&proxy, &format!("/v2/{repo}/manifests/latest")).await;
    }
    let mut seen = Vec::new();
    let mut after = String::new();
    loop {
        let page = json(
            &proxy,
            &format!("/_pullthrough/cache?limit=1&after={after}"),
        )
        .await;
        for e in page["entries"].as_array().unwrap() {
            seen.push(format!(
                "{}:{}",
                e["repository"].as_str().unwrap(),
                e["tag"].as_str().unwrap()
            ));
        }
        match page["next"].as_str() {
            Some(next) => after = next.to_owned(),
            None => break,
        }
    }
    seen.sort();
    assert_eq!(
        seen,
        [
            "library/node-red:latest",
            "library/node/sub:latest",
            "library/node2:latest",
            "library/node:latest"
        ],
        "every entry once"
    );

    // Hits count answers the tag's entry gave: not 404s, not invented names.
    for _ in 0..3 {
        assert_eq!(
            proxy.get("/v2/library/node/manifests/nope").await.status(),
            404
        );
    }
    assert_eq!(
        proxy
            .head("/v2/library/node/manifests/latest")
            .await
            .status(),
        200
    );
    let entry = json(&proxy, "/_pullthrough/cache/library/node/manifests/latest").await;
    assert_eq!(entry["tag"]["hits"], 2, "one GET and one HEAD");
    let entry = json(&proxy, "/_pullthrough/cache/library/node/manifests/nope").await;
    assert_eq!(entry["tag"], Value::Null);

    // A platform the index lacks: explain says the pull fails. A bad blob digest is 400.
    let multi = multi_arch("paged-multi");
    hub.push("library/multi", "1", &multi);
    pull_manifest(&proxy, "/v2/library/multi/manifests/1").await;
    let explain = json(
        &proxy,
        "/_pullthrough/cache/library/multi/manifests/1?explain=pull&platform=linux/s390x",
    )
    .await;
    assert!(
        explain["error"].as_str().unwrap().contains("linux/s390x"),
        "{explain}"
    );
    let r = proxy.get("/_pullthrough/cache/blobs/notadigest").await;
    assert_eq!(r.status(), 400);
    assert_eq!(support::error_code(r).await, "DIGEST_INVALID");
}

#[tokio::test]
async fn a_moved_tag_is_not_a_pull_saved() {
    let hub = FakeHub::start().await;
    hub.push(
        "library/moving",
        "1",
        &Image::single("moving-a", DOCKER_MANIFEST, 10),
    );
    let proxy = TestProxy::start_with(&hub, |c| {
        c.tag_ttl = Duration::from_millis(1);
        c.max_stale = Duration::ZERO;
    })
    .await;
    let path = "/v2/library/moving/manifests/1";
    pull_manifest(&proxy, path).await;
    hub.push(
        "library/moving",
        "1",
        &Image::single("moving-b", DOCKER_MANIFEST, 10),
    );
    // The 1 ms TTL passes.
    tokio::time::sleep(Duration::from_millis(20)).await;
    pull_manifest(&proxy, path).await;
    assert_eq!(hub.count("manifest_get"), 2);
    let stats = json(&proxy, "/_pullthrough/stats").await;
    assert_eq!(
        stats["counters"]["pulls_saved"], 0,
        "every answer cost a GET"
    );
    // The TTL passes again.
    tokio::time::sleep(Duration::from_millis(20)).await;
    pull_manifest(&proxy, path).await;
    assert_eq!(hub.count("manifest_get"), 2, "unchanged: a HEAD only");
    let stats = json(&proxy, "/_pullthrough/stats").await;
    assert_eq!(stats["counters"]["pulls_saved"], 1);
}

#[tokio::test]
async fn with_an_admin_token_metrics_and_the_status_page_keep_names_private() {
    let hub = FakeHub::start().await;
    hub.push(
        "secretteam/app",
        "1",
        &Image::single("private-page", DOCKER_MANIFEST, 10),
    );
    let token = "0123456789abcdef-admin";
    let proxy = TestProxy::start_with(&hub, |c| {
        c.admin_token = Some(pullthrough::config::Secret(token.into()));
    })
    .await;
    pull_manifest(&proxy, "/v2/secretteam/app/manifests/1").await;
    assert_eq!(proxy.get("/metrics").await.status(), 401);
    let r = proxy
        .request(
            reqwest::Method::GET,
            "/metrics",
            &[("authorization", &format!("bearer {token}"))],
        )
        .await;
    assert_eq!(r.status(), 200, "the scheme is case-insensitive");
    let text = r.text().await.unwrap();
    assert!(
        !text.contains("e+308") && text.contains("le=\"+Inf\""),
        "{text}"
    );
    let r = proxy.get("/").await;
    assert_eq!(r.status(), 200);
    let page = r.text().await.unwrap();
    assert!(page.contains("id=\"pulls-saved\""), "{page}");
    assert!(!page.contains("secretteam"), "{page}");
    let r = proxy
        .request(
            reqwest::Method::GET,
            "/",
            &[("authorization", &format!("Bearer {token}"))],
        )
        .await;
    assert!(r.text().await.unwrap().contains("secretteam/app:1"));
}
