//! Offline mode (issue 19 item 6): from startup (`offline = true`) or switched at run time
//! (`PUT /_pullthrough/offline`), nothing is asked of any upstream (registry, token realm,
//! CDN, ping): cached tags are served whatever their age, digests and blobs as usual, and the
//! rest is 503 `UNAVAILABLE` naming what is not cached. Back online, tags revalidate again.

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::too_many_lines,
    reason = "a test panics on what it did not expect, and may read as one long story"
)]

mod support;

use std::sync::Arc;
use std::time::Duration;
use support::{DOCKER_MANIFEST, FakeHub, Image, TestProxy, metric, scrape};

/// Every request the hubs saw: registry (pings included), token realm and CDN.
fn asked(hubs: &[&FakeHub]) -> u64 {
    hubs.iter()
        .map(|h| h.total() + h.count("ping") + h.count("cdn_get"))
        .sum()
}

/// The response's `X-Cache`.
fn cache(r: &reqwest::Response) -> String {
    r.headers()
        .get("x-cache")
        .map(|v| v.to_str().unwrap().to_owned())
        .unwrap_or_default()
}

/// A 503 `UNAVAILABLE` whose message says pullthrough is offline and `what` is not cached.
async fn offline_answer(r: reqwest::Response, what: &str) {
    assert_eq!(r.status(), 503, "{what}");
    let body: serde_json::Value = r.json().await.unwrap();
    assert_eq!(body["errors"][0]["code"], "UNAVAILABLE", "{body}");
    let message = body["errors"][0]["message"].as_str().unwrap();
    assert_eq!(
        message,
        format!("pullthrough is offline and {what} is not cached"),
        "{body}"
    );
}

async fn put_offline(proxy: &TestProxy, body: &str) -> reqwest::Response {
    proxy
        .client
        .put(format!("{}/_pullthrough/offline", proxy.url))
        .header("content-type", "application/json")
        .body(body.to_owned())
        .send()
        .await
        .unwrap()
}

async fn stats(proxy: &TestProxy) -> serde_json::Value {
    proxy.get("/_pullthrough/stats").await.json().await.unwrap()
}

/// A pullthrough in front of `hub` (the default, tags fresh for a minute) and `ghcr` (as
/// `ghcr.io`, tags fresh for 100 ms and never stale-served online: `max_stale` 0).
fn config(hub: &FakeHub, ghcr: &FakeHub, dir: &std::path::Path) -> pullthrough::Config {
    let mut config = TestProxy::config(&hub.url, dir);
    let mut upstream = ghcr.as_upstream("ghcr.io");
    upstream.tag_ttl = Some(Duration::from_millis(100));
    upstream.max_stale = Some(Duration::ZERO);
    config.upstreams = vec![upstream];
    config
}

