//! Error envelopes and statuses: bad input never reaches upstream; upstream trouble becomes
//! the right registry error within the deadline.

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::too_many_lines,
    reason = "a test panics on what it did not expect, and may read as one long story"
)]

mod support;

use reqwest::Method;
use std::time::{Duration, Instant};
use support::{FakeHub, Fault, Image, TestProxy, error_code};

use support::DOCKER_MANIFEST;

#[tokio::test]
async fn invalid_input_is_400_without_upstream_requests() {
    let hub = FakeHub::start().await;
    let proxy = TestProxy::start(&hub).await;
    let long_tag = "t".repeat(200);
    let cases = [
        (
            "/v2/library/a..b/manifests/latest".to_owned(),
            400,
            "NAME_INVALID",
        ),
        (
            "/v2/Library/alpine/manifests/latest".to_owned(),
            400,
            "NAME_INVALID",
        ),
        ("/v2/UPPER/manifests/latest".to_owned(), 400, "NAME_INVALID"),
        ("/v2/a//b/manifests/latest".to_owned(), 400, "NAME_INVALID"),
        // A reference that is no valid tag names no manifest (the OCI conformance suite's
        // `.INVALID_MANIFEST_NAME`); a malformed digest stays 400.
        (
            format!("/v2/library/alpine/manifests/{long_tag}"),
            404,
            "MANIFEST_UNKNOWN",
        ),
        (
            "/v2/library/alpine/manifests/.INVALID_MANIFEST_NAME".to_owned(),
            404,
            "MANIFEST_UNKNOWN",
        ),
        (
            "/v2/library/alpine/manifests/sha256:xyz".to_owned(),
            400,
            "DIGEST_INVALID",
        ),
        (
            "/v2/library/alpine/manifests/md5:abc".to_owned(),
            400,
            "DIGEST_INVALID",
        ),
        (
            "/v2/library/alpine/blobs/latest".to_owned(),
            400,
            "DIGEST_INVALID",
        ),
        ("/v2/library/alpine".to_owned(), 404, "NOT_FOUND"),
        (
            "/v2/alpine/tags/list?n=abc".to_owned(),
            400,
            "PAGINATION_NUMBER_INVALID",
        ),
        (
            "/v2/alpine/tags/list?last=..".to_owned(),
            400,
            "TAG_INVALID",
        ),
        ("/nothing".to_owned(), 404, "NOT_FOUND"),
    ];
    for (path, status, code) in cases {
        let r = proxy.get(&path).await;
        assert_eq!(r.status(), status, "{path}");
        assert_eq!(r.headers()["content-type"], "application/json", "{path}");
        assert_eq!(
            r.headers()["docker-distribution-api-version"],
            "registry/2.0"
        );
        assert_eq!(error_code(r).await, code, "{path}");
    }
    for method in [Method::PUT, Method::POST, Method::DELETE, Method::PATCH] {
        let r = proxy
            .request(method.clone(), "/v2/library/alpine/manifests/latest", &[])
            .await;
        assert_eq!(r.status(), 405, "{method}");
        assert_eq!(error_code(r).await, "UNSUPPORTED");
    }
    // Clients normalise "..", so send it raw.
    let raw = raw_get(&proxy.url, "/v2/library/../etc/manifests/latest").await;
    assert!(raw.starts_with("HTTP/1.1 400"), "{raw}");
    assert!(raw.contains("NAME_INVALID"), "{raw}");
    let r = proxy
        .request(Method::POST, "/v2/library/alpine/blobs/uploads/", &[])
        .await;
    assert_eq!(r.status(), 405);
    assert_eq!(hub.total(), 0, "bad input caused no upstream request");
}

#[tokio::test]
async fn ping_answers_200_with_empty_json() {
    let hub = FakeHub::start().await;
    let proxy = TestProxy::start(&hub).await;
    for path in ["/v2/", "/v2"] {
        let r = proxy.get(path).await;
        assert_eq!(r.status(), 200);
        assert_eq!(r.headers()["content-type"], "application/json");
        assert_eq!(
            r.headers()["docker-distribution-api-version"],
            "registry/2.0"
        );
        assert_eq!(r.text().await.unwrap(), "{}");
    }
    let head = proxy.head("/v2/").await;
    assert_eq!(head.status(), 200);
}

#[tokio::test]
async fn upstream_failures_map_to_registry_errors() {
    let hub = FakeHub::start().await;
    hub.push("library/x", "1", &Image::single("x", DOCKER_MANIFEST, 10));
    let proxy = TestProxy::start(&hub).await;

    hub.fault(Fault::Status(503));
    let r = proxy.get("/v2/library/x/manifests/1").await;
    assert_eq!(r.status(), 502);
    assert_eq!(error_code(r).await, "UNAVAILABLE");

    hub.clear_faults();
    hub.fault(Fault::TooMany(7));
    let r = proxy.get("/v2/library/x/manifests/1").await;
    assert_eq!(r.status(), 429);
    assert_eq!(r.headers()["retry-after"], "7");
    assert_eq!(error_code(r).await, "TOOMANYREQUESTS");
}

#[tokio::test]
async fn black_holed_upstream_gets_504_within_the_deadline() {
    let hub = FakeHub::start().await;
    hub.push("library/x", "1", &Image::single("x", DOCKER_MANIFEST, 10));
    let proxy =
        TestProxy::start_with(&hub, |c| c.upstream_deadline = Duration::from_millis(500)).await;
    hub.fault(Fault::BlackHole);
    let blob = format!("/v2/library/x/blobs/sha256:{}", "0".repeat(64));
    // A one-component name also has to learn whether upstream is Docker Hub first.
    for path in [
        "/v2/library/x/manifests/1",
        "/v2/x/manifests/1",
        &blob,
        "/v2/library/x/tags/list",
    ] {
        for method in [Method::GET, Method::HEAD] {
            let started = Instant::now();
            let r = proxy.request(method.clone(), path, &[]).await;
            assert_eq!(r.status(), 504, "{method} {path}");
            assert!(
                started.elapsed() < Duration::from_secs(3),
                "{method} {path}: {:?}",
                started.elapsed()
            );
        }
    }
    // Each 504 is counted under the upstream it was routed to, though the deadline cut it.
    let host = hub.url.trim_start_matches("http://");
    let scrape = support::scrape(&proxy).await;
    let timed_out = support::metric(
        &scrape,
        "pullthrough_requests_total",
        &[("upstream", host), ("status", "504")],
    );
    assert_eq!(timed_out, 8.0);
}

#[tokio::test]
async fn unreachable_upstream_is_502() {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let dead = format!("http://{}", listener.local_addr().unwrap());
    drop(listener);
    let dir = tempfile::tempdir().unwrap();
    let config = TestProxy::config(&dead, dir.path());
    let proxy = TestProxy::start_config(config, None).await;
    let r = proxy.get("/v2/library/x/manifests/1").await;
    assert_eq!(r.status(), 502);
    // The message names the cause class, not just "upstream failed".
    let body: serde_json::Value = r.json().await.unwrap();
    assert_eq!(body["errors"][0]["code"], "UNAVAILABLE");
    assert_eq!(
        body["errors"][0]["message"],
        "upstream registry failed: upstream unreachable: connection refused"
    );
}

async fn raw_get(base: &str, path: &str) -> String {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut stream = tokio::net::TcpStream::connect(base.trim_start_matches("http://"))
        .await
        .unwrap();
    let request = format!("GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n");
    stream.write_all(request.as_bytes()).await.unwrap();
    let mut out = String::new();
    stream.read_to_string(&mut out).await.unwrap();
    out
}
