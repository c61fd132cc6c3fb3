//! Client access control: htpasswd (bcrypt) users and bearer tokens, rules per upstream and
//! repository prefix with anonymous access kept open where a rule says so, private content
//! refused to clients the rules do not allow (cached or not), and failed logins braked.

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::too_many_lines,
    reason = "a test panics on what it did not expect, and may read as one long story"
)]

mod support;

use pullthrough::config::{AccessRule, Secret};
use support::{FakeHub, Image, TestProxy, error_code};

use support::DOCKER_MANIFEST;

fn basic(user: &str, password: &str) -> String {
    use base64::Engine as _;
    format!(
        "Basic {}",
        base64::engine::general_purpose::STANDARD.encode(format!("{user}:{password}"))
    )
}

fn rule(upstream: &str, prefix: &str, users: &[&str], anonymous: bool) -> AccessRule {
    AccessRule {
        upstream: upstream.into(),
        prefix: prefix.into(),
        users: users.iter().map(|u| (*u).to_owned()).collect(),
        anonymous,
    }
}

/// A hub with a public `library/alpine:1` and a private `acme/app:1` (for the user `svc`).
async fn acme_hub() -> (FakeHub, Image, Image) {
    let hub = FakeHub::start().await;
    hub.add_user("svc", "svc-pw");
    let public = Image::single("public", DOCKER_MANIFEST, 100);
    let private = Image::single("private", DOCKER_MANIFEST, 100);
    hub.push("library/alpine", "1", &public);
    hub.push("acme/app", "1", &private);
    hub.make_private("acme/app");
    (hub, public, private)
}

/// An htpasswd file in `dir` with `users` (name, password, bcrypt cost).
fn htpasswd(dir: &std::path::Path, users: &[(&str, &str, u32)]) -> std::path::PathBuf {
    let path = dir.join("htpasswd");
    let mut text = String::from("# users\n");
    for (user, password, cost) in users {
        let hash = bcrypt::hash(password, *cost).unwrap();
        text.push_str(&format!("{user}:{hash}\n"));
    }
    std::fs::write(&path, text).unwrap();
    path
}

/// GET `path` with `Authorization: <authorization>`.
async fn get_as(proxy: &TestProxy, path: &str, authorization: &str) -> reqwest::Response {
    proxy
        .request(
            reqwest::Method::GET,
            path,
            &[("authorization", authorization)],
        )
        .await
}

async fn start(hub: &FakeHub, dir: &std::path::Path) -> TestProxy {
    let htpasswd = htpasswd(dir, &[("alice", "alice-pw", 4), ("bob", "bob-pw", 4)]);
    let tokens = dir.join("tokens");
    std::fs::write(&tokens, "ci-bot:ci-token-0123456789abcdef\n").unwrap();
    TestProxy::start_with(hub, |c| {
        c.htpasswd = Some(htpasswd);
        c.client_tokens_file = Some(tokens);
        c.upstream_username = Some("svc".into());
        c.upstream_password = Some(Secret("svc-pw".into()));
        c.access = vec![
            rule("docker.io", "library/", &[], true),
            rule("docker.io", "acme/", &["alice", "ci-bot"], false),
        ];
    })
    .await
}

