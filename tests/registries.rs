//! Several registries behind one pullthrough: `?ns=<host>` (containerd) and a `/v2/<host>/`
//! path prefix reach the configured upstream and share its cache; an unknown host is 404 with
//! no outbound request; one upstream's credentials never reach another; content fetched with
//! credentials is not served for another registry's repository; an upstream behind a system
//! proxy (`HTTP_PROXY`) is reached through it.

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::too_many_lines,
    reason = "a test panics on what it did not expect, and may read as one long story"
)]

mod support;

use pullthrough::config::Secret;
use std::time::Duration;
use support::{FakeHub, Image, TestProxy, error_code};

use support::DOCKER_MANIFEST;

#[tokio::test]
async fn ns_and_path_prefix_pick_the_upstream_and_share_its_cache() {
    let (hub, ghcr, proxy) = support::hub_and_ghcr().await;
    let default_image = Image::single("from-hub", DOCKER_MANIFEST, 100);
    let ghcr_image = Image::single("from-ghcr", DOCKER_MANIFEST, 100);
    hub.push("org/app", "1", &default_image);
    ghcr.push("org/app", "1", &ghcr_image);
    ghcr.push("alpine", "1", &ghcr_image);

    // Default, by no ns or ns=docker.io.
    assert_eq!(
        proxy.get_ok("/v2/org/app/manifests/1").await,
        default_image.bytes
    );
    assert_eq!(
        proxy.get_ok("/v2/org/app/manifests/1?ns=docker.io").await,
        default_image.bytes
    );
    // ghcr.io by ns, then by path prefix: one upstream GET, the second a HIT of the same entry.
    assert_eq!(
        proxy.get_ok("/v2/org/app/manifests/1?ns=ghcr.io").await,
        ghcr_image.bytes
    );
    let r = proxy.get("/v2/ghcr.io/org/app/manifests/1").await;
    assert_eq!(r.headers()["x-cache"], "HIT");
    assert_eq!(r.bytes().await.unwrap(), ghcr_image.bytes);
    assert_eq!(ghcr.count("manifest_get"), 1);
    assert_eq!(hub.count("manifest_get"), 1);
    // Blobs and tags lists the same way; a tags list reached by prefix pages by prefix.
    let blob = support::hub::sha256(&ghcr_image.blobs[1]);
    assert_eq!(
        proxy
            .get_ok(&format!("/v2/ghcr.io/org/app/blobs/{blob}"))
            .await,
        ghcr_image.blobs[1]
    );
    let r = proxy
        .get(&format!("/v2/org/app/blobs/{blob}?ns=ghcr.io"))
        .await;
    assert_eq!(r.headers()["x-cache"], "HIT");
    assert_eq!(r.bytes().await.unwrap(), ghcr_image.blobs[1]);
    let tags: serde_json::Value = proxy
        .get("/v2/ghcr.io/org/app/tags/list")
        .await
        .json()
        .await
        .unwrap();
    assert_eq!(tags["tags"], serde_json::json!(["1"]));

    // library/ is Docker Hub's alone.
    assert_eq!(
        proxy.get_ok("/v2/ghcr.io/alpine/manifests/1").await,
        ghcr_image.bytes
    );
    assert_eq!(ghcr.count("GET /v2/alpine/manifests/1"), 1);

    // An unknown registry: 404 naming it, and nothing asked anywhere.
    let (before_hub, before_ghcr) = (hub.total(), ghcr.total());
    let r = proxy.get("/v2/org/app/manifests/1?ns=quay.io").await;
    assert_eq!(r.status(), 404);
    let body: serde_json::Value = r.json().await.unwrap();
    assert_eq!(body["errors"][0]["code"], "NAME_UNKNOWN");
    assert!(
        body["errors"][0]["message"]
            .as_str()
            .unwrap()
            .contains("quay.io")
    );
    assert_eq!((hub.total(), ghcr.total()), (before_hub, before_ghcr));

    // The cache API lists every upstream's tags and addresses them by host prefix.
    let listing: serde_json::Value = proxy.get("/_pullthrough/cache").await.json().await.unwrap();
    let upstreams: Vec<&str> = listing["entries"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["upstream"].as_str().unwrap())
        .collect();
    assert!(upstreams.contains(&"ghcr.io"), "{listing}");
    let entry: serde_json::Value = proxy
        .get("/_pullthrough/cache/ghcr.io/org/app/manifests/1")
        .await
        .json()
        .await
        .unwrap();
    assert_eq!(entry["digest"], ghcr_image.digest.as_str());
    // A repository of that upstream, by host prefix: its tags, and not `org/app-x`'s.
    ghcr.push("org/app-x", "9", &ghcr_image);
    proxy.get_ok("/v2/ghcr.io/org/app-x/manifests/9").await;
    let repository: serde_json::Value = proxy
        .get("/_pullthrough/cache/ghcr.io/org/app")
        .await
        .json()
        .await
        .unwrap();
    let tags: Vec<(&str, &str)> = repository["tags"]
        .as_array()
        .unwrap()
        .iter()
        .map(|t| (t["tag"].as_str().unwrap(), t["digest"].as_str().unwrap()))
        .collect();
    assert_eq!(tags, [("1", ghcr_image.digest.as_str())], "{repository}");

    // The cache API takes `?ns=<host>` as the registry API does.
    let by_ns = |path: &'static str| {
        let (client, url) = (proxy.client.clone(), format!("{}{path}", proxy.url));
        async move {
            let r = client.get(url).send().await.unwrap();
            (
                r.status().as_u16(),
                r.json::<serde_json::Value>().await.unwrap(),
            )
        }
    };
    let (status, entry) = by_ns("/_pullthrough/cache/org/app/manifests/1?ns=ghcr.io").await;
    assert_eq!(status, 200);
    assert_eq!(entry["digest"], ghcr_image.digest.as_str());
    let (_, entry) = by_ns("/_pullthrough/cache/org/app/manifests/1?ns=docker.io").await;
    assert_eq!(entry["digest"], default_image.digest.as_str());
    let (_, listing) = by_ns("/_pullthrough/cache?ns=ghcr.io").await;
    let entries = listing["entries"].as_array().unwrap();
    assert!(
        !entries.is_empty() && entries.iter().all(|e| e["upstream"] == "ghcr.io"),
        "{listing}"
    );
    let (status, body) = by_ns("/_pullthrough/cache?ns=quay.io").await;
    assert_eq!(
        (status, &body["errors"][0]["code"]),
        (404, &serde_json::json!("NAME_UNKNOWN"))
    );
}

