//! Manifest caching against the emulated Docker Hub: exact bytes, upstream request counts,
//! tag expiry and revalidation, concurrency, Accept negotiation.

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::too_many_lines,
    reason = "a test panics on what it did not expect, and may read as one long story"
)]

mod support;

use std::time::Duration;
use support::{FULL_ACCEPT, FakeHub, Image, TestProxy, error_code, eventually};

const OCI_INDEX: &str = "application/vnd.oci.image.index.v1+json";
const OCI_MANIFEST: &str = "application/vnd.oci.image.manifest.v1+json";
const DOCKER_LIST: &str = "application/vnd.docker.distribution.manifest.list.v2+json";
use support::DOCKER_MANIFEST;

fn multi_arch(seed: &str, index_type: &str, child_type: &str) -> Image {
    Image::index(
        index_type,
        vec![
            (
                "amd64",
                Image::single(&format!("{seed}-amd64"), child_type, 100),
            ),
            (
                "arm64",
                Image::single(&format!("{seed}-arm64"), child_type, 100),
            ),
        ],
    )
}

async fn get_accept(proxy: &TestProxy, path: &str, accept: &str) -> reqwest::Response {
    proxy
        .request(reqwest::Method::GET, path, &[("accept", accept)])
        .await
}

#[tokio::test]
async fn serves_exact_bytes_and_caches_them() {
    let hub = FakeHub::start().await;
    let image = multi_arch("alpine", OCI_INDEX, OCI_MANIFEST);
    assert!(
        std::str::from_utf8(&image.bytes).unwrap().contains("\\/"),
        "fixture has escaped slashes"
    );
    hub.push("library/alpine", "3.20", &image);
    let proxy = TestProxy::start(&hub).await;

    let first = get_accept(&proxy, "/v2/library/alpine/manifests/3.20", FULL_ACCEPT).await;
    assert_eq!(first.status(), 200);
    assert_eq!(first.headers()["x-cache"], "MISS");
    assert_eq!(first.headers()["content-type"], OCI_INDEX);
    assert_eq!(
        first.headers()["docker-content-digest"],
        image.digest.as_str()
    );
    assert_eq!(
        first.headers()["etag"],
        format!("\"{}\"", image.digest).as_str()
    );
    assert_eq!(
        first.headers()["content-length"],
        image.bytes.len().to_string().as_str()
    );
    assert_eq!(
        first.headers()["docker-distribution-api-version"],
        "registry/2.0"
    );
    assert_eq!(first.bytes().await.unwrap(), image.bytes);
    let upstream_after_first = hub.total();

    let second = get_accept(&proxy, "/v2/library/alpine/manifests/3.20", FULL_ACCEPT).await;
    assert_eq!(second.headers()["x-cache"], "HIT");
    assert_eq!(second.bytes().await.unwrap(), image.bytes);
    let head = proxy.head("/v2/library/alpine/manifests/3.20").await;
    assert_describes(&head, &image);
    let by_digest = proxy
        .get(&format!("/v2/library/alpine/manifests/{}", image.digest))
        .await;
    assert_eq!(by_digest.headers()["x-cache"], "HIT");
    assert_eq!(by_digest.bytes().await.unwrap(), image.bytes);

    assert_eq!(
        hub.total(),
        upstream_after_first,
        "cache hits made no upstream request"
    );
    assert_eq!(hub.count("manifest_get"), 1);
}

#[tokio::test]
async fn one_component_names_mean_library() {
    let hub = FakeHub::start().await;
    let image = Image::single("busybox", DOCKER_MANIFEST, 10);
    hub.push("library/busybox", "latest", &image);
    let proxy = TestProxy::start_with(&hub, |c| c.namespaces = vec!["docker.io".into()]).await;
    // The emulator's challenge names Docker Hub's token service, so it is Docker Hub.
    let short = proxy.get("/v2/busybox/manifests/latest").await;
    assert_eq!(short.status(), 200);
    assert_eq!(short.bytes().await.unwrap(), image.bytes);
    let full = proxy
        .get("/v2/library/busybox/manifests/latest?ns=docker.io")
        .await;
    assert_eq!(full.headers()["x-cache"], "HIT");
    // containerd asking for another registry's content is sent on to its next host.
    let foreign = proxy
        .get("/v2/library/busybox/manifests/latest?ns=ghcr.io")
        .await;
    assert_eq!(foreign.status(), 404);
    assert_eq!(hub.count("manifest_get"), 1);
}