#[tokio::test]
async fn rules_decide_who_pulls_what() {
    let (hub, public, private) = acme_hub().await;
    let dir = tempfile::tempdir().unwrap();
    let proxy = start(&hub, dir.path()).await;
    let get = |path: &str, auth: Option<String>| {
        let (client, url) = (proxy.client.clone(), format!("{}{path}", proxy.url));
        async move {
            let mut r = client.get(url);
            if let Some(auth) = auth {
                r = r.header("authorization", auth);
            }
            r.send().await.unwrap()
        }
    };

    // The ping asks for credentials, and takes good ones.
    let r = get("/v2/", None).await;
    assert_eq!(r.status(), 401);
    assert_eq!(
        r.headers()["www-authenticate"],
        "Basic realm=\"pullthrough\""
    );
    assert_eq!(
        get("/v2/", Some(basic("alice", "alice-pw"))).await.status(),
        200
    );
    assert_eq!(
        get("/v2/", Some(basic("alice", "wrong"))).await.status(),
        401
    );

    // Public repositories stay open to anonymous clients.
    let r = get("/v2/library/alpine/manifests/1", None).await;
    assert_eq!(r.status(), 200);
    assert_eq!(r.bytes().await.unwrap(), public.bytes);

    // The private repository: alice and the token may; anonymous, wrong passwords and bob may
    // not, even once it is cached; nothing is asked upstream for a refused client.
    let path = "/v2/acme/app/manifests/1";
    let before = hub.total();
    let r = get(path, None).await;
    assert_eq!(r.status(), 401);
    assert_eq!(error_code(r).await, "UNAUTHORIZED");
    assert_eq!(get(path, Some(basic("alice", "nope"))).await.status(), 401);
    assert_eq!(hub.total(), before, "refused clients cost nothing upstream");
    let r = get(path, Some(basic("alice", "alice-pw"))).await;
    assert_eq!(r.status(), 200);
    assert_eq!(r.bytes().await.unwrap(), private.bytes);
    let r = get(path, Some("Bearer ci-token-0123456789abcdef".into())).await;
    assert_eq!(r.status(), 200);
    assert_eq!(r.headers()["x-cache"], "HIT");
    assert_eq!(r.bytes().await.unwrap(), private.bytes);
    assert_eq!(get(path, None).await.status(), 401, "cached, still refused");
    let r = get(path, Some(basic("bob", "bob-pw"))).await;
    assert_eq!(r.status(), 403);
    assert_eq!(error_code(r).await, "DENIED");
    let blob = support::hub::sha256(&private.blobs[1]);
    assert_eq!(
        get(&format!("/v2/acme/app/blobs/{blob}"), None)
            .await
            .status(),
        401
    );
    // No rule for other repositories: authenticated clients only.
    assert_eq!(get("/v2/other/thing/manifests/1", None).await.status(), 401);
}

#[tokio::test]
async fn failed_logins_are_braked_per_address() {
    let hub = FakeHub::start().await;
    let dir = tempfile::tempdir().unwrap();
    let proxy = start(&hub, dir.path()).await;
    for _ in 0..10 {
        let r = get_as(&proxy, "/v2/", &basic("alice", "guess")).await;
        assert_eq!(r.status(), 401);
    }
    // Even the right password waits now.
    let r = get_as(&proxy, "/v2/", &basic("alice", "alice-pw")).await;
    assert_eq!(r.status(), 429);
    assert!(r.headers().contains_key("retry-after"));
}

/// The same brake on registry requests, which reach their handler past the router, with the
/// client's address handed along rather than read from the request.
#[tokio::test]
async fn failed_logins_on_registry_requests_are_braked_per_address() {
    let hub = FakeHub::start().await;
    hub.push(
        "library/x",
        "1",
        &Image::single("braked", DOCKER_MANIFEST, 10),
    );
    let dir = tempfile::tempdir().unwrap();
    let proxy = start(&hub, dir.path()).await;
    let path = "/v2/library/x/manifests/1";
    for _ in 0..10 {
        let r = get_as(&proxy, path, &basic("alice", "guess")).await;
        assert_eq!(r.status(), 401);
    }
    let r = get_as(&proxy, path, &basic("alice", "alice-pw")).await;
    assert_eq!(r.status(), 429);
    assert!(r.headers().contains_key("retry-after"));
    assert_eq!(
        hub.total(),
        0,
        "nothing is asked upstream for a refused client"
    );
}

