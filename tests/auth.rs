//! Upstream authentication: token challenge flow, token reuse and renewal, private
//! repositories, and where credentials may go.

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

fn with_credentials(user: &str, password: &str) -> impl FnOnce(&mut pullthrough::Config) {
    let (user, password) = (user.to_owned(), password.to_owned());
    move |c| {
        c.upstream_username = Some(user);
        c.upstream_password = Some(Secret(password));
    }
}

#[tokio::test]
async fn private_repository_needs_credentials() {
    let hub = FakeHub::start().await;
    let image = push(&hub, "acme/secret", "1");
    hub.make_private("acme/secret");
    hub.add_user("alice", "s3cret");

    let anonymous = TestProxy::start(&hub).await;
    let r = anonymous.get("/v2/acme/secret/manifests/1").await;
    assert_eq!(r.status(), 404);
    assert_eq!(error_code(r).await, "NAME_UNKNOWN");

    let authed = TestProxy::start_with(&hub, with_credentials("alice", "s3cret")).await;
    let r = authed.get("/v2/acme/secret/manifests/1").await;
    assert_eq!(r.status(), 200);
    assert_eq!(r.bytes().await.unwrap(), image.bytes);
    assert!(
        hub.count("token_post") >= 1,
        "credentials go through the OAuth2 password grant first"
    );
}

#[tokio::test]
async fn falls_back_to_get_when_the_realm_has_no_oauth2() {
    let hub = FakeHub::start().await;
    let (one, two) = (
        push(&hub, "acme/secret", "1"),
        push(&hub, "acme/secret", "2"),
    );
    hub.make_private("acme/secret");
    hub.add_user("alice", "s3cret");
    hub.set_oauth_post(false);
    let proxy = TestProxy::start_with(&hub, with_credentials("alice", "s3cret")).await;
    assert_eq!(proxy.get_ok("/v2/acme/secret/manifests/1").await, one.bytes);
    assert_eq!(proxy.get_ok("/v2/acme/secret/manifests/2").await, two.bytes);
    assert_eq!(hub.count("token_post"), 0);
    assert_eq!(
        hub.count("token_with_credentials"),
        1,
        "one token for the repository, fetched by GET with Basic"
    );
}

#[tokio::test]
async fn wrong_credentials_still_serve_public_images() {
    let hub = FakeHub::start().await;
    let image = push(&hub, "library/pub", "1");
    hub.add_user("alice", "s3cret");
    let proxy = TestProxy::start_with(&hub, with_credentials("alice", "wrong")).await;
    assert_eq!(
        proxy.get_ok("/v2/library/pub/manifests/1").await,
        image.bytes
    );
}

#[tokio::test]
async fn short_lived_tokens_are_renewed_without_client_errors() {
    let hub = FakeHub::start().await;
    let (one, two) = (
        push(&hub, "library/short", "1"),
        push(&hub, "library/short", "2"),
    );
    hub.set_token_lifetime(2);
    let proxy = TestProxy::start(&hub).await;
    assert_eq!(
        proxy.get_ok("/v2/library/short/manifests/1").await,
        one.bytes
    );
    // The token's 2 s lifetime passes.
    tokio::time::sleep(Duration::from_millis(2200)).await;
    // The cached token (kept for the 60 s minimum) has expired upstream: one 401, a new token.
    assert_eq!(
        proxy.get_ok("/v2/library/short/manifests/2").await,
        two.bytes
    );
    assert_eq!(hub.count("token"), 2);
}

#[tokio::test]
async fn credentials_never_go_to_a_foreign_realm() {
    let hub = FakeHub::start().await;
    let image = push(&hub, "library/pub", "1");
    hub.add_user("alice", "s3cret");
    hub.set_realm_host("localhost");
    let proxy = TestProxy::start_with(&hub, with_credentials("alice", "s3cret")).await;
    assert_eq!(
        proxy.get_ok("/v2/library/pub/manifests/1").await,
        image.bytes
    );
    assert_eq!(hub.count("token"), 1, "an anonymous token instead");
    assert_eq!(hub.count("token_with_credentials"), 0);
}

#[tokio::test]
async fn credentials_reach_a_realm_on_the_upstream_host() {
    let hub = FakeHub::start().await;
    let image = push(&hub, "library/pub", "1");
    hub.add_user("alice", "s3cret");
    let proxy = TestProxy::start_with(&hub, with_credentials("alice", "s3cret")).await;
    assert_eq!(
        proxy.get_ok("/v2/library/pub/manifests/1").await,
        image.bytes
    );
    assert_eq!(hub.count("token_with_credentials"), 1);
}

/// Pushes a small single-platform image as `repo:tag` and returns it.
fn push(hub: &FakeHub, repo: &str, tag: &str) -> Image {
    let image = Image::single(&format!("{repo}:{tag}"), DOCKER_MANIFEST, 10);
    hub.push(repo, tag, &image);
    image
}