#[tokio::test]
async fn etag_gives_304() {
    let hub = FakeHub::start().await;
    let image = Image::single("etag", DOCKER_MANIFEST, 10);
    hub.push("library/etag", "1", &image);
    let proxy = TestProxy::start(&hub).await;
    let etag = format!("\"{}\"", image.digest);
    proxy.get("/v2/library/etag/manifests/1").await;
    let r = proxy
        .request(
            reqwest::Method::GET,
            "/v2/library/etag/manifests/1",
            &[("if-none-match", &etag)],
        )
        .await;
    assert_eq!(r.status(), 304);
    assert_eq!(r.headers()["docker-content-digest"], image.digest.as_str());
}

#[tokio::test]
async fn head_after_miss_and_head_miss_never_get() {
    let hub = FakeHub::start().await;
    let image = Image::single("headonly", DOCKER_MANIFEST, 10);
    hub.push("library/headonly", "v1", &image);
    let proxy = TestProxy::start(&hub).await;

    let head = proxy.head("/v2/library/headonly/manifests/v1").await;
    assert_describes(&head, &image);
    assert_eq!(head.headers()["content-type"], DOCKER_MANIFEST);
    let head = proxy
        .head(&format!("/v2/library/headonly/manifests/{}", image.digest))
        .await;
    assert_eq!(head.status(), 200);
    assert_eq!(
        head.headers()["content-length"],
        image.bytes.len().to_string().as_str()
    );
    assert_eq!(
        hub.count("manifest_get"),
        0,
        "a client HEAD never becomes an upstream GET"
    );
    assert_eq!(hub.count("manifest_head"), 2);

    // containerd's pull: HEAD the tag, then GET by digest: one upstream GET in all.
    let get = proxy
        .get(&format!("/v2/library/headonly/manifests/{}", image.digest))
        .await;
    assert_eq!(get.bytes().await.unwrap(), image.bytes);
    proxy.head("/v2/library/headonly/manifests/v1").await;
    proxy.get("/v2/library/headonly/manifests/v1").await;
    assert_eq!(hub.count("manifest_get"), 1);
    assert_eq!(hub.count("manifest_head"), 2);
}

#[tokio::test]
async fn expired_unchanged_tag_costs_one_head_and_moved_tag_is_picked_up() {
    let hub = FakeHub::start().await;
    let v1 = Image::single("moving-1", DOCKER_MANIFEST, 10);
    let v2 = Image::single("moving-2", DOCKER_MANIFEST, 10);
    hub.push("library/moving", "latest", &v1);
    // A TTL long enough for the polls after a revalidation to run within it on a loaded machine.
    let proxy = TestProxy::start_with(&hub, |c| c.tag_ttl = Duration::from_secs(2)).await;
    let path = "/v2/library/moving/manifests/latest";

    assert_eq!(proxy.get(path).await.headers()["x-cache"], "MISS");
    // The TTL passes.
    tokio::time::sleep(Duration::from_millis(2_100)).await;
    let (gets, heads) = (hub.count("manifest_get"), hub.count("manifest_head"));
    let stale = proxy.get(path).await;
    assert_eq!(stale.headers()["x-cache"], "STALE");
    assert_eq!(stale.headers()["docker-content-digest"], v1.digest.as_str());
    // Asked while the revalidation runs, the tag is served stale and joins it (no second HEAD).
    let revalidated = eventually(Duration::from_secs(5), async || {
        proxy.get(path).await.headers()["x-cache"] == "HIT"
    })
    .await;
    assert!(revalidated, "revalidated in the background");
    assert_eq!(hub.count("manifest_head") - heads, 1);
    assert_eq!(hub.count("manifest_get") - gets, 0);

    hub.push("library/moving", "latest", &v2);
    // The TTL passes again.
    tokio::time::sleep(Duration::from_millis(2_100)).await;
    proxy.get(path).await;
    let picked_up = eventually(Duration::from_secs(5), async || {
        proxy.get(path).await.headers()["docker-content-digest"] == v2.digest.as_str()
    })
    .await;
    assert!(picked_up, "the moved tag was picked up in the background");
    let moved = proxy.get(path).await;
    assert_eq!(moved.headers()["docker-content-digest"], v2.digest.as_str());
    assert_eq!(moved.bytes().await.unwrap(), v2.bytes);
}