#[test]
fn a_non_bcrypt_htpasswd_entry_stops_startup() {
    let dir = tempfile::tempdir().unwrap();
    let htpasswd = dir.path().join("htpasswd");
    std::fs::write(&htpasswd, "alice:$apr1$abc$def\n").unwrap();
    let out = support::binary::Pullthrough::new()
        .data_dir(dir.path().join("cache"))
        .env("PULLTHROUGH_HTPASSWD", &htpasswd)
        .output();
    assert_eq!(out.status.code(), Some(2));
    let stderr = String::from_utf8(out.stderr).unwrap();
    assert!(
        stderr.contains("htpasswd -B") && stderr.trim_end().lines().count() == 1,
        "{stderr}"
    );
}

/// alice's team repository, restricted to her; `library/` open to anonymous clients; the
/// upstream has no credentials (so nothing is private to it); ghcr.io open too.
async fn start_restricted(hub: &FakeHub, ghcr: &FakeHub, dir: &std::path::Path) -> TestProxy {
    let htpasswd = htpasswd(dir, &[("alice", "alice-pw", 4)]);
    TestProxy::start_with(hub, |c| {
        c.htpasswd = Some(htpasswd);
        c.upstreams = vec![ghcr.as_upstream("ghcr.io")];
        c.access = vec![
            rule("docker.io", "library/", &[], true),
            rule("docker.io", "team/", &["alice"], false),
            rule("ghcr.io", "", &[], true),
        ];
    })
    .await
}

#[tokio::test]
async fn restricted_content_is_not_served_through_an_open_repository() {
    let hub = FakeHub::start().await;
    let ghcr = FakeHub::start().await;
    let team = Image::single("team-secret", DOCKER_MANIFEST, 300);
    let alpine = Image::single("alpine", DOCKER_MANIFEST, 100);
    hub.push("team/internal", "1", &team);
    hub.push("library/alpine", "1", &alpine);
    ghcr.push("org/app", "1", &alpine);
    let dir = tempfile::tempdir().unwrap();
    let proxy = start_restricted(&hub, &ghcr, dir.path()).await;
    let alice = basic("alice", "alice-pw");
    let (config, layer) = (
        support::hub::sha256(&team.blobs[0]),
        support::hub::sha256(&team.blobs[1]),
    );

    // alice pulls her team's image: manifest, config, layer.
    let r = get_as(&proxy, "/v2/team/internal/manifests/1", &alice).await;
    assert_eq!(r.status(), 200);
    for blob in [&config, &layer] {
        let r = get_as(&proxy, &format!("/v2/team/internal/blobs/{blob}"), &alice).await;
        assert_eq!(r.status(), 200);
    }

    // Anonymous clients ask for the team's digests through open repositories: nothing.
    let before = hub.count("blob_get") + hub.count("manifest_get");
    for path in [
        format!("/v2/library/alpine/blobs/{layer}"),
        format!("/v2/library/alpine/blobs/{config}"),
        format!("/v2/library/alpine/manifests/{}", team.digest),
        format!("/v2/ghcr.io/org/app/blobs/{layer}"),
        format!("/v2/ghcr.io/org/app/manifests/{}", team.digest),
    ] {
        for method in [reqwest::Method::GET, reqwest::Method::HEAD] {
            let r = proxy.request(method.clone(), &path, &[]).await;
            assert_eq!(r.status(), 404, "{method} {path}");
        }
    }
    assert_eq!(
        hub.count("blob_get") + hub.count("manifest_get"),
        before,
        "checked with HEADs, never fetched"
    );

    // The open repository's own content is served, and alice's pull again costs nothing: what
    // her manifest refers to was granted with it.
    let alpine_layer = support::hub::sha256(&alpine.blobs[1]);
    proxy.get_ok("/v2/library/alpine/manifests/1").await;
    proxy
        .get_ok(&format!("/v2/library/alpine/blobs/{alpine_layer}"))
        .await;
    let before = hub.total();
    for blob in [&config, &layer] {
        let r = get_as(&proxy, &format!("/v2/team/internal/blobs/{blob}"), &alice).await;
        assert_eq!(r.status(), 200);
        assert_eq!(r.headers()["x-cache"], "HIT");
    }
    assert_eq!(hub.total(), before);
}