#[tokio::test]
async fn credentials_stay_with_their_upstream_and_private_blobs_stay_private() {
    let hub = FakeHub::start().await;
    let corp = FakeHub::start().await;
    corp.add_user("bot", "corp-s3cret");
    let private = Image::single("corp-private", DOCKER_MANIFEST, 50_000);
    corp.push("team/secret", "1", &private);
    corp.make_private("team/secret");
    // The default upstream has a public repository without that blob.
    let public = Image::single("public", DOCKER_MANIFEST, 100);
    hub.push("public/app", "1", &public);
    let proxy = TestProxy::start_with(&hub, |c| {
        let mut u = corp.as_upstream("registry.corp.example:5000");
        u.username = Some("bot".into());
        u.password = Some(Secret("corp-s3cret".into()));
        c.upstreams = vec![u];
    })
    .await;
    let prefix = "/v2/registry.corp.example:5000/team/secret";
    assert_eq!(
        proxy.get_ok(&format!("{prefix}/manifests/1")).await,
        private.bytes
    );
    let blob = support::hub::sha256(&private.blobs[1]);
    assert_eq!(
        proxy.get_ok(&format!("{prefix}/blobs/{blob}")).await,
        private.blobs[1]
    );
    assert!(corp.count("token_with_credentials") > 0);
    assert_eq!(
        proxy.get_ok("/v2/public/app/manifests/1").await,
        public.bytes
    );
    assert_eq!(
        hub.count("token_with_credentials"),
        0,
        "corp's password never went to Docker Hub"
    );

    // The private blob asked for under the default upstream's public repository: upstream is
    // asked (and says no), the stored bytes are not served.
    let heads = hub.count("blob_head") + hub.count("blob_get");
    let r = proxy.get(&format!("/v2/public/app/blobs/{blob}")).await;
    assert_eq!(r.status(), 404);
    assert_eq!(error_code(r).await, "BLOB_UNKNOWN");
    assert!(
        hub.count("blob_head") + hub.count("blob_get") > heads,
        "upstream was asked"
    );
}