#[tokio::test]
async fn blocking_revalidation_when_max_stale_is_zero() {
    let hub = FakeHub::start().await;
    let v1 = Image::single("block-1", DOCKER_MANIFEST, 10);
    let v2 = Image::single("block-2", DOCKER_MANIFEST, 10);
    hub.push("library/block", "latest", &v1);
    let proxy = TestProxy::start_with(&hub, |c| {
        c.tag_ttl = Duration::from_millis(200);
        c.max_stale = Duration::ZERO;
    })
    .await;
    let path = "/v2/library/block/manifests/latest";
    proxy.get(path).await;
    // The TTL passes.
    tokio::time::sleep(Duration::from_millis(300)).await;
    let r = proxy.get(path).await;
    assert_eq!(r.headers()["x-cache"], "REVALIDATED");
    assert_eq!(hub.count("manifest_get"), 1);
    assert_eq!(hub.count("manifest_head"), 1);
    hub.push("library/block", "latest", &v2);
    // The TTL passes again.
    tokio::time::sleep(Duration::from_millis(300)).await;
    let r = proxy.get(path).await;
    assert_eq!(r.headers()["x-cache"], "REVALIDATED");
    assert_eq!(r.headers()["docker-content-digest"], v2.digest.as_str());
    assert_eq!(r.bytes().await.unwrap(), v2.bytes);
}

#[tokio::test]
async fn concurrent_cold_gets_make_one_upstream_get_and_one_token() {
    let hub = FakeHub::start().await;
    let image = multi_arch("burst", OCI_INDEX, OCI_MANIFEST);
    hub.push("library/burst", "1", &image);
    hub.fault(support::Fault::Delay(Duration::from_millis(200)));
    let proxy = TestProxy::start(&hub).await;
    let mut tasks = Vec::new();
    for _ in 0..50 {
        let client = proxy.client.clone();
        let url = format!("{}/v2/library/burst/manifests/1", proxy.url);
        tasks.push(tokio::spawn(async move {
            client.get(url).send().await.unwrap().bytes().await.unwrap()
        }));
    }
    for t in tasks {
        assert_eq!(t.await.unwrap(), image.bytes);
    }
    assert_eq!(hub.count("manifest_get"), 1);
    assert_eq!(hub.count("token"), 1);
}

#[tokio::test]
async fn one_token_serves_several_tags() {
    let hub = FakeHub::start().await;
    for tag in ["a", "b", "c"] {
        hub.push(
            "org/app",
            tag,
            &Image::single(&format!("app-{tag}"), DOCKER_MANIFEST, 10),
        );
    }
    let proxy = TestProxy::start(&hub).await;
    for tag in ["a", "b", "c"] {
        assert_eq!(
            proxy
                .get(&format!("/v2/org/app/manifests/{tag}"))
                .await
                .status(),
            200
        );
    }
    assert_eq!(hub.count("token"), 1);
    assert_eq!(hub.count("manifest_get"), 3);
    assert_eq!(
        hub.count("GET /v2/org/app/manifests/b"),
        1,
        "with a known realm the token is sent up front, no 401 round trip"
    );
}

#[tokio::test]
async fn accept_limited_client_gets_404_and_others_still_get_the_index() {
    let hub = FakeHub::start().await;
    let oci = multi_arch("oci", OCI_INDEX, OCI_MANIFEST);
    hub.push("library/oci", "1", &oci);
    let proxy = TestProxy::start(&hub).await;

    let limited = get_accept(&proxy, "/v2/library/oci/manifests/1", DOCKER_MANIFEST).await;
    assert_eq!(limited.status(), 404);
    let body: serde_json::Value = limited.json().await.unwrap();
    assert_eq!(body["errors"][0]["code"], "MANIFEST_UNKNOWN");
    assert_eq!(
        body["errors"][0]["message"],
        "OCI index found, but accept header does not support OCI indexes"
    );
    let full = get_accept(&proxy, "/v2/library/oci/manifests/1", FULL_ACCEPT).await;
    assert_eq!(full.status(), 200);
    assert_eq!(full.bytes().await.unwrap(), oci.bytes);
    let none = proxy.get("/v2/library/oci/manifests/1").await;
    assert_eq!(none.headers()["content-type"], OCI_INDEX);
    // Two accept lines merged, as Docker and containers/image send them.
    let lines = proxy
        .request(
            reqwest::Method::GET,
            "/v2/library/oci/manifests/1",
            &[("accept", DOCKER_MANIFEST), ("accept", OCI_INDEX)],
        )
        .await;
    assert_eq!(lines.status(), 200);
    assert_eq!(hub.count("manifest_get"), 1);
}

