//! Tags lists through pullthrough: paging, Link rewriting, caching, stale on upstream failure.

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::too_many_lines,
    reason = "a test panics on what it did not expect, and may read as one long story"
)]

mod support;

use std::time::Duration;
use support::{FakeHub, Fault, Image, TestProxy, error_code};

use support::DOCKER_MANIFEST;

#[tokio::test]
async fn tags_list_pages_and_caches() {
    let hub = FakeHub::start().await;
    for tag in ["a", "b", "c", "d", "e"] {
        hub.push(
            "library/t",
            tag,
            &Image::single(&format!("t{tag}"), DOCKER_MANIFEST, 10),
        );
    }
    let proxy = TestProxy::start_with(&hub, |c| c.tags_list_ttl = Duration::from_secs(60)).await;
    let r = proxy.get("/v2/library/t/tags/list?n=2").await;
    assert_eq!(r.status(), 200);
    assert_eq!(
        r.headers()["link"],
        "</v2/library/t/tags/list?last=b&n=2>; rel=\"next\""
    );
    let body: serde_json::Value = r.json().await.unwrap();
    assert_eq!(body["tags"], serde_json::json!(["a", "b"]));
    let next: serde_json::Value = proxy
        .get("/v2/library/t/tags/list?last=b&n=2")
        .await
        .json()
        .await
        .unwrap();
    assert_eq!(next["tags"], serde_json::json!(["c", "d"]));
    let all: serde_json::Value = proxy
        .get("/v2/library/t/tags/list")
        .await
        .json()
        .await
        .unwrap();
    assert_eq!(all["tags"].as_array().unwrap().len(), 5);
    let tags_requests = hub.count("tags");
    let again = proxy.get("/v2/library/t/tags/list").await;
    assert_eq!(again.headers()["x-cache"], "HIT");
    assert_eq!(hub.count("tags"), tags_requests);
    let empty: serde_json::Value = proxy
        .get("/v2/library/t/tags/list?n=0")
        .await
        .json()
        .await
        .unwrap();
    assert_eq!(empty["tags"], serde_json::json!([]));

    let r = proxy.get("/v2/library/t/tags/list?n=abc").await;
    assert_eq!(r.status(), 400);
    assert_eq!(error_code(r).await, "PAGINATION_NUMBER_INVALID");
    let r = proxy.get("/v2/library/none/tags/list").await;
    assert_eq!(r.status(), 404);
    assert_eq!(error_code(r).await, "NAME_UNKNOWN");
}

#[tokio::test]
async fn tags_list_is_served_stale_when_upstream_fails() {
    let hub = FakeHub::start().await;
    hub.push("library/t", "a", &Image::single("ta", DOCKER_MANIFEST, 10));
    let proxy = TestProxy::start_with(&hub, |c| c.tags_list_ttl = Duration::from_millis(100)).await;
    assert_eq!(proxy.get("/v2/library/t/tags/list").await.status(), 200);
    // The TTL passes.
    tokio::time::sleep(Duration::from_millis(200)).await;
    hub.fault(Fault::Status(503));
    let r = proxy.get("/v2/library/t/tags/list").await;
    assert_eq!(r.status(), 200);
    assert_eq!(r.headers()["x-cache"], "STALE");
    let body: serde_json::Value = r.json().await.unwrap();
    assert_eq!(body["tags"], serde_json::json!(["a"]));
}

#[tokio::test]
async fn the_tags_list_cache_is_bounded_in_bytes() {
    let hub = FakeHub::start().await;
    let image = Image::single("many-tags", DOCKER_MANIFEST, 10);
    for i in 0..3000 {
        hub.push("library/tagged", &format!("tag-{i:05}"), &image);
    }
    let dir = tempfile::tempdir().unwrap();
    let mut config = TestProxy::config(&hub.url, dir.path());
    config.tags_list_cache_bytes = bytesize::ByteSize::kib(64);
    config.tags_list_ttl = Duration::from_secs(600);
    let state = pullthrough::state::AppState::new(&config).unwrap();
    let proxy = std::sync::Arc::clone(&state.proxy);
    let name = pullthrough::registry::RepoName::parse("library/tagged", true).unwrap();
    // 300 distinct pages of 1,000 tags (about 15 KB each): 4.5 MB if nothing were evicted.
    for i in 0..300 {
        let query = pullthrough::proxy::TagsQuery {
            n: Some(1000),
            last: Some(pullthrough::registry::Tag::parse(&format!("tag-{i:05}")).unwrap()),
        };
        let page = proxy.tags_list(&name, query).await.unwrap();
        assert!(page.body.len() > 10_000);
    }
    let held = proxy.tags_cache_bytes();
    assert!(
        held > 0 && held <= 64 * 1024,
        "tags-list cache holds {held} bytes"
    );
}