#[tokio::test]
async fn stats_metrics_and_the_status_page_count_each_upstream_apart() {
    let (hub, ghcr, proxy) = support::hub_and_ghcr().await;
    let image = Image::single("counted-per-upstream", DOCKER_MANIFEST, 100);
    hub.push("org/app", "1", &image);
    ghcr.push("org/app", "1", &image);
    for _ in 0..2 {
        proxy.get_ok("/v2/org/app/manifests/1").await;
    }
    for path in [
        "/v2/org/app/manifests/1?ns=ghcr.io",
        "/v2/ghcr.io/org/app/manifests/1",
        "/v2/ghcr.io/org/app/manifests/1",
    ] {
        proxy.get_ok(path).await;
    }
    assert_eq!(
        proxy.get("/v2/ghcr.io/org/app/manifests/2").await.status(),
        404
    );

    let stats: serde_json::Value = proxy.get("/_pullthrough/stats").await.json().await.unwrap();
    let upstreams = stats["upstreams"].as_array().unwrap();
    assert_eq!(upstreams.len(), 2, "{stats}");
    let (default, other) = (&upstreams[0], &upstreams[1]);
    assert_eq!(default["default"], true);
    assert_eq!(other["host"], "ghcr.io");
    assert_eq!(other["url"], format!("{}/", ghcr.url));
    let manifest = |u: &serde_json::Value, outcome: &str| {
        u["counters"]["requests"]["manifest"][outcome].clone()
    };
    assert_eq!(
        (manifest(default, "miss"), manifest(default, "hit")),
        (1.into(), 1.into())
    );
    assert_eq!(
        (manifest(other, "miss"), manifest(other, "hit")),
        (1.into(), 2.into())
    );
    assert_eq!(default["counters"]["pulls_saved"], 1);
    assert_eq!(other["counters"]["pulls_saved"], 2);
    assert_eq!(
        other["counters"]["upstream_requests"]["manifest_get"]["200"],
        1
    );
    assert_eq!(
        other["counters"]["upstream_requests"]["manifest_get"]["404"],
        1
    );
    assert!(default["counters"]["upstream_requests"]["manifest_get"]["404"].is_null());
    assert_eq!(default["manifest_cache"]["tags"], 1);
    assert_eq!(other["manifest_cache"]["tags"], 1);
    assert_eq!(other["rate_limit"]["limit"], 100);
    // The totals are the sums.
    assert_eq!(stats["counters"]["pulls_saved"], 3);
    assert_eq!(stats["counters"]["requests"]["manifest"]["hit"], 3);
    assert_eq!(stats["manifest_cache"]["tags"], 2);

    let scrape = support::scrape(&proxy).await;
    let value = |name: &str, labels: &[(&str, &str)]| support::metric(&scrape, name, labels);
    let default_host = default["host"].as_str().unwrap();
    let hits = |host| {
        value(
            "pullthrough_requests_total",
            &[("upstream", host), ("kind", "manifest"), ("cache", "hit")],
        )
    };
    assert_eq!((hits(default_host), hits("ghcr.io")), (1.0, 2.0));
    assert_eq!(
        value(
            "pullthrough_requests_total",
            &[("upstream", "ghcr.io"), ("status", "404")]
        ),
        1.0
    );
    assert_eq!(
        value(
            "pullthrough_upstream_requests_total",
            &[("upstream", "ghcr.io"), ("kind", "manifest_get")]
        ),
        2.0
    );
    assert_eq!(
        value("pullthrough_pulls_saved_total", &[("upstream", "ghcr.io")]),
        2.0
    );
    assert_eq!(
        value("pullthrough_tags", &[("upstream", default_host)]),
        1.0
    );
    assert_eq!(
        value(
            "pullthrough_ratelimit_remaining",
            &[("upstream", "ghcr.io")]
        ),
        99.0
    );

    let page = proxy.get("/").await.text().await.unwrap();
    let table = page.split("id=\"upstreams\"").nth(1).unwrap();
    assert!(table.contains("<td>ghcr.io</td>"), "{table}");
    assert!(table.contains(" (default)"), "{table}");
}

