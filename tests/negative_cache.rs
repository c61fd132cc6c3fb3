//! The negative cache (issue 19 item 7): an upstream 404 for a tag or a manifest digest is
//! remembered for `negative_ttl` per upstream and repository, so a storm of requests for
//! something missing costs one upstream request per TTL; a purge forgets it; blob 404s, 401/403
//! and 5xx are never remembered, nor a 404 that is not the registry's own.

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::too_many_lines,
    reason = "a test panics on what it did not expect, and may read as one long story"
)]

mod support;

use std::time::Duration;
use support::{DOCKER_MANIFEST, FakeHub, Fault, Image, TestProxy, error_code, metric, scrape};

/// `n` concurrent GETs of `path`: their statuses.
async fn storm(proxy: &TestProxy, path: &str, n: usize) -> Vec<u16> {
    let requests = (0..n).map(|_| {
        let (client, url) = (proxy.client.clone(), format!("{}{path}", proxy.url));
        tokio::spawn(async move { client.get(url).send().await.unwrap().status().as_u16() })
    });
    let mut statuses = Vec::new();
    for r in requests.collect::<Vec<_>>() {
        statuses.push(r.await.unwrap());
    }
    statuses
}

async fn delete(proxy: &TestProxy, path: &str) -> reqwest::Response {
    proxy.request(reqwest::Method::DELETE, path, &[]).await
}