#[tokio::test]
async fn schema2_only_client_gets_the_amd64_manifest_of_a_list() {
    let hub = FakeHub::start().await;
    let list = multi_arch("list", DOCKER_LIST, DOCKER_MANIFEST);
    hub.push("library/list", "1", &list);
    let proxy = TestProxy::start(&hub).await;
    let amd64 = &list.children[0];

    let r = get_accept(&proxy, "/v2/library/list/manifests/1", DOCKER_MANIFEST).await;
    assert_eq!(r.status(), 200);
    assert_eq!(r.headers()["docker-content-digest"], amd64.digest.as_str());
    assert_eq!(r.headers()["content-type"], DOCKER_MANIFEST);
    assert_eq!(r.bytes().await.unwrap(), amd64.bytes);
    let full = get_accept(&proxy, "/v2/library/list/manifests/1", FULL_ACCEPT).await;
    assert_eq!(
        full.headers()["docker-content-digest"],
        list.digest.as_str()
    );
    assert_eq!(full.bytes().await.unwrap(), list.bytes);
}

#[tokio::test]
async fn unknown_tag_and_repository_are_404() {
    let hub = FakeHub::start().await;
    hub.push(
        "library/known",
        "1",
        &Image::single("known", DOCKER_MANIFEST, 10),
    );
    let proxy = TestProxy::start(&hub).await;
    let r = proxy.get("/v2/library/known/manifests/nope").await;
    assert_eq!(r.status(), 404);
    assert_eq!(error_code(r).await, "MANIFEST_UNKNOWN");
    let r = proxy.get("/v2/library/nothing/manifests/1").await;
    assert_eq!(r.status(), 404);
    assert_eq!(error_code(r).await, "NAME_UNKNOWN");
}

#[tokio::test]
async fn a_tag_deleted_upstream_is_forgotten_at_revalidation() {
    let hub = FakeHub::start().await;
    hub.push(
        "library/gone",
        "1",
        &Image::single("gone", DOCKER_MANIFEST, 10),
    );
    let proxy = TestProxy::start_with(&hub, |c| {
        c.tag_ttl = Duration::from_millis(100);
        c.max_stale = Duration::ZERO;
    })
    .await;
    assert_eq!(
        proxy.get("/v2/library/gone/manifests/1").await.status(),
        200
    );
    hub.delete_tag("library/gone", "1");
    // The TTL passes.
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert_eq!(
        proxy.get("/v2/library/gone/manifests/1").await.status(),
        404
    );
}

/// A 200 whose headers describe `image`: its length (on HEAD too) and digest.
fn assert_describes(response: &reqwest::Response, image: &Image) {
    assert_eq!(response.status(), 200);
    assert_eq!(
        response.headers()["content-length"],
        image.bytes.len().to_string().as_str()
    );
    assert_eq!(
        response.headers()["docker-content-digest"],
        image.digest.as_str()
    );
    assert_eq!(
        response.headers()["content-type"],
        image.media_type.as_str()
    );
}

/// Pulls `image`'s `arch` child and its blobs through `proxy`, as a client does.
async fn pull_platform(proxy: &TestProxy, repo: &str, image: &Image, arch: usize) {
    let child = &image.children[arch];
    let path = format!("/v2/{repo}/manifests/{}", child.digest);
    assert_eq!(proxy.get_ok(&path).await, child.bytes);
    for blob in &child.blobs {
        let path = format!("/v2/{repo}/blobs/{}", support::hub::sha256(blob));
        assert_eq!(&proxy.get_ok(&path).await, blob);
    }
}