/// A registry that is not Docker Hub (its ping needs no token) and counts what it is asked.
async fn plain_registry() -> (String, std::sync::Arc<std::sync::atomic::AtomicUsize>) {
    use std::sync::atomic::{AtomicUsize, Ordering};
    let asked = std::sync::Arc::new(AtomicUsize::new(0));
    let counter = std::sync::Arc::clone(&asked);
    let app = axum::Router::new().fallback(move |uri: axum::http::Uri| {
        counter.fetch_add(1, Ordering::SeqCst);
        async move {
            if uri.path() == "/v2/" {
                (axum::http::StatusCode::OK, "{}")
            } else {
                (axum::http::StatusCode::NOT_FOUND, "{}")
            }
        }
    });
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
    (url, asked)
}

#[tokio::test]
async fn a_host_prefix_not_configured_is_never_asked_of_any_upstream() {
    let (url, asked) = plain_registry().await;
    let proxy = TestProxy::start_with_upstream(&url).await;
    // The one `/v2/` ping each upstream costs is asked at startup; nothing after it is asked
    // for a host that is not configured.
    let pinged = support::eventually(Duration::from_secs(10), async || {
        asked.load(std::sync::atomic::Ordering::SeqCst) == 1
    })
    .await;
    assert!(pinged, "the startup ping");
    let default_host = url.trim_start_matches("http://").to_owned();
    for (path, host) in [
        ("/v2/ghcr.io/team/app/manifests/1", "ghcr.io"),
        (
            "/v2/registry.example:5000/team/app/blobs/sha256:0000000000000000000000000000000000000000000000000000000000000000",
            "registry.example:5000",
        ),
        ("/v2/localhost/team/app/tags/list", "localhost"),
    ] {
        let r = proxy.get(path).await;
        assert_eq!(r.status(), 404, "{path}");
        let body: serde_json::Value = r.json().await.unwrap();
        assert_eq!(body["errors"][0]["code"], "NAME_UNKNOWN", "{path}");
        assert!(
            body["errors"][0]["message"]
                .as_str()
                .unwrap()
                .contains(host),
            "{body}"
        );
    }
    assert_eq!(
        asked.load(std::sync::atomic::Ordering::SeqCst),
        1,
        "no outbound request after the startup ping"
    );
    // The default upstream's own host still means it.
    let r = proxy
        .get(&format!("/v2/{default_host}/team/app/manifests/1"))
        .await;
    assert_eq!(r.status(), 404);
    assert_eq!(error_code(r).await, "MANIFEST_UNKNOWN");
    assert!(asked.load(std::sync::atomic::Ordering::SeqCst) > 1);
}

