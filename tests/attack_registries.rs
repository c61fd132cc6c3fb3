//! Attacks on several registries behind one pullthrough: client-chosen hosts (ns values, path
//! prefixes), private content shared across upstreams (stored, downloading, after a restart),
//! configurations that would make two upstreams one, and the default upstream's behaviour when
//! another has credentials.

mod support;

use bytes::Bytes;
use pullthrough::config::{Config, Overrides, Secret, UpstreamConfig};
use std::time::Duration;
use support::hub::pattern;
use support::{FakeHub, Fault, Image, TestProxy};

const DOCKER_MANIFEST: &str = "application/vnd.docker.distribution.manifest.v2+json";

fn upstream(host: &str, hub: &FakeHub) -> UpstreamConfig {
    UpstreamConfig::new(host, hub.url.parse().unwrap())
}

fn hostport(url: &str) -> String {
    url.strip_prefix("http://").unwrap().to_owned()
}

fn load(toml: &str) -> Result<Config, String> {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("p.toml");
    std::fs::write(&file, toml).unwrap();
    Config::load(Some(&file), Vec::new(), &Overrides::default()).map_err(|e| e.to_string())
}

/// A path prefix naming a registry that is not configured is not refused: it is sent to the
/// default upstream as a repository name (an outbound request), and `docker.io/` as a prefix is
/// not recognised either.
/// A host-like first path component that is no configured upstream: 404 naming it, nothing
/// asked upstream; Docker Hub's own name as a prefix means the default upstream.
#[tokio::test]
async fn an_unconfigured_host_prefix_is_404_and_docker_io_is_the_default() {
    let hub = FakeHub::start().await;
    let ghcr = FakeHub::start().await;
    let alpine = Image::single("a", DOCKER_MANIFEST, 10);
    hub.push("library/alpine", "1", &alpine);
    let proxy =
        TestProxy::start_with(&hub, |c| c.upstreams = vec![upstream("ghcr.io", &ghcr)]).await;
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

/// `ns` on `/v2/` itself is not checked.
#[tokio::test]
async fn ns_on_api_root_is_not_checked() {
    let hub = FakeHub::start().await;
    let proxy = TestProxy::start(&hub).await;
    let r = proxy.get("/v2/?ns=evil.example").await;
    eprintln!("/v2/?ns=evil.example -> {}", r.status());
    assert_eq!(r.status(), 404);
}

/// A host equal to the default upstream's host is accepted; `ns=` and the path prefix then pick
/// different upstreams, and their downloads share one origin, so a private download of the
/// default upstream is joined for the other without that upstream ever being asked.
#[tokio::test]
async fn host_equal_to_default_host_shares_download_origin() {
    let corp = FakeHub::start().await; // default, with credentials
    let other = FakeHub::start().await; // [[upstreams]] under the same host name, no credentials
    corp.add_user("bot", "pw");
    let layer = Bytes::from(pattern("secret-layer", 2 * 1024 * 1024));
    let digest = corp.push_blob("team/secret", layer.clone());
    corp.make_private("team/secret");
    let name = hostport(&corp.url);

    // Validation accepts it.
    let cfg = load(&format!(
        "upstream = \"{}\"\nupstream_username = \"bot\"\nupstream_password = \"pw\"\n[[upstreams]]\nhost = \"{name}\"\nurl = \"{}\"\n",
        corp.url, other.url
    ));
    eprintln!(
        "config with host == default host: {:?}",
        cfg.as_ref().map(|_| "accepted")
    );

    let proxy = TestProxy::start_with(&corp, |c| {
        c.upstream_username = Some("bot".into());
        c.upstream_password = Some(Secret("pw".into()));
        c.upstreams = vec![upstream(&name, &other)];
    })
    .await;
    corp.fault(Fault::SlowBlob(Duration::from_millis(60)));
    let first = {
        let client = proxy.client.clone();
        let url = format!("{}/v2/team/secret/blobs/{digest}", proxy.url);
        tokio::spawn(async move { client.get(url).send().await.unwrap().bytes().await.unwrap() })
    };
    tokio::time::sleep(Duration::from_millis(400)).await;
    let r = proxy
        .get(&format!("/v2/{name}/team/secret/blobs/{digest}"))
        .await;
    let status = r.status();
    let body = r.bytes().await.unwrap();
    let asked = other.count("blob_get") + other.count("blob_head");
    eprintln!(
        "via prefix (other upstream): {status}, {} bytes, equal={}, other upstream asked {asked} times",
        body.len(),
        body == layer
    );
    assert_eq!(first.await.unwrap(), layer);
    assert!(
        !(status == 200 && body == layer && asked == 0),
        "private bytes served under another upstream without it being asked"
    );
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

/// Paging a tags list reached by `ns` loses the `ns`: the next page goes to the default upstream.
#[tokio::test]
async fn tags_link_under_ns_drops_ns() {
    let hub = FakeHub::start().await;
    let ghcr = FakeHub::start().await;
    let img = Image::single("x", DOCKER_MANIFEST, 10);
    for t in ["1", "2", "3"] {
        ghcr.push("org/app", t, &img);
    }
    hub.push("org/app", "hub-only", &img);
    let proxy =
        TestProxy::start_with(&hub, |c| c.upstreams = vec![upstream("ghcr.io", &ghcr)]).await;
    let r = proxy.get("/v2/org/app/tags/list?n=1&ns=ghcr.io").await;
    let link = r
        .headers()
        .get("link")
        .map(|l| l.to_str().unwrap().to_owned());
    eprintln!("link: {link:?}; body {:?}", r.text().await);
    let next = link
        .as_deref()
        .and_then(|l| l.strip_prefix('<'))
        .and_then(|l| l.split_once('>'))
        .map(|(t, _)| t.to_owned())
        .unwrap();
    let page2 = proxy.get(&next).await.text().await.unwrap();
    eprintln!("following it: {page2}");
    assert!(
        !page2.contains("hub-only"),
        "page 2 came from another registry"
    );
}

/// The cache API listing's `prefix` cannot select an upstream.
#[tokio::test]
async fn listing_prefix_ignores_upstream() {
    let hub = FakeHub::start().await;
    let ghcr = FakeHub::start().await;
    let img = Image::single("x", DOCKER_MANIFEST, 10);
    hub.push("org/app", "1", &img);
    ghcr.push("org/app", "1", &img);
    let proxy =
        TestProxy::start_with(&hub, |c| c.upstreams = vec![upstream("ghcr.io", &ghcr)]).await;
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
    eprintln!(
        "prefix=ghcr.io/ total {}; prefix=org/ total {}",
        a["total"], b["total"]
    );
    assert_eq!(a["total"], 1);
}

/// A credential on another upstream makes the default (anonymous Docker Hub) upstream ask
/// upstream before serving any stored blob whose grant is not in memory: after a restart, a
/// fully cached public image cannot be pulled while Docker Hub is down.
async fn cached_blob_after_restart_with_hub_down(with_private_upstream: bool) -> (u16, u64) {
    let hub = FakeHub::start().await;
    let corp = FakeHub::start().await;
    corp.add_user("bot", "pw");
    let layer = Bytes::from(pattern("alpine-layer", 100_000));
    let digest = hub.push_blob("library/alpine", layer.clone());
    let dir = std::sync::Arc::new(tempfile::tempdir().unwrap());
    let mut config = TestProxy::config(&hub.url, dir.path());
    if with_private_upstream {
        let mut u = upstream("registry.corp.example", &corp);
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
    let before = hub.count("blob_head");
    let r = proxy
        .get(&format!("/v2/library/alpine/blobs/{digest}"))
        .await;
    (r.status().as_u16(), hub.count("blob_head") - before)
}

#[tokio::test]
async fn default_upstream_changes_when_another_has_credentials() {
    let alone = cached_blob_after_restart_with_hub_down(false).await;
    let with = cached_blob_after_restart_with_hub_down(true).await;
    eprintln!(
        "hub down, cached blob after restart: default alone {alone:?}; with a credentialed [[upstreams]] {with:?}"
    );
    assert_eq!(alone, with);
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
                let mut u = upstream("registry.corp.example", &corp);
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
    let hub = FakeHub::start().await;
    let ghcr = FakeHub::start().await;
    let img = Image::single("x", DOCKER_MANIFEST, 10);
    hub.push("org/app", "1", &img);
    ghcr.push("org/app", "1", &img);
    let proxy =
        TestProxy::start_with(&hub, |c| c.upstreams = vec![upstream("ghcr.io", &ghcr)]).await;
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
        // the client's host.)
        let asked = |hub: &FakeHub| hub.total() - hub.count("ping");
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
}