#[tokio::test]
async fn a_moved_tag_prefetches_the_platforms_pulled_before() {
    let hub = FakeHub::start().await;
    let v1 = multi_arch("prefetch-1", OCI_INDEX, OCI_MANIFEST);
    let v2 = multi_arch("prefetch-2", OCI_INDEX, OCI_MANIFEST);
    hub.push("library/app", "latest", &v1);
    // A TTL long enough for the checks after the move to run within it on a loaded machine.
    let proxy = TestProxy::start_with(&hub, |c| c.tag_ttl = Duration::from_secs(2)).await;
    let tag = "/v2/library/app/manifests/latest";
    assert_eq!(get_accept(&proxy, tag, FULL_ACCEPT).await.status(), 200);
    // A client pulled amd64 only.
    pull_platform(&proxy, "library/app", &v1, 0).await;

    hub.push("library/app", "latest", &v2);
    // The TTL passes; the next request finds the move.
    tokio::time::sleep(Duration::from_millis(2_100)).await;
    get_accept(&proxy, tag, FULL_ACCEPT).await;
    let amd64 = &v2.children[0];
    let arm64 = &v2.children[1];
    let blob_path =
        |blob: &bytes::Bytes| format!("GET /v2/library/app/blobs/{}", support::hub::sha256(blob));
    let prefetched = eventually(Duration::from_secs(10), async || {
        amd64.blobs.iter().all(|b| hub.count(&blob_path(b)) == 1)
    })
    .await;
    assert!(prefetched, "the new amd64 manifest's blobs were prefetched");
    assert_eq!(
        hub.count(&format!("GET /v2/library/app/manifests/{}", amd64.digest)),
        1
    );
    // The platform nobody pulled is left alone.
    assert_eq!(
        hub.count(&format!("GET /v2/library/app/manifests/{}", arm64.digest)),
        0
    );
    assert!(arm64.blobs.iter().all(|b| hub.count(&blob_path(b)) == 0));

    // The first pull after the release is all hits, at no upstream cost.
    support::settled(&proxy).await;
    let before = hub.total();
    let index = get_accept(&proxy, tag, FULL_ACCEPT).await;
    assert_eq!(index.headers()["docker-content-digest"], v2.digest.as_str());
    let child = proxy
        .get(&format!("/v2/library/app/manifests/{}", amd64.digest))
        .await;
    assert_eq!(child.headers()["x-cache"], "HIT");
    for blob in &amd64.blobs {
        let r = proxy
            .get(&format!(
                "/v2/library/app/blobs/{}",
                support::hub::sha256(blob)
            ))
            .await;
        assert_eq!(r.headers()["x-cache"], "HIT");
        assert_eq!(&r.bytes().await.unwrap(), blob);
    }
    assert_eq!(hub.total(), before, "nothing asked upstream");

    let stats: serde_json::Value = proxy.get("/_pullthrough/stats").await.json().await.unwrap();
    assert_eq!(stats["counters"]["prefetched_manifests"], 1, "{stats}");
    assert_eq!(stats["counters"]["prefetched_blobs"], 2, "{stats}");
    let scrape = support::scrape(&proxy).await;
    let upstream = proxy_host(&hub);
    assert_eq!(
        support::metric(
            &scrape,
            "pullthrough_prefetched_blobs_total",
            &[("upstream", &upstream)]
        ),
        2.0
    );
}

fn proxy_host(hub: &FakeHub) -> String {
    hub.url.trim_start_matches("http://").to_owned()
}

#[tokio::test]
async fn no_prefetch_when_turned_off_or_below_the_budget_reserve() {
    for (off, budget) in [(true, None), (false, Some((100, 10)))] {
        let hub = FakeHub::start().await;
        let v1 = multi_arch("noprefetch-1", OCI_INDEX, OCI_MANIFEST);
        let v2 = multi_arch("noprefetch-2", OCI_INDEX, OCI_MANIFEST);
        hub.push("library/app", "latest", &v1);
        let proxy = TestProxy::start_with(&hub, |c| {
            c.tag_ttl = Duration::from_millis(300);
            c.max_stale = Duration::ZERO;
            c.prefetch_on_move = !off;
        })
        .await;
        let tag = "/v2/library/app/manifests/latest";
        get_accept(&proxy, tag, FULL_ACCEPT).await;
        pull_platform(&proxy, "library/app", &v1, 0).await;
        hub.push("library/app", "latest", &v2);
        if let Some((limit, remaining)) = budget {
            // The reserve is 10 of 100: the revalidation's HEAD sees 10 left and takes the
            // move; its GET of the new index leaves 9, below the reserve, for the prefetch.
            hub.set_budget(limit, remaining);
        }
        tokio::time::sleep(Duration::from_millis(400)).await;
        let r = get_accept(&proxy, tag, FULL_ACCEPT).await;
        assert_eq!(r.headers()["docker-content-digest"], v2.digest.as_str());
        support::settled(&proxy).await;
        tokio::time::sleep(Duration::from_millis(300)).await;
        let amd64 = &v2.children[0];
        assert_eq!(
            hub.count(&format!("GET /v2/library/app/manifests/{}", amd64.digest)),
            0,
            "off: {off}, budget: {budget:?}"
        );
        assert_eq!(hub.count("blob_get"), 2, "only the blobs the client pulled");
    }
}