async fn negative_hits(proxy: &TestProxy) -> u64 {
    let stats: serde_json::Value = proxy.get("/_pullthrough/stats").await.json().await.unwrap();
    stats["counters"]["negative_cache_hits"].as_u64().unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_storm_for_a_missing_tag_costs_one_upstream_request_per_ttl() {
    let hub = FakeHub::start().await;
    hub.push(
        "library/app",
        "1",
        &Image::single("app", DOCKER_MANIFEST, 10),
    );
    // Long enough for every check below to run within it on a loaded machine.
    let ttl = Duration::from_secs(3);
    let proxy = TestProxy::start_with(&hub, |c| c.negative_ttl = ttl).await;
    let path = "/v2/library/app/manifests/typo";
    let gets = || hub.count("GET /v2/library/app/manifests/typo");

    // 50 at once: one flight, one upstream GET, every client a 404 MANIFEST_UNKNOWN.
    hub.fault(Fault::Delay(Duration::from_millis(200)));
    assert!(storm(&proxy, path, 50).await.iter().all(|s| *s == 404));
    hub.clear_faults();
    assert_eq!(gets(), 1);
    let r = proxy.get(path).await;
    assert_eq!(r.status(), 404);
    assert_eq!(error_code(r).await, "MANIFEST_UNKNOWN");
    // Within the TTL: nothing more upstream, GET or HEAD, however many ask.
    let total = hub.total();
    assert!(storm(&proxy, path, 50).await.iter().all(|s| *s == 404));
    assert_eq!(proxy.head(path).await.status(), 404);
    assert_eq!(hub.total(), total);
    assert!(negative_hits(&proxy).await >= 51);
    assert!(
        metric(
            &scrape(&proxy).await,
            "pullthrough_negative_cache_hits_total",
            &[]
        ) >= 51.0
    );
    let explain: serde_json::Value = proxy
        .get("/_pullthrough/cache/library/app/manifests/typo?explain=pull")
        .await
        .json()
        .await
        .unwrap();
    assert_eq!(explain["upstream_requests"], serde_json::json!([]));
    assert!(
        explain["summary"]
            .as_str()
            .unwrap()
            .contains("negative_ttl"),
        "{explain}"
    );
    // A cached tag of the same repository is untouched; another missing tag is asked.
    assert_eq!(proxy.get("/v2/library/app/manifests/1").await.status(), 200);
    assert_eq!(
        proxy.get("/v2/library/app/manifests/other").await.status(),
        404
    );
    assert_eq!(hub.count("GET /v2/library/app/manifests/other"), 1);

    // After the TTL: one request more, then remembered again.
    tokio::time::sleep(ttl + Duration::from_millis(100)).await;
    assert!(storm(&proxy, path, 20).await.iter().all(|s| *s == 404));
    assert_eq!(gets(), 2);

    // Pushed meanwhile: still a 404 within the TTL (the price of the cache), until a purge of
    // the tag forgets it, which answers 200 though nothing else was cached.
    hub.push(
        "library/app",
        "typo",
        &Image::single("late", DOCKER_MANIFEST, 10),
    );
    assert_eq!(proxy.get(path).await.status(), 404);
    let r = delete(&proxy, "/_pullthrough/cache/library/app/manifests/typo").await;
    assert_eq!(r.status(), 200);
    let purge: serde_json::Value = r.json().await.unwrap();
    assert_eq!(purge["not_found"], serde_json::json!(["library/app:typo"]));
    assert_eq!(purge["tags"], serde_json::json!([]));
    let r = proxy.get(path).await;
    assert_eq!(r.status(), 200);
    assert_eq!(r.headers()["x-cache"], "MISS");
    assert_eq!(gets(), 3);
}

#[tokio::test]
async fn a_missing_digest_is_remembered_per_repository_and_a_repository_purge_forgets_it() {
    let hub = FakeHub::start().await;
    let image = Image::single("later", DOCKER_MANIFEST, 10);
    // The repositories exist (Docker Hub answers 401, not 404, for one that does not).
    hub.push("team/app", "1", &Image::single("app", DOCKER_MANIFEST, 10));
    hub.push(
        "team/other",
        "1",
        &Image::single("other", DOCKER_MANIFEST, 10),
    );
    let proxy = TestProxy::start(&hub).await;
    let path = format!("/v2/team/app/manifests/{}", image.digest);
    let gets = |repo: &str| hub.count(&format!("GET /v2/{repo}/manifests/{}", image.digest));
    let heads = |repo: &str| hub.count(&format!("HEAD /v2/{repo}/manifests/{}", image.digest));
    for _ in 0..5 {
        assert_eq!(proxy.get(&path).await.status(), 404);
    }
    assert_eq!(gets("team/app"), 1);
    // A HEAD of a remembered digest asks nothing; a HEAD is remembered as well.
    assert_eq!(proxy.head(&path).await.status(), 404);
    assert_eq!(heads("team/app"), 0);
    let other = format!("/v2/team/other/manifests/{}", image.digest);
    for _ in 0..3 {
        assert_eq!(proxy.head(&other).await.status(), 404);
    }
    assert_eq!(heads("team/other"), 1, "per repository");
    assert_eq!(proxy.get(&other).await.status(), 404);
    assert_eq!(
        gets("team/other"),
        0,
        "a HEAD's 404 is remembered for a GET"
    );
    assert_eq!(proxy.get("/v2/team/app/manifests/nope").await.status(), 404);

    // A dry run lists what would be forgotten and forgets nothing.
    let r = delete(&proxy, "/_pullthrough/cache/team/app?dry_run=true").await;
    let listed: Vec<String> =
        serde_json::from_value(r.json::<serde_json::Value>().await.unwrap()["not_found"].clone())
            .unwrap();
    let by_digest = format!("team/app@{}", image.digest);
    assert_eq!(listed, ["team/app:nope".to_owned(), by_digest]);
    assert_eq!(proxy.get(&path).await.status(), 404);
    assert_eq!(gets("team/app"), 1);

    hub.push_untagged("team/app", &image);
    let r = delete(&proxy, "/_pullthrough/cache/team/app").await;
    assert_eq!(r.status(), 200);
    assert_eq!(
        r.json::<serde_json::Value>().await.unwrap()["not_found"]
            .as_array()
            .unwrap()
            .len(),
        2
    );
    assert_eq!(proxy.get_ok(&path).await, image.bytes);
    assert_eq!(gets("team/app"), 2);
    // Cached now, the manifest is served for the other repository too (content-addressed,
    // shared where no credentials are): the cache wins over a remembered 404.
    assert_eq!(proxy.head(&other).await.status(), 200);
    assert_eq!(heads("team/other"), 1);

    // A purge by digest forgets that digest's 404 in that repository.
    let gone = Image::single("gone", DOCKER_MANIFEST, 10);
    let path = format!("/v2/team/other/manifests/{}", gone.digest);
    let gets = || hub.count(&format!("GET {path}"));
    for _ in 0..2 {
        assert_eq!(proxy.get(&path).await.status(), 404);
    }
    assert_eq!(gets(), 1);
    let r = delete(
        &proxy,
        &format!("/_pullthrough/cache/team/other/manifests/{}", gone.digest),
    )
    .await;
    assert_eq!(r.status(), 200);
    assert_eq!(
        r.json::<serde_json::Value>().await.unwrap()["not_found"],
        serde_json::json!([format!("team/other@{}", gone.digest)])
    );
    assert_eq!(proxy.get(&path).await.status(), 404);
    assert_eq!(gets(), 2);
}

#[tokio::test]
async fn only_the_registrys_own_404s_for_manifests_are_remembered() {
    let hub = FakeHub::start().await;
    hub.add_user("svc", "svc-pw");
    hub.push("acme/secret", "1", &Image::single("s", DOCKER_MANIFEST, 10));
    hub.make_private("acme/secret");
    hub.push(
        "library/app",
        "1",
        &Image::single("app", DOCKER_MANIFEST, 10),
    );
    let proxy = TestProxy::start(&hub).await;

    // 5xx: every request asks.
    hub.fault(Fault::Status(503));
    for _ in 0..3 {
        assert_eq!(proxy.get("/v2/library/app/manifests/x").await.status(), 502);
    }
    hub.clear_faults();
    assert_eq!(hub.count("GET /v2/library/app/manifests/x"), 3);
    // 401/403 (a private repository without credentials): every request asks.
    for _ in 0..3 {
        assert_eq!(proxy.get("/v2/acme/secret/manifests/1").await.status(), 404);
    }
    assert!(hub.count("GET /v2/acme/secret/manifests/1") >= 3);
    // Blob 404s: every request asks.
    let blob = support::hub::sha256(b"not there");
    for _ in 0..3 {
        assert_eq!(
            proxy
                .get(&format!("/v2/library/app/blobs/{blob}"))
                .await
                .status(),
            404
        );
    }
    assert_eq!(hub.count(&format!("GET /v2/library/app/blobs/{blob}")), 3);
    assert_eq!(
        proxy
            .get("/_pullthrough/stats")
            .await
            .json::<serde_json::Value>()
            .await
            .unwrap()["negative_cache_entries"],
        0
    );
}

#[tokio::test]
async fn a_404_page_in_front_of_the_registry_is_not_remembered() {
    use axum::http::Method;
    use support::hostile::{Hostile, json_error, respond};
    let up = Hostile::start().await;
    up.answer_ping(Duration::ZERO, None);
    up.on(Method::GET, "/v2/acme/page/manifests/", |_, _| {
        respond(
            404,
            &[("content-type", "text/html")],
            "<h1>404 Not Found</h1>",
        )
    });
    up.on(Method::GET, "/v2/acme/registry/manifests/", |_, _| {
        json_error(404, "MANIFEST_UNKNOWN", "manifest unknown")
    });
    let proxy = TestProxy::start_with_upstream(&up.url).await;
    for _ in 0..3 {
        for repo in ["page", "registry"] {
            let r = proxy.get(&format!("/v2/acme/{repo}/manifests/1")).await;
            assert_eq!(r.status(), 404);
        }
    }
    assert_eq!(up.count(Method::GET, "/v2/acme/page/manifests/"), 3);
    assert_eq!(up.count(Method::GET, "/v2/acme/registry/manifests/"), 1);
}

#[tokio::test]
async fn negative_ttl_zero_remembers_nothing() {
    let hub = FakeHub::start().await;
    hub.push(
        "library/app",
        "1",
        &Image::single("app", DOCKER_MANIFEST, 10),
    );
    let proxy = TestProxy::start_with(&hub, |c| c.negative_ttl = Duration::ZERO).await;
    for _ in 0..3 {
        assert_eq!(proxy.get("/v2/library/app/manifests/x").await.status(), 404);
    }
    assert_eq!(hub.count("GET /v2/library/app/manifests/x"), 3);
    let proxy = TestProxy::start_with(&hub, |c| c.negative_cache_entries = 0).await;
    for _ in 0..2 {
        assert_eq!(proxy.get("/v2/library/app/manifests/y").await.status(), 404);
    }
    assert_eq!(hub.count("GET /v2/library/app/manifests/y"), 2);
}

#[tokio::test]
async fn a_tag_deleted_upstream_is_remembered_when_its_revalidation_finds_it_gone() {
    let hub = FakeHub::start().await;
    hub.push(
        "library/app",
        "1",
        &Image::single("app", DOCKER_MANIFEST, 10),
    );
    let proxy = TestProxy::start_with(&hub, |c| {
        c.tag_ttl = Duration::from_millis(100);
        c.max_stale = Duration::ZERO;
    })
    .await;
    let path = "/v2/library/app/manifests/1";
    proxy.get_ok(path).await;
    hub.delete_tag("library/app", "1");
    tokio::time::sleep(Duration::from_millis(150)).await;
    let (heads, gets) = (
        hub.count("HEAD /v2/library/app/manifests/1"),
        hub.count("GET /v2/library/app/manifests/1"),
    );
    for _ in 0..5 {
        assert_eq!(proxy.get(path).await.status(), 404);
    }
    assert_eq!(
        hub.count("HEAD /v2/library/app/manifests/1"),
        heads + 1,
        "one revalidating HEAD, then remembered"
    );
    assert_eq!(hub.count("GET /v2/library/app/manifests/1"), gets);
}

#[tokio::test]
async fn a_remembered_404_is_no_answer_for_a_client_that_may_not_pull_the_repository() {
    use pullthrough::config::AccessRule;
    let hub = FakeHub::start().await;
    hub.push("acme/app", "1", &Image::single("app", DOCKER_MANIFEST, 10));
    let dir = tempfile::tempdir().unwrap();
    let htpasswd = dir.path().join("htpasswd");
    let mut text = String::new();
    for user in ["alice", "bob"] {
        let hash = bcrypt::hash(format!("{user}-pw"), 4).unwrap();
        text.push_str(&format!("{user}:{hash}\n"));
    }
    std::fs::write(&htpasswd, text).unwrap();
    let proxy = TestProxy::start_with(&hub, |c| {
        c.htpasswd = Some(htpasswd);
        c.access = vec![AccessRule {
            upstream: "docker.io".into(),
            prefix: "acme/".into(),
            users: vec!["alice".into()],
            anonymous: false,
        }];
    })
    .await;
    let as_user = |user: &str| {
        use base64::Engine as _;
        let basic = base64::engine::general_purpose::STANDARD.encode(format!("{user}:{user}-pw"));
        format!("Basic {basic}")
    };
    let path = "/v2/acme/app/manifests/nope";
    let get = async |user: Option<&str>| {
        let headers = user.map(|u| ("authorization", as_user(u)));
        let headers: Vec<(&str, &str)> = headers.iter().map(|(k, v)| (*k, v.as_str())).collect();
        proxy
            .request(reqwest::Method::GET, path, &headers)
            .await
            .status()
            .as_u16()
    };
    assert_eq!(get(Some("alice")).await, 404);
    assert_eq!(get(Some("alice")).await, 404);
    assert_eq!(hub.count(&format!("GET {path}")), 1);
    // Refused before the negative cache is looked at, as before anything cached.
    assert_eq!(get(Some("bob")).await, 403);
    assert_eq!(get(None).await, 401);
    assert_eq!(hub.count(&format!("GET {path}")), 1);
}
