//! Attacks on several registries behind one pullthrough: client-chosen hosts (ns values, path
//! prefixes), private content shared across upstreams (stored, downloading, after a restart),
//! configurations that would make two upstreams one, and the default upstream's behaviour when
//! another has credentials.

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::too_many_lines,
    reason = "a test panics on what it did not expect, and may read as one long story"
)]

mod support;

use bytes::Bytes;
use pullthrough::config::{Config, Overrides, Secret};
use std::time::Duration;
use support::hub::pattern;
use support::{FakeHub, Fault, Image, TestProxy, error_code, eventually};

use support::DOCKER_MANIFEST;

fn hostport(url: &str) -> String {
    url.strip_prefix("http://").unwrap().to_owned()
}

fn load(toml: &str) -> Result<Config, String> {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("p.toml");
    std::fs::write(&file, toml).unwrap();
    Config::load(Some(&file), Vec::new(), &Overrides::default()).map_err(|e| e.to_string())
}

/// A host-like first path component that is no configured upstream: 404 naming it, nothing
/// asked upstream; Docker Hub's own name as a prefix means the default upstream.
#[tokio::test]
async fn an_unconfigured_host_prefix_is_404_and_docker_io_is_the_default() {
    let (hub, ghcr, proxy) = support::hub_and_ghcr().await;
    let alpine = Image::single("a", DOCKER_MANIFEST, 10);
    hub.push("library/alpine", "1", &alpine);
    for path in [
        "/v2/quay.io/org/app/manifests/1",
        "/v2/ghcr.io.evil/org/app/manifests/1",
    ] {
        let r = proxy.get(path).await;
        assert_eq!(r.status(), 404, "{path}");
        let body: serde_json::Value = r.json().await.unwrap();
        assert_eq!(body["errors"][0]["code"], "NAME_UNKNOWN");
    }
    assert_eq!(hub.count("manifest_get") + ghcr.count("manifest_get"), 0);
    assert_eq!(
        proxy
            .get_ok("/v2/docker.io/library/alpine/manifests/1")
            .await,
        alpine.bytes
    );
    assert_eq!(hub.count("GET /v2/library/alpine/manifests/1"), 1);
}

/// `ns` on `/v2/` itself is checked: an unconfigured registry is 404 there too.
#[tokio::test]
async fn ns_on_the_api_root_is_checked() {
    let hub = FakeHub::start().await;
    let proxy = TestProxy::start(&hub).await;
    let r = proxy.get("/v2/?ns=evil.example").await;
    assert_eq!(r.status(), 404);
    assert_eq!(error_code(r).await, "NAME_UNKNOWN");
    assert_eq!(hub.total(), 0, "nothing was asked upstream");
}

/// A host equal to the default upstream's host is refused; and downloads are told apart by
/// upstream identity, not name, so a private download of the default upstream is not joined for
/// another upstream without that upstream being asked.
#[tokio::test]
async fn a_private_download_is_not_joined_under_another_upstream() {
    let corp = FakeHub::start().await; // default, with credentials
    let other = FakeHub::start().await; // [[upstreams]] under the same host name, no credentials
    corp.add_user("bot", "pw");
    let layer = Bytes::from(pattern("secret-layer", 2 * 1024 * 1024));
    let digest = corp.push_blob("team/secret", layer.clone());
    corp.make_private("team/secret");
    let name = hostport(&corp.url);

    // Validation refuses it; started anyway (as code could), downloads still keep apart.
    let cfg = load(&format!(
        "upstream = \"{}\"\nupstream_username = \"bot\"\nupstream_password = \"pw\"\n[[upstreams]]\nhost = \"{name}\"\nurl = \"{}\"\n",
        corp.url, other.url
    ));
    assert!(
        cfg.is_err(),
        "a host equal to the default upstream's is refused"
    );

    let proxy = TestProxy::start_with(&corp, |c| {
        c.upstream_username = Some("bot".into());
        c.upstream_password = Some(Secret("pw".into()));
        c.upstreams = vec![other.as_upstream(&name)];
    })
    .await;
    corp.fault(Fault::SlowBlob(Duration::from_millis(60)));
    let first = {
        let client = proxy.client.clone();
        let url = format!("{}/v2/team/secret/blobs/{digest}", proxy.url);
        tokio::spawn(async move { client.get(url).send().await.unwrap().bytes().await.unwrap() })
    };
    // The second request comes while the first one's download is under way.
    let downloading =
        eventually(Duration::from_secs(10), async || corp.count("blob_get") > 0).await;
    assert!(downloading, "the first download did not start");
    let r = proxy
        .get(&format!("/v2/{name}/team/secret/blobs/{digest}"))
        .await;
    let status = r.status();
    let body = r.bytes().await.unwrap();
    let asked = other.count("blob_get") + other.count("blob_head");
    assert_eq!(first.await.unwrap(), layer);
    // The other upstream was asked (it has no such blob), and the private bytes were not served.
    assert!(asked > 0, "the other upstream was not asked");
    assert_eq!(status, 404, "{} bytes served", body.len());
}