#[tokio::test]
async fn words_for_a_registry_that_is_not_docker_hub() {
    let (url, _asked) = plain_registry().await;
    let proxy = TestProxy::start_with_upstream(&url).await;
    // Learn what the upstream is, as the first pull does.
    let _ = proxy.get("/v2/team/app/manifests/1").await;
    let page = proxy.get("/").await.text().await.unwrap();
    assert!(
        page.contains("<b id=\"budget\">none reported by this registry</b>"),
        "{page}"
    );
    let explain: serde_json::Value = proxy
        .get("/_pullthrough/cache/team/app/manifests/1?explain=pull")
        .await
        .json()
        .await
        .unwrap();
    let summary = explain["summary"].as_str().unwrap();
    assert!(
        summary.contains("manifest GET") && !summary.contains("Docker Hub"),
        "{summary}"
    );
}

/// A system proxy that applies to the upstream carries every request to it, manifests
/// included (which otherwise go out on pullthrough's own lean client), and `NO_PROXY` is
/// honoured: here the upstream's name points at a closed port, so only the proxy (the
/// emulated hub, which answers absolute-form requests as any HTTP server must) can answer
/// for it, while the token realm, on `127.0.0.1`, is reached directly.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_upstream_behind_a_system_proxy_is_reached_through_it() {
    let hub = FakeHub::start().await;
    let image = Image::single("proxied", DOCKER_MANIFEST, 300);
    hub.push("library/proxied", "1", &image);
    let closed = support::free_port();
    let upstream = format!("http://localhost:{closed}");
    let start = |proxy: Option<&str>, no_proxy: &str| {
        let mut binary = support::binary::Pullthrough::new()
            .upstream(&upstream)
            .env("NO_PROXY", no_proxy);
        for var in [
            "HTTP_PROXY",
            "HTTPS_PROXY",
            "ALL_PROXY",
            "http_proxy",
            "https_proxy",
            "all_proxy",
        ] {
            binary = binary.env(var, "");
        }
        if let Some(proxy) = proxy {
            binary = binary.env("HTTP_PROXY", proxy);
        }
        binary.start()
    };
    let client = reqwest::Client::builder().no_proxy().build().unwrap();
    let manifest = async |base: &str| {
        client
            .get(format!("{base}/v2/library/proxied/manifests/1"))
            .header("accept", DOCKER_MANIFEST)
            .send()
            .await
            .unwrap()
    };

    let says_proxied = |lines: Vec<String>| {
        lines
            .iter()
            .any(|l| l.contains("upstream requests go through the system proxy"))
    };
    let proxied = start(Some(&hub.url), "127.0.0.1").await;
    assert!(
        says_proxied(proxied.lines()),
        "startup says the proxy is used: {:?}",
        proxied.lines()
    );
    let answer = manifest(&proxied.url).await;
    assert_eq!(answer.status(), 200);
    assert_eq!(
        answer.headers()["docker-content-digest"],
        image.digest.as_str()
    );
    assert_eq!(answer.bytes().await.unwrap(), image.bytes);
    assert_eq!(hub.count("manifest_get"), 1, "one GET, through the proxy");
    let blob = client
        .get(format!(
            "{}/v2/library/proxied/blobs/{}",
            proxied.url,
            support::hub::sha256(&image.blobs[0])
        ))
        .send()
        .await
        .unwrap();
    assert_eq!(blob.status(), 200);
    assert_eq!(blob.bytes().await.unwrap(), image.blobs[0]);

    // Without the proxy, or with NO_PROXY naming the upstream's host, the same upstream name
    // is a closed port: nothing is served, and nothing reaches the proxy.
    for (proxy, no_proxy) in [
        (None, "127.0.0.1"),
        (Some(hub.url.as_str()), "127.0.0.1,localhost"),
    ] {
        let direct = start(proxy, no_proxy).await;
        assert!(!says_proxied(direct.lines()), "{proxy:?} {no_proxy}");
        let answer = manifest(&direct.url).await;
        assert!(answer.status().is_server_error(), "{}", answer.status());
        assert_eq!(hub.count("manifest_get"), 1);
    }
}
