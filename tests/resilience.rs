//! Resilience and upstream economy: stale-while-revalidate, bounded stale-if-error, the client
//! deadline, 429 pauses, rate-limit budget, immutable tags and the upstream concurrency cap.

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::too_many_lines,
    reason = "a test panics on what it did not expect, and may read as one long story"
)]

mod support;

use futures_util::StreamExt;
use std::sync::Arc;
use std::time::{Duration, Instant};
use support::{FakeHub, Fault, Image, TestProxy, error_code, eventually};

use support::DOCKER_MANIFEST;

fn image(seed: &str) -> Image {
    Image::single(seed, DOCKER_MANIFEST, 10)
}

async fn get_all(
    proxy: &TestProxy,
    path: &str,
    n: usize,
    parallel: usize,
) -> Vec<(u16, String, Duration)> {
    let semaphore = Arc::new(tokio::sync::Semaphore::new(parallel));
    let mut tasks = Vec::new();
    for _ in 0..n {
        let (client, url, semaphore) = (
            proxy.client.clone(),
            format!("{}{path}", proxy.url),
            semaphore.clone(),
        );
        tasks.push(tokio::spawn(async move {
            let _permit = semaphore.acquire().await.unwrap();
            let started = Instant::now();
            let r = client.get(url).send().await.unwrap();
            let cache = r
                .headers()
                .get("x-cache")
                .map(|v| v.to_str().unwrap().to_owned())
                .unwrap_or_default();
            (r.status().as_u16(), cache, started.elapsed())
        }));
    }
    let mut out = Vec::new();
    for t in tasks {
        out.push(t.await.unwrap());
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_thousand_requests_during_one_revalidation_make_one_head_and_never_wait() {
    let hub = FakeHub::start().await;
    hub.push("library/hot", "latest", &image("hot"));
    let proxy = TestProxy::start_with(&hub, |c| c.tag_ttl = Duration::from_millis(200)).await;
    let path = "/v2/library/hot/manifests/latest";
    assert_eq!(proxy.get(path).await.status(), 200);
    // The TTL passes.
    tokio::time::sleep(Duration::from_millis(300)).await;
    // Held upstream until the 1,000 are answered (or 20 s have passed: a request that waited
    // for the revalidation then shows as slow instead of hanging).
    let gate = support::Gate::new();
    gate.open_after(Duration::from_secs(20));
    hub.fault(Fault::Hold(gate.clone()));
    let heads = hub.count("manifest_head");
    let results = get_all(&proxy, path, 1000, 50).await;
    gate.open();
    for (status, cache, elapsed) in &results {
        assert_eq!(*status, 200);
        assert_eq!(cache, "STALE");
        assert!(
            *elapsed < Duration::from_secs(2),
            "a stale answer waited {elapsed:?}"
        );
    }
    // Once the revalidation is over: one HEAD, and no GET after it.
    support::settled(&proxy).await;
    assert_eq!(hub.count("manifest_head") - heads, 1);
    assert_eq!(hub.count("manifest_get"), 1);
}

#[tokio::test]
async fn cached_content_survives_every_kind_of_upstream_failure() {
    for fault in [
        Fault::Status(503),
        Fault::Status(500),
        Fault::TooMany(30),
        Fault::TokenDown,
        Fault::BlackHole,
        Fault::Abuse,
    ] {
        let hub = FakeHub::start().await;
        let cached = image("cached");
        hub.push("library/app", "1", &cached);
        hub.push("library/app", "2", &image("uncached"));
        let proxy = TestProxy::start_with(&hub, |c| {
            c.tag_ttl = Duration::from_millis(100);
            // Stale answers come at once, well before it, however loaded the machine.
            c.upstream_deadline = Duration::from_secs(3);
        })
        .await;
        assert_eq!(proxy.get("/v2/library/app/manifests/1").await.status(), 200);
        // The TTL passes.
        tokio::time::sleep(Duration::from_millis(200)).await;
        hub.fault(fault.clone());
        if fault == Fault::TokenDown {
            hub.revoke_tokens();
        }
        for _ in 0..3 {
            let started = Instant::now();
            let r = proxy.get("/v2/library/app/manifests/1").await;
            assert_eq!(r.status(), 200, "{fault:?}");
            // A pull-limit 429 spares HEADs (Hub answers them at zero budget), so the tag may
            // even revalidate; every other fault leaves it stale.
            let cache = r.headers()["x-cache"].to_str().unwrap().to_owned();
            assert!(
                cache == "STALE" || (matches!(fault, Fault::TooMany(_)) && cache == "HIT"),
                "{fault:?}: {cache}"
            );
            assert!(
                started.elapsed() < Duration::from_millis(1_500),
                "{fault:?} took {:?}",
                started.elapsed()
            );
            assert_eq!(r.bytes().await.unwrap(), cached.bytes);
        }
        let r = proxy
            .get(&format!("/v2/library/app/manifests/{}", cached.digest))
            .await;
        assert_eq!(r.status(), 200, "{fault:?}");
        assert_eq!(r.headers()["x-cache"], "HIT");
        let started = Instant::now();
        let r = proxy.get("/v2/library/app/manifests/2").await;
        let want = match fault {
            Fault::TooMany(_) | Fault::Abuse => 429,
            Fault::BlackHole => 504,
            _ => 502,
        };
        assert_eq!(r.status(), want, "{fault:?}");
        assert!(started.elapsed() < Duration::from_secs(5), "{fault:?}");
        assert!(!error_code(r).await.is_empty());
    }
}

#[tokio::test]
async fn a_restarted_proxy_with_a_dead_upstream_serves_stale_tags() {
    let hub = FakeHub::start().await;
    let cached = image("dead");
    hub.push("library/dead", "1", &cached);
    let dir = Arc::new(tempfile::tempdir().unwrap());
    let mut config = TestProxy::config(&hub.url, dir.path());
    config.tag_ttl = Duration::from_millis(100);
    let proxy = TestProxy::start_config(config.clone(), Some(dir.clone())).await;
    assert_eq!(
        proxy.get("/v2/library/dead/manifests/1").await.status(),
        200
    );
    proxy.stop().await;
    // The TTL passes.
    tokio::time::sleep(Duration::from_millis(200)).await;
    let dead = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    config.upstream = format!("http://{}", dead.local_addr().unwrap())
        .parse()
        .unwrap();
    drop(dead);
    let proxy = TestProxy::start_config(config, Some(dir)).await;
    let r = proxy.get("/v2/library/dead/manifests/1").await;
    assert_eq!(r.status(), 200);
    assert_eq!(r.headers()["x-cache"], "STALE");
    assert_eq!(r.bytes().await.unwrap(), cached.bytes);
}

#[tokio::test]
async fn staleness_is_bounded_by_max_stale() {
    let hub = FakeHub::start().await;
    hub.push("library/old", "1", &image("old"));
    let proxy = TestProxy::start_with(&hub, |c| {
        c.tag_ttl = Duration::from_millis(100);
        // Wide enough for a loaded machine to ask within it.
        c.max_stale = Duration::from_secs(2);
    })
    .await;
    assert_eq!(proxy.get("/v2/library/old/manifests/1").await.status(), 200);
    hub.fault(Fault::Status(503));
    // The TTL passes.
    tokio::time::sleep(Duration::from_millis(150)).await;
    assert_eq!(
        proxy.get("/v2/library/old/manifests/1").await.headers()["x-cache"],
        "STALE"
    );
    // max_stale passes.
    tokio::time::sleep(Duration::from_millis(2_100)).await;
    let r = proxy.get("/v2/library/old/manifests/1").await;
    assert_eq!(
        r.status(),
        502,
        "past max_stale a failing upstream is an error"
    );
    hub.clear_faults();
    let r = proxy.get("/v2/library/old/manifests/1").await;
    assert_eq!(r.status(), 200);
    assert_eq!(r.headers()["x-cache"], "REVALIDATED");
}

#[tokio::test]
async fn black_holed_upstream_with_cached_tag_answers_within_the_deadline() {
    let hub = FakeHub::start().await;
    hub.push("library/bh", "1", &image("bh"));
    let proxy = TestProxy::start_with(&hub, |c| {
        c.tag_ttl = Duration::from_millis(50);
        c.upstream_deadline = Duration::from_secs(2);
    })
    .await;
    assert_eq!(proxy.get("/v2/library/bh/manifests/1").await.status(), 200);
    hub.fault(Fault::BlackHole);
    // The TTL passes.
    tokio::time::sleep(Duration::from_millis(100)).await;
    // The cached tag is served stale at once; the uncached one times out at the deadline.
    for (path, status, within) in [
        ("/v2/library/bh/manifests/1", 200, 0..1_500),
        ("/v2/library/bh/manifests/2", 504, 1_500..5_000),
    ] {
        let started = Instant::now();
        let r = proxy.get(path).await;
        let took = started.elapsed();
        assert!(
            within.contains(&(took.as_millis() as u64)),
            "{path}: {took:?}"
        );
        assert_eq!(r.status(), status, "{path}");
        if status == 200 {
            assert_eq!(r.headers()["x-cache"], "STALE", "{path}");
        }
    }
}

#[tokio::test]
async fn after_a_429_no_manifest_get_goes_out_until_retry_after() {
    let hub = FakeHub::start().await;
    for tag in ["1", "2"] {
        hub.push("library/limited", tag, &image(&format!("limited{tag}")));
    }
    let limited3 = image("limited3");
    hub.push("library/limited", "3", &limited3);
    let proxy = TestProxy::start(&hub).await;
    hub.fault(Fault::TooMany(2));
    let r = proxy.get("/v2/library/limited/manifests/1").await;
    assert_eq!(r.status(), 429);
    assert_eq!(hub.count("manifest_get"), 1);
    hub.clear_faults();
    let r = proxy.get("/v2/library/limited/manifests/2").await;
    assert_eq!(r.status(), 429);
    let retry: u64 = support::retry_after(&r);
    assert!((1..=2).contains(&retry), "{retry}");
    assert_eq!(hub.count("manifest_get"), 1, "paused: no GET went upstream");
    // The Retry-After passes.
    tokio::time::sleep(Duration::from_millis(2100)).await;
    assert_eq!(
        proxy.get_ok("/v2/library/limited/manifests/3").await,
        limited3.bytes
    );
    assert_eq!(hub.count("manifest_get"), 2);
}

#[tokio::test]
async fn below_the_budget_reserve_a_moved_tag_keeps_its_cached_digest() {
    let hub = FakeHub::start().await;
    let v1 = image("budget1");
    let v2 = image("budget2");
    hub.push("library/b", "latest", &v1);
    let new = image("budget-new");
    hub.push("library/b", "new", &new);
    hub.set_budget(100, 6);
    let proxy = TestProxy::start_with(&hub, |c| {
        c.tag_ttl = Duration::from_millis(100);
        c.max_stale = Duration::ZERO;
        c.ratelimit_reserve = 0.1;
    })
    .await;
    let path = "/v2/library/b/manifests/latest";
    assert_eq!(
        proxy.get(path).await.headers()["docker-content-digest"],
        v1.digest.as_str()
    );
    hub.push("library/b", "latest", &v2);
    // The TTL passes.
    tokio::time::sleep(Duration::from_millis(150)).await;
    let r = proxy.get(path).await;
    assert_eq!(
        r.headers()["docker-content-digest"],
        v1.digest.as_str(),
        "budget below reserve: keep the cached digest"
    );
    assert_eq!(r.headers()["x-cache"], "STALE");
    assert_eq!(hub.count("manifest_get"), 1);
    // A never-seen reference is still fetched.
    assert_eq!(proxy.get_ok("/v2/library/b/manifests/new").await, new.bytes);
    assert_eq!(hub.count("manifest_get"), 2);
    // A new window: the moved tag is picked up at the next revalidation.
    hub.reset_window();
    // The TTL passes again.
    tokio::time::sleep(Duration::from_millis(150)).await;
    let r = proxy.get(path).await;
    assert_eq!(r.headers()["docker-content-digest"], v2.digest.as_str());
    assert_eq!(r.bytes().await.unwrap(), v2.bytes);
}

#[tokio::test]
async fn immutable_tags_are_never_revalidated() {
    let hub = FakeHub::start().await;
    hub.push("library/semver", "v1.2.3", &image("semver"));
    hub.push("library/semver", "latest", &image("semver-latest"));
    let proxy = TestProxy::start_with(&hub, |c| {
        c.tag_ttl = Duration::from_millis(50);
        c.immutable_tags = vec![r"^v\d+\.\d+\.\d+$".into()];
    })
    .await;
    proxy.get("/v2/library/semver/manifests/v1.2.3").await;
    proxy.get("/v2/library/semver/manifests/latest").await;
    // The TTL passes.
    tokio::time::sleep(Duration::from_millis(100)).await;
    for _ in 0..3 {
        assert_eq!(
            proxy
                .get("/v2/library/semver/manifests/v1.2.3")
                .await
                .headers()["x-cache"],
            "HIT"
        );
    }
    proxy.get("/v2/library/semver/manifests/latest").await;
    // The stale tag is revalidated in the background.
    let revalidated = eventually(Duration::from_secs(5), async || {
        hub.count("HEAD /v2/library/semver/manifests/latest") > 0
    })
    .await;
    assert!(revalidated, "the stale tag was never revalidated");
    assert_eq!(hub.count("HEAD /v2/library/semver/manifests/v1.2.3"), 0);
    assert_eq!(hub.count("HEAD /v2/library/semver/manifests/latest"), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn upstream_concurrency_is_capped() {
    let hub = FakeHub::start().await;
    for i in 0..100 {
        hub.push(
            "library/many",
            &format!("t{i}"),
            &image(&format!("many{i}")),
        );
    }
    hub.fault(Fault::Delay(Duration::from_millis(20)));
    let proxy = TestProxy::start_with(&hub, |c| c.upstream_max_concurrency = 4).await;
    let mut tasks = Vec::new();
    for i in 0..500 {
        let (client, url) = (
            proxy.client.clone(),
            format!("{}/v2/library/many/manifests/t{}", proxy.url, i % 100),
        );
        tasks.push(tokio::spawn(async move {
            client.get(url).send().await.unwrap().status().as_u16()
        }));
    }
    for t in tasks {
        assert_eq!(t.await.unwrap(), 200);
    }
    assert!(hub.peak_in_flight() <= 4, "peak {}", hub.peak_in_flight());
    assert_eq!(hub.count("manifest_get"), 100);
}

#[tokio::test]
async fn a_spent_budget_still_allows_heads_and_cached_pulls() {
    let hub = FakeHub::start().await;
    let cached = image("spent-cached");
    hub.push("library/spent", "cached", &cached);
    let new = image("spent-new");
    hub.push("library/spent", "new", &new);
    let proxy = TestProxy::start(&hub).await;
    assert_eq!(
        proxy
            .get("/v2/library/spent/manifests/cached")
            .await
            .status(),
        200
    );
    hub.set_budget(100, 0);
    // Hub answers HEADs at zero budget: a client HEAD of a new tag works, and costs no pull.
    let head = proxy.head("/v2/library/spent/manifests/new").await;
    assert_eq!(head.status(), 200);
    let r = proxy.get("/v2/library/spent/manifests/new").await;
    assert_eq!(r.status(), 429);
    assert_eq!(error_code(r).await, "TOOMANYREQUESTS");
    let r = proxy.get("/v2/library/spent/manifests/cached").await;
    assert_eq!(r.status(), 200);
    assert_eq!(r.bytes().await.unwrap(), cached.bytes);
    assert_eq!(
        hub.count("manifest_get"),
        2,
        "one pull for the cached tag, one refused"
    );
    // Without a Retry-After there is nothing to wait for: a new window is used at once.
    hub.reset_window();
    assert_eq!(
        proxy.get_ok("/v2/library/spent/manifests/new").await,
        new.bytes
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_concurrency_cap_covers_a_whole_blob_download() {
    let hub = FakeHub::start().await;
    hub.push("library/cap", "1", &image("cap"));
    let blob = bytes::Bytes::from(support::hub::pattern("cap", 1024 * 1024));
    let digest = hub.push_blob("library/cap", blob.clone());
    // 16 chunks of 64 KiB, one every 60 ms: the download takes about a second.
    hub.fault(Fault::SlowBlob(Duration::from_millis(60)));
    let proxy = TestProxy::start_with(&hub, |c| c.upstream_max_concurrency = 1).await;
    let (client, url) = (
        proxy.client.clone(),
        format!("{}/v2/library/cap/blobs/{digest}", proxy.url),
    );
    // The blob's first bytes arrived: its exchange holds the one place now.
    let started = Instant::now();
    let r = client.get(url).send().await.unwrap();
    let mut stream = r.bytes_stream();
    let first = stream.next().await.unwrap().unwrap();
    let download = tokio::spawn(async move {
        let mut body = first.to_vec();
        while let Some(chunk) = stream.next().await {
            body.extend_from_slice(&chunk?);
        }
        Ok::<_, reqwest::Error>(bytes::Bytes::from(body))
    });
    assert_eq!(proxy.get("/v2/library/cap/manifests/1").await.status(), 200);
    // The manifest GET waited for the blob exchange to end (16 pauses of 60 ms after the blob
    // was asked for), not just for its headers.
    assert!(
        started.elapsed() >= Duration::from_millis(900),
        "the manifest went out while the blob body was still being read ({:?})",
        started.elapsed()
    );
    assert_eq!(download.await.unwrap().unwrap(), blob);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slow_blob_downloads_leave_room_under_the_cap_for_manifests() {
    let hub = FakeHub::start().await;
    hub.push("library/room", "1", &image("room"));
    let blobs: Vec<(bytes::Bytes, String)> = (0..4)
        .map(|i| {
            let blob = bytes::Bytes::from(support::hub::pattern(&format!("room{i}"), 2 << 20));
            let digest = hub.push_blob("library/room", blob.clone());
            (blob, digest)
        })
        .collect();
    // Each download takes about 3.2 s (32 chunks of 64 KiB, one every 100 ms).
    hub.fault(Fault::SlowBlob(Duration::from_millis(100)));
    let proxy = TestProxy::start_with(&hub, |c| c.upstream_max_concurrency = 4).await;
    let mut downloads = Vec::new();
    for (blob, digest) in &blobs {
        let (client, url, blob) = (
            proxy.client.clone(),
            format!("{}/v2/library/room/blobs/{digest}", proxy.url),
            blob.clone(),
        );
        downloads.push(tokio::spawn(async move {
            let body = client.get(url).send().await.unwrap().bytes().await.unwrap();
            assert_eq!(body, blob);
        }));
    }
    // The downloads hold their slots: three bodies are coming.
    let streaming = eventually(Duration::from_secs(10), async || hub.count("cdn_get") >= 3).await;
    assert!(streaming, "the blob downloads did not start");
    let started = Instant::now();
    assert_eq!(
        proxy.get("/v2/library/room/manifests/1").await.status(),
        200
    );
    // Three of the four slots at most go to blob bodies: the manifest did not wait for one.
    assert!(
        started.elapsed() < Duration::from_millis(2000),
        "the manifest waited {:?} behind blob downloads",
        started.elapsed()
    );
    for d in downloads {
        d.await.unwrap();
    }
    assert!(hub.peak_in_flight() <= 4);
}