/// `namespaces` (names of the default upstream) may not name an [[upstreams]] host, or `ns`
/// and the path prefix would pick different registries for the same name.
#[test]
fn namespaces_may_not_shadow_an_upstream_host() {
    let cfg = load(
        "namespaces = [\"docker.io\", \"ghcr.io\"]\n[[upstreams]]\nhost = \"ghcr.io\"\nurl = \"https://ghcr.io\"\n",
    );
    assert!(
        cfg.is_err(),
        "namespaces naming an upstream host are refused"
    );
}

/// Host names: lower-case DNS names with an optional plain port; not Docker Hub's under any port.
#[test]
fn host_validation() {
    for host in [
        "ghcr.io:+443",
        "ghcr.io:0443",
        "ghcr.io:",
        "a_1",
        "docker.io:443",
        "GHCR.IO",
        "ghcr.io/x",
        "[::1]:5000",
    ] {
        let r = load(&format!(
            "[[upstreams]]\nhost = \"{host}\"\nurl = \"https://x.example\"\n"
        ));
        assert!(r.is_err(), "{host} was accepted");
    }
    for host in ["a:1", "registry.example:5000", "ghcr.io"] {
        let r = load(&format!(
            "[[upstreams]]\nhost = \"{host}\"\nurl = \"https://x.example\"\n"
        ));
        assert!(r.is_ok(), "{host}: {r:?}");
    }
}

/// Paging a tags list reached by `ns` keeps the `ns`: the next page comes from the same registry.
#[tokio::test]
async fn a_tags_list_reached_by_ns_pages_with_ns() {
    let (hub, ghcr, proxy) = support::hub_and_ghcr().await;
    let img = Image::single("x", DOCKER_MANIFEST, 10);
    for t in ["1", "2", "3"] {
        ghcr.push("org/app", t, &img);
    }
    hub.push("org/app", "hub-only", &img);
    let r = proxy.get("/v2/org/app/tags/list?n=1&ns=ghcr.io").await;
    let link = r
        .headers()
        .get("link")
        .map(|l| l.to_str().unwrap().to_owned());
    let first: serde_json::Value = r.json().await.unwrap();
    assert_eq!(first["tags"], serde_json::json!(["1"]));
    let next = link
        .as_deref()
        .and_then(|l| l.strip_prefix('<'))
        .and_then(|l| l.split_once('>'))
        .map(|(t, _)| t.to_owned())
        .unwrap();
    let r = proxy.get(&next).await;
    assert_eq!(r.status(), 200, "{next}");
    let page2: serde_json::Value = r.json().await.unwrap();
    assert_eq!(
        page2["tags"],
        serde_json::json!(["2"]),
        "page 2 of ghcr's list"
    );
}

/// The cache API listing's `prefix` applies to `[host/]repository`: it can select an upstream.
#[tokio::test]
async fn the_listing_prefix_selects_an_upstream() {
    let (hub, ghcr, proxy) = support::hub_and_ghcr().await;
    let img = Image::single("x", DOCKER_MANIFEST, 10);
    hub.push("org/app", "1", &img);
    ghcr.push("org/app", "1", &img);
    proxy.get_ok("/v2/org/app/manifests/1").await;
    proxy.get_ok("/v2/ghcr.io/org/app/manifests/1").await;
    let a: serde_json::Value = proxy
        .get("/_pullthrough/cache?prefix=ghcr.io/")
        .await
        .json()
        .await
        .unwrap();
    let b: serde_json::Value = proxy
        .get("/_pullthrough/cache?prefix=org/")
        .await
        .json()
        .await
        .unwrap();
    assert_eq!(a["total"], 1);
    assert_eq!(a["entries"][0]["upstream"], "ghcr.io");
    assert_eq!(
        b["total"], 1,
        "org/ is the default upstream's repository only"
    );
}

/// After a restart with Docker Hub down: the status of a cached public blob's GET, and the
/// Docker Hub requests it cost.
async fn cached_blob_after_restart_with_hub_down(with_private_upstream: bool) -> (u16, u64) {
    let hub = FakeHub::start().await;
    let corp = FakeHub::start().await;
    corp.add_user("bot", "pw");
    let layer = Bytes::from(pattern("alpine-layer", 100_000));
    let digest = hub.push_blob("library/alpine", layer.clone());
    let dir = std::sync::Arc::new(tempfile::tempdir().unwrap());
    let mut config = TestProxy::config(&hub.url, dir.path());
    if with_private_upstream {
        let mut u = corp.as_upstream("registry.corp.example");
        u.username = Some("bot".into());
        u.password = Some(Secret("pw".into()));
        config.upstreams = vec![u];
    }
    let proxy = TestProxy::start_config(config.clone(), Some(dir.clone())).await;
    proxy
        .get_ok(&format!("/v2/library/alpine/blobs/{digest}"))
        .await;
    proxy.stop().await;
    let proxy = TestProxy::start_config(config, Some(dir.clone())).await;
    hub.fault(Fault::Status(503));
    let before = hub.total();
    let r = proxy
        .get(&format!("/v2/library/alpine/blobs/{digest}"))
        .await;
    let status = r.status().as_u16();
    assert_eq!(r.bytes().await.unwrap(), layer, "the cached bytes");
    (status, hub.total() - before)
}