#[tokio::test]
async fn offline_from_startup_asks_nothing_and_serves_what_is_cached() {
    let (hub, ghcr) = (FakeHub::start().await, FakeHub::start().await);
    let (app, tool) = (
        Image::single("app", DOCKER_MANIFEST, 1000),
        Image::single("tool", DOCKER_MANIFEST, 1000),
    );
    hub.push("library/app", "1", &app);
    hub.push(
        "library/app",
        "2",
        &Image::single("app2", DOCKER_MANIFEST, 10),
    );
    ghcr.push("acme/tool", "1", &tool);
    let dir = Arc::new(tempfile::tempdir().unwrap());

    // Warmed while online: two tags, their blobs; then stopped (its writes land first).
    let warm = TestProxy::start_config(config(&hub, &ghcr, dir.path()), Some(dir.clone())).await;
    for (prefix, image) in [("/v2/library/app", &app), ("/v2/ghcr.io/acme/tool", &tool)] {
        warm.get_ok(&format!("{prefix}/manifests/1")).await;
        for blob in &image.blobs {
            let digest = support::hub::sha256(blob);
            assert_eq!(
                warm.get_ok(&format!("{prefix}/blobs/{digest}")).await,
                *blob
            );
        }
    }
    support::settled(&warm).await;
    warm.stop().await;
    let before = asked(&[&hub, &ghcr]);

    // Offline from startup, with tag policies under which an online pullthrough would ask.
    let mut offline = config(&hub, &ghcr, dir.path());
    offline.offline = true;
    let proxy = TestProxy::start_config(offline, Some(dir.clone())).await;
    // ghcr.io's tag is past tag_ttl and max_stale (0) by now.
    tokio::time::sleep(Duration::from_millis(150)).await;

    let r = proxy.get("/v2/library/app/manifests/1").await;
    assert_eq!((r.status().as_u16(), cache(&r)), (200, "HIT".to_owned()));
    assert_eq!(r.bytes().await.unwrap(), app.bytes);
    let r = proxy.get("/v2/ghcr.io/acme/tool/manifests/1").await;
    assert_eq!((r.status().as_u16(), cache(&r)), (200, "STALE".to_owned()));
    assert_eq!(r.bytes().await.unwrap(), tool.bytes);
    let r = proxy.head("/v2/ghcr.io/acme/tool/manifests/1").await;
    assert_eq!((r.status().as_u16(), cache(&r)), (200, "STALE".to_owned()));
    let r = proxy
        .get(&format!("/v2/library/app/manifests/{}", app.digest))
        .await;
    assert_eq!((r.status().as_u16(), cache(&r)), (200, "HIT".to_owned()));
    for blob in &app.blobs {
        let digest = support::hub::sha256(blob);
        let path = format!("/v2/library/app/blobs/{digest}");
        assert_eq!(proxy.get_ok(&path).await, *blob);
        assert_eq!(proxy.head(&path).await.status(), 200);
    }

    // What is not cached: 503, naming it.
    let two = "/v2/library/app/manifests/2";
    offline_answer(proxy.get(two).await, "library/app:2").await;
    assert_eq!(proxy.head(two).await.status(), 503);
    let unknown = Image::single("unknown", DOCKER_MANIFEST, 10);
    offline_answer(
        proxy
            .get(&format!("/v2/library/app/manifests/{}", unknown.digest))
            .await,
        &format!("library/app@{}", unknown.digest),
    )
    .await;
    let blob = support::hub::sha256(&unknown.blobs[0]);
    offline_answer(
        proxy.get(&format!("/v2/library/app/blobs/{blob}")).await,
        &format!("blob library/app@{blob}"),
    )
    .await;
    let r = proxy.head(&format!("/v2/library/app/blobs/{blob}")).await;
    assert_eq!(r.status(), 503);
    offline_answer(
        proxy.get("/v2/library/app/tags/list").await,
        "the tags list of library/app",
    )
    .await;
    // A one-component name needs to know whether the upstream is Docker Hub (a ping).
    let r = proxy.get("/v2/app/manifests/1").await;
    assert_eq!(r.status(), 503);
    let body: serde_json::Value = r.json().await.unwrap();
    assert!(
        body["errors"][0]["message"]
            .as_str()
            .unwrap()
            .contains("library/<name>"),
        "{body}"
    );
    // The other upstream's misses alike.
    offline_answer(
        proxy.get("/v2/ghcr.io/acme/other/manifests/1").await,
        "acme/other:1",
    )
    .await;

    // Still ready, and it says so everywhere.
    assert_eq!(proxy.get("/readyz").await.status(), 200);
    let s = scrape(&proxy).await;
    assert_eq!(metric(&s, "pullthrough_offline", &[]), 1.0);
    assert!(
        metric(
            &s,
            "pullthrough_stale_served_total",
            &[("upstream", "ghcr.io"), ("cause", "offline")]
        ) >= 2.0
    );
    assert_eq!(stats(&proxy).await["offline"], true);
    let page = proxy.get("/").await.text().await.unwrap();
    assert!(page.contains(r#"id="offline""#), "{page}");
    assert_eq!(
        proxy
            .get("/_pullthrough/offline")
            .await
            .json::<serde_json::Value>()
            .await
            .unwrap(),
        serde_json::json!({ "offline": true })
    );

    // Nothing left for anything in the background to ask either.
    support::settled(&proxy).await;
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert_eq!(
        asked(&[&hub, &ghcr]),
        before,
        "an upstream request while offline"
    );

    // Back online: the expired tag waits for its revalidation (one HEAD), misses are fetched.
    let r = put_offline(&proxy, r#"{"offline": false}"#).await;
    assert_eq!(r.status(), 200);
    let heads = ghcr.count("manifest_head");
    let r = proxy.get("/v2/ghcr.io/acme/tool/manifests/1").await;
    assert_eq!(
        (r.status().as_u16(), cache(&r)),
        (200, "REVALIDATED".to_owned())
    );
    assert_eq!(ghcr.count("manifest_head"), heads + 1);
    let r = proxy.get(two).await;
    assert_eq!((r.status().as_u16(), cache(&r)), (200, "MISS".to_owned()));
    assert_eq!(
        metric(&scrape(&proxy).await, "pullthrough_offline", &[]),
        0.0
    );
    assert_eq!(stats(&proxy).await["offline"], false);
}

#[tokio::test]
async fn switched_offline_at_run_time_it_serves_stale_and_asks_nothing_until_switched_back() {
    let hub = FakeHub::start().await;
    let app = Image::single("app", DOCKER_MANIFEST, 1000);
    hub.push("library/app", "1", &app);
    let proxy = TestProxy::start_with(&hub, |c| {
        // Long enough for the polls after the revalidation to run within it on a loaded machine.
        c.tag_ttl = Duration::from_millis(1_500);
        c.tags_list_ttl = Duration::from_millis(100);
    })
    .await;
    let (tag, tags) = ("/v2/library/app/manifests/1", "/v2/library/app/tags/list");
    proxy.get_ok(tag).await;
    let tags_body = proxy.get_ok(tags).await;

    let r = put_offline(&proxy, r#"{"offline": true}"#).await;
    assert_eq!(r.status(), 200);
    assert_eq!(
        r.json::<serde_json::Value>().await.unwrap(),
        serde_json::json!({ "offline": true })
    );
    let before = asked(&[&hub]);
    tokio::time::sleep(Duration::from_millis(1_600)).await;
    for _ in 0..3 {
        let r = proxy.get(tag).await;
        assert_eq!((r.status().as_u16(), cache(&r)), (200, "STALE".to_owned()));
        let r = proxy.get(tags).await;
        assert_eq!((r.status().as_u16(), cache(&r)), (200, "STALE".to_owned()));
        assert_eq!(r.bytes().await.unwrap(), tags_body);
    }
    offline_answer(
        proxy.get("/v2/library/app/manifests/2").await,
        "library/app:2",
    )
    .await;
    // explain=pull says the same: the stale tag is not revalidated, the miss fails.
    let explain = async |reference: &str| {
        let url = format!("/_pullthrough/cache/library/app/manifests/{reference}?explain=pull");
        proxy
            .get(&url)
            .await
            .json::<serde_json::Value>()
            .await
            .unwrap()
    };
    let stale = explain("1").await;
    // (Its blobs were never pulled: those a pull would need.)
    let steps = stale["upstream_requests"].as_array().unwrap();
    assert!(!steps.is_empty(), "{stale}");
    assert!(steps.iter().all(|s| s["kind"] == "blob"), "{stale}");
    let miss = explain("2").await;
    assert!(
        miss["summary"].as_str().unwrap().contains("offline"),
        "{miss}"
    );
    support::settled(&proxy).await;
    assert_eq!(asked(&[&hub]), before, "an upstream request while offline");

    // Switched back: the stale tag is served at once and revalidated behind the answer.
    assert_eq!(
        put_offline(&proxy, r#"{"offline": false}"#).await.status(),
        200
    );
    let heads = hub.count("manifest_head");
    let r = proxy.get(tag).await;
    assert_eq!((r.status().as_u16(), cache(&r)), (200, "STALE".to_owned()));
    assert!(
        support::eventually(Duration::from_secs(5), async || hub.count("manifest_head")
            == heads + 1)
        .await
    );
    // The hub counts the HEAD when it arrives; the tag is fresh once its answer is taken in
    // (asked meanwhile, it is still STALE and joins the revalidation under way).
    let hit = support::eventually(Duration::from_secs(5), async || {
        let r = proxy.get(tag).await;
        (r.status().as_u16(), cache(&r)) == (200, "HIT".to_owned())
    })
    .await;
    assert!(hit, "the revalidated tag is a HIT");
    assert_eq!(hub.count("manifest_head"), heads + 1, "one revalidation");
    let r = proxy.get(tags).await;
    assert_eq!((r.status().as_u16(), cache(&r)), (200, "MISS".to_owned()));
}

#[tokio::test]
async fn the_offline_switch_takes_only_a_clear_body_and_the_admin_token_when_set() {
    let hub = FakeHub::start().await;
    let token = "an-admin-token-0123456789";
    let proxy = TestProxy::start_with(&hub, |c| {
        c.admin_token = Some(pullthrough::config::Secret(token.into()))
    })
    .await;
    let put = |body: &'static str, authorization: Option<&'static str>| {
        let mut request = proxy
            .client
            .put(format!("{}/_pullthrough/offline", proxy.url))
            .body(body);
        if let Some(a) = authorization {
            request = request.header("authorization", a);
        }
        request.send()
    };
    let bearer = "Bearer an-admin-token-0123456789";
    let r = put(r#"{"offline": true}"#, None).await.unwrap();
    assert_eq!(r.status(), 401);
    let r = put(
        r#"{"offline": true}"#,
        Some("Bearer wrong-token-0123456789"),
    )
    .await
    .unwrap();
    assert_eq!(r.status(), 401);
    for bad in [
        "",
        "offline",
        "{}",
        r#"{"offline": "yes"}"#,
        r#"{"offline": 1}"#,
        r#"{"offline": true, "upstream": "ghcr.io"}"#,
        r#"[true]"#,
    ] {
        let r = put(bad, Some(bearer)).await.unwrap();
        assert_eq!(r.status(), 400, "{bad:?}");
        let body: serde_json::Value = r.json().await.unwrap();
        let message = body["errors"][0]["message"].as_str().unwrap();
        assert!(message.contains(r#"{"offline": true}"#), "{message}");
    }
    let r = proxy
        .request(
            reqwest::Method::GET,
            "/_pullthrough/offline",
            &[("authorization", bearer)],
        )
        .await;
    assert_eq!(
        r.json::<serde_json::Value>().await.unwrap()["offline"],
        false,
        "a refused or bad switch changes nothing"
    );
    let pings = hub.count("ping");
    let r = put(r#"{"offline": true}"#, Some(bearer)).await.unwrap();
    assert_eq!(r.status(), 200);
    let r = proxy.get("/v2/library/app/manifests/1").await;
    assert_eq!(r.status(), 503);
    // Only the startup ping, made before the switch.
    assert_eq!(asked(&[&hub]), hub.count("ping"));
    assert!(pings <= 1);
    assert_eq!(hub.count("ping"), pings, "no ping after the switch");
}

#[tokio::test]
async fn a_blob_redirect_answered_after_the_switch_is_not_followed_to_the_cdn() {
    let hub = FakeHub::start().await;
    let app = Image::single("app", DOCKER_MANIFEST, 1000);
    hub.push("library/app", "1", &app);
    let proxy = TestProxy::start(&hub).await;
    // The ping and a token are known, so the blob GET is the next request sent.
    proxy.get_ok("/v2/library/app/manifests/1").await;
    // The registry answers only once the switch is made (or after 20 s, to fail, not hang).
    let gate = support::Gate::new();
    gate.open_after(Duration::from_secs(20));
    hub.fault(support::Fault::Hold(gate.clone()));
    let digest = support::hub::sha256(&app.blobs[0]);
    let url = format!("{}/v2/library/app/blobs/{digest}", proxy.url);
    let client = proxy.client.clone();
    let pull = tokio::spawn(async move { client.get(url).send().await.unwrap() });
    // The GET is at the registry, which answers with the CDN redirect after the switch.
    let sent = format!("GET /v2/library/app/blobs/{digest}");
    assert!(support::eventually(Duration::from_secs(5), async || hub.count(&sent) == 1).await);
    assert_eq!(
        put_offline(&proxy, r#"{"offline": true}"#).await.status(),
        200
    );
    gate.open();
    let r = pull.await.unwrap();
    assert_eq!(r.status(), 503);
    assert_eq!(hub.count("cdn_get"), 0, "the redirect was followed");
    assert_eq!(hub.count("blob_get"), 1);
    hub.clear_faults();
    // Online again, the blob is fetched as usual.
    put_offline(&proxy, r#"{"offline": false}"#).await;
    let r = proxy.get(&format!("/v2/library/app/blobs/{digest}")).await;
    assert_eq!(r.status(), 200);
    assert_eq!(r.bytes().await.unwrap(), app.blobs[0]);
    assert_eq!(hub.count("cdn_get"), 1);
}