#[tokio::test]
async fn empty_basic_credentials_pull_what_anonymous_clients_may() {
    let hub = FakeHub::start().await;
    let ghcr = FakeHub::start().await;
    let alpine = Image::single("alpine", DOCKER_MANIFEST, 100);
    hub.push("library/alpine", "1", &alpine);
    hub.push("team/internal", "1", &alpine);
    let dir = tempfile::tempdir().unwrap();
    let proxy = start_restricted(&hub, &ghcr, dir.path()).await;
    // skopeo and podman send `Basic Og==` (an empty user and password) without a login.
    let empty = [("authorization", "Basic Og==")];
    let r = proxy
        .request(
            reqwest::Method::GET,
            "/v2/library/alpine/manifests/1",
            &empty,
        )
        .await;
    assert_eq!(r.status(), 200);
    assert_eq!(r.bytes().await.unwrap(), alpine.bytes);
    let r = proxy
        .request(
            reqwest::Method::GET,
            "/v2/team/internal/manifests/1",
            &empty,
        )
        .await;
    assert_eq!(r.status(), 401);
    let body: serde_json::Value = r.json().await.unwrap();
    assert_eq!(body["errors"][0]["message"], "authentication required");
}

async fn wrong_logins(proxy: &TestProxy, user: &str, n: usize) -> Vec<reqwest::StatusCode> {
    let requests = (0..n).map(|i| {
        let auth = basic(user, &format!("guess-{i}"));
        let (client, url) = (proxy.client.clone(), format!("{}/v2/", proxy.url));
        async move {
            client
                .get(url)
                .header("authorization", auth)
                .send()
                .await
                .unwrap()
                .status()
        }
    });
    futures_util::future::join_all(requests).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_burst_of_wrong_passwords_is_braked_before_it_is_verified() {
    let hub = FakeHub::start().await;
    let dir = tempfile::tempdir().unwrap();
    // A dearer hash than the other tests': verifications overlap, as they do at cost 12.
    let htpasswd = htpasswd(dir.path(), &[("alice", "alice-pw", 8)]);
    let proxy = TestProxy::start_with(&hub, |c| c.htpasswd = Some(htpasswd)).await;
    let answers = wrong_logins(&proxy, "alice", 300).await;
    let wrong = answers.iter().filter(|s| s.as_u16() == 401).count();
    let braked = answers.iter().filter(|s| s.as_u16() == 429).count();
    assert_eq!(
        (wrong, braked),
        (10, 290),
        "at most 10 verifications a window"
    );
}

#[tokio::test]
async fn a_braked_address_still_serves_anonymous_pulls_and_other_users() {
    let hub = FakeHub::start().await;
    hub.add_user("svc", "svc-pw");
    let public = Image::single("public", DOCKER_MANIFEST, 100);
    hub.push("library/alpine", "1", &public);
    hub.push("acme/app", "1", &public);
    let dir = tempfile::tempdir().unwrap();
    let proxy = start(&hub, dir.path()).await;
    let alice = basic("alice", "alice-pw");
    // alice logged in before someone at her address (a NAT, a balancer) guessed her password.
    let r = get_as(&proxy, "/v2/", &alice).await;
    assert_eq!(r.status(), 200);
    let answers = wrong_logins(&proxy, "alice", 10).await;
    assert!(answers.iter().all(|s| s.as_u16() == 401), "{answers:?}");

    // The guesser is braked, with a message that says why and for how long.
    let r = get_as(&proxy, "/v2/", &basic("alice", "guess-11")).await;
    assert_eq!(r.status(), 429);
    let retry: u64 = support::retry_after(&r);
    assert!((1..=60).contains(&retry), "{retry}");
    let body: serde_json::Value = r.json().await.unwrap();
    let message = body["errors"][0]["message"].as_str().unwrap();
    assert!(
        message.starts_with("too many failed logins from 127.0.0.1, retry in ")
            && message.ends_with(" s"),
        "{message}"
    );
    assert!(!message.contains("upstream"), "{message}");

    // Nobody else at the address is: anonymous pulls, alice's verified login, bob.
    assert_eq!(
        proxy.get("/v2/library/alpine/manifests/1").await.status(),
        200
    );
    let r = get_as(&proxy, "/v2/acme/app/manifests/1", &alice).await;
    assert_eq!(r.status(), 200);
    let r = get_as(&proxy, "/v2/", &basic("bob", "bob-pw")).await;
    assert_eq!(r.status(), 200);
}

#[tokio::test]
async fn the_cache_api_and_status_page_show_a_client_only_what_it_may_pull() {
    let (hub, _public, private) = acme_hub().await;
    let dir = tempfile::tempdir().unwrap();
    let proxy = start(&hub, dir.path()).await;
    let alice = basic("alice", "alice-pw");
    proxy.get_ok("/v2/library/alpine/manifests/1").await;
    let r = get_as(&proxy, "/v2/acme/app/manifests/1", &alice).await;
    assert_eq!(r.status(), 200);
    // An upstream failure for the private repository, among the recent errors.
    hub.fault(support::Fault::Status(500));
    let r = get_as(&proxy, "/v2/acme/app/manifests/2", &alice).await;
    assert!(r.status().is_server_error());
    hub.clear_faults();
    let get_json = |path: &'static str, auth: Option<&'static str>| {
        let (client, url) = (proxy.client.clone(), format!("{}{path}", proxy.url));
        let auth = auth.map(|_| alice.clone());
        async move {
            let mut r = client.get(url);
            if let Some(auth) = auth {
                r = r.header("authorization", auth);
            }
            let r = r.send().await.unwrap();
            (r.status().as_u16(), r.text().await.unwrap())
        }
    };

    // Anonymous: the open repository only.
    let (status, listing) = get_json("/_pullthrough/cache", None).await;
    assert_eq!(status, 200);
    assert!(
        listing.contains("library/alpine") && !listing.contains("acme"),
        "{listing}"
    );
    let (status, _) = get_json("/_pullthrough/cache/acme/app/manifests/1", None).await;
    assert_eq!(status, 401);
    let (status, _) = get_json(
        "/_pullthrough/cache/acme/app/manifests/1?explain=pull",
        None,
    )
    .await;
    assert_eq!(status, 401);
    let (status, _) = get_json("/_pullthrough/cache/acme/app", None).await;
    assert_eq!(status, 401);
    let blob = support::hub::sha256(&private.blobs[1]);
    let r = proxy
        .get(&format!("/_pullthrough/cache/blobs/{blob}"))
        .await;
    assert_eq!(
        r.status(),
        403,
        "which digests are cached is the admin's to know"
    );
    let (_, stats) = get_json("/_pullthrough/stats", None).await;
    assert!(!stats.contains(&hub.url), "{stats}");
    let stats: serde_json::Value = serde_json::from_str(&stats).unwrap();
    assert_eq!(
        stats["counters"]["recent_upstream_errors"],
        serde_json::json!([])
    );
    let (_, page) = get_json("/", None).await;
    assert!(
        page.contains("library/alpine") && !page.contains("acme"),
        "{page}"
    );
    assert!(!page.contains(&hub.url), "upstream URLs are the admin's");

    // alice: hers too.
    let (_, listing) = get_json("/_pullthrough/cache", Some("alice")).await;
    assert!(listing.contains("acme/app"), "{listing}");
    let (status, _) = get_json("/_pullthrough/cache/acme/app/manifests/1", Some("alice")).await;
    assert_eq!(status, 200);
    let (_, page) = get_json("/", Some("alice")).await;
    assert!(page.contains("acme/app"), "{page}");
}

#[tokio::test]
async fn the_admin_token_sees_everything_with_access_control_on() {
    let hub = FakeHub::start().await;
    hub.add_user("svc", "svc-pw");
    let private = Image::single("private", DOCKER_MANIFEST, 100);
    hub.push("acme/app", "1", &private);
    hub.make_private("acme/app");
    let dir = tempfile::tempdir().unwrap();
    let htpasswd = htpasswd(dir.path(), &[("alice", "alice-pw", 4)]);
    let proxy = TestProxy::start_with(&hub, |c| {
        c.htpasswd = Some(htpasswd);
        c.upstream_username = Some("svc".into());
        c.upstream_password = Some(Secret("svc-pw".into()));
        c.admin_token = Some(Secret("admin-token-0123456789".into()));
    })
    .await;
    let r = get_as(
        &proxy,
        "/v2/acme/app/manifests/1",
        &basic("alice", "alice-pw"),
    )
    .await;
    assert_eq!(r.status(), 200);
    let admin = [("authorization", "Bearer admin-token-0123456789")];
    let r = proxy
        .request(reqwest::Method::GET, "/_pullthrough/cache", &admin)
        .await;
    assert!(r.text().await.unwrap().contains("acme/app"));
    let r = proxy.request(reqwest::Method::GET, "/", &admin).await;
    let page = r.text().await.unwrap();
    assert!(
        page.contains("acme/app") && page.contains(&hub.url),
        "{page}"
    );
    let page = proxy.get("/").await.text().await.unwrap();
    assert!(
        !page.contains("acme/app") && !page.contains(&hub.url),
        "{page}"
    );
}

#[tokio::test]
async fn an_index_naming_restricted_digests_does_not_unlock_them() {
    let hub = FakeHub::start().await;
    let ghcr = FakeHub::start().await;
    let team = Image::single("team-secret", DOCKER_MANIFEST, 300);
    hub.push("team/internal", "1", &team);
    // An open repository whose index names the team's manifest without holding it (a
    // registry that does not check an index's children at push time).
    let mut evil = Image::index(
        "application/vnd.oci.image.index.v1+json",
        vec![("amd64", team.clone())],
    );
    evil.children.clear();
    hub.push("library/evil", "1", &evil);
    let dir = tempfile::tempdir().unwrap();
    let proxy = start_restricted(&hub, &ghcr, dir.path()).await;
    let alice = basic("alice", "alice-pw");
    assert_eq!(
        get_as(&proxy, "/v2/team/internal/manifests/1", &alice)
            .await
            .status(),
        200
    );
    let layer = support::hub::sha256(&team.blobs[1]);
    assert_eq!(
        get_as(&proxy, &format!("/v2/team/internal/blobs/{layer}"), &alice)
            .await
            .status(),
        200
    );

    // The platform child of the open index, and the layer it names: not through library/evil.
    let r = proxy
        .request(
            reqwest::Method::GET,
            "/v2/library/evil/manifests/1",
            &[("accept", DOCKER_MANIFEST)],
        )
        .await;
    assert_eq!(
        r.status(),
        404,
        "the team manifest came through library/evil"
    );
    assert_ne!(r.bytes().await.unwrap(), team.bytes);
    let r = proxy.get(&format!("/v2/library/evil/blobs/{layer}")).await;
    assert_eq!(r.status(), 404);

    // Nor the cache API's view of the team manifest by digest under an open name.
    for path in [
        format!("/_pullthrough/cache/library/evil/manifests/{}", team.digest),
        format!(
            "/_pullthrough/cache/library/evil/manifests/{}?explain=pull",
            team.digest
        ),
    ] {
        let r = proxy.get(&path).await;
        assert_eq!(r.status(), 404, "{path}");
        assert!(!r.text().await.unwrap().contains(&layer), "{path}");
    }
}