/// Another upstream's credentials do not change the anonymous default: a cached public blob is
/// served offline after a restart, asking Docker Hub nothing.
#[tokio::test]
async fn another_upstreams_credentials_leave_the_default_offline_capable() {
    for with_credentials in [false, true] {
        let served = cached_blob_after_restart_with_hub_down(with_credentials).await;
        assert_eq!(
            served,
            (200, 0),
            "credentialed [[upstreams]]: {with_credentials}"
        );
    }
}

/// Cross-repository reuse of a blob Docker Hub served anonymously costs Docker Hub nothing,
/// whether or not another upstream has credentials.
#[tokio::test]
async fn cross_repo_reuse_of_a_public_blob_costs_no_request() {
    for private in [false, true] {
        let hub = FakeHub::start().await;
        let corp = FakeHub::start().await;
        let layer = Bytes::from(pattern("shared-layer", 10_000));
        let digest = hub.push_blob("library/a", layer.clone());
        hub.push_blob("library/b", layer.clone());
        let proxy = TestProxy::start_with(&hub, |c| {
            if private {
                let mut u = corp.as_upstream("registry.corp.example");
                u.username = Some("bot".into());
                u.password = Some(Secret("pw".into()));
                c.upstreams = vec![u];
            }
        })
        .await;
        proxy.get_ok(&format!("/v2/library/a/blobs/{digest}")).await;
        let before = hub.count("blob_head") + hub.count("blob_get");
        proxy.get_ok(&format!("/v2/library/b/blobs/{digest}")).await;
        let asked = hub.count("blob_head") + hub.count("blob_get") - before;
        assert_eq!(asked, 0, "credentialed [[upstreams]]={private}");
    }
}

/// `ns` spellings route case-insensitively and percent-decoded; anything not configured is 404
/// with nothing asked anywhere; a purge on one upstream leaves another's entry alone.
#[tokio::test]
async fn ns_variants_and_purge_isolation() {
    let (hub, ghcr, proxy) = support::hub_and_ghcr().await;
    let img = Image::single("x", DOCKER_MANIFEST, 10);
    hub.push("org/app", "1", &img);
    ghcr.push("org/app", "1", &img);
    for q in [
        "ns=GHCR.IO",
        "ns=ghcr%2Eio",
        "ns=quay.io&ns=ghcr.io",
        "ns=ghcr.io&ns=quay.io",
        "ns=ghcr.io.",
        "ns=ghcr.io:443",
        "ns=",
        "%6Es=ghcr.io",
    ] {
        let h = hub.total();
        let r = proxy.get(&format!("/v2/org/app/manifests/1?{q}")).await;
        let to_ghcr = ["ns=GHCR.IO", "ns=ghcr%2Eio", "ns=ghcr.io&ns=quay.io"].contains(&q);
        let to_hub = q == "%6Es=ghcr.io";
        let want = if to_ghcr || to_hub { 200 } else { 404 };
        assert_eq!(r.status(), want, "{q}");
        if !to_hub {
            assert_eq!(hub.total(), h, "{q} went to Docker Hub");
        }
    }
    for p in [
        "/v2/GHCR.IO/org/app/manifests/1",
        "/v2/ghcr.io:443/org/app/manifests/1",
        "/v2/ghcr.io.evil/org/app/manifests/1",
    ] {
        // (Learning whether the default upstream is Docker Hub may ping it: not a request for
        // the client's host, and not in `total`.)
        let asked = |hub: &FakeHub| hub.total();
        let (h, g) = (asked(&hub), asked(&ghcr));
        let r = proxy.get(p).await;
        assert!(r.status().is_client_error(), "{p}: {}", r.status());
        assert_eq!(
            (asked(&hub), asked(&ghcr)),
            (h, g),
            "{p} was asked upstream"
        );
    }
    proxy.get_ok("/v2/org/app/manifests/1").await;
    let r = proxy
        .request(reqwest::Method::DELETE, "/_pullthrough/cache/org/app", &[])
        .await;
    assert_eq!(r.status(), 200);
    let r = proxy.get("/v2/ghcr.io/org/app/manifests/1").await;
    assert_eq!(
        r.headers()["x-cache"],
        "HIT",
        "ghcr's entry survived the default's purge"
    );
    // And the default's entry is gone: fetched again.
    let before = hub.count("manifest_get");
    let r = proxy.get("/v2/org/app/manifests/1").await;
    assert_eq!(r.headers()["x-cache"], "MISS");
    assert_eq!(r.bytes().await.unwrap(), img.bytes);
    assert_eq!(hub.count("manifest_get"), before + 1);
}
