//! Client access control: htpasswd (bcrypt) users and bearer tokens, rules per upstream and
//! repository prefix with anonymous access kept open where a rule says so, private content
//! refused to clients the rules do not allow (cached or not), and failed logins braked.

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

async fn start(hub: &FakeHub, dir: &std::path::Path) -> TestProxy {
    let htpasswd = dir.join("htpasswd");
    let hash = bcrypt::hash("alice-pw", 4).unwrap();
    let bob = bcrypt::hash("bob-pw", 4).unwrap();
    std::fs::write(&htpasswd, format!("# users\nalice:{hash}\nbob:{bob}\n")).unwrap();
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
    let hub = FakeHub::start().await;
    hub.add_user("svc", "svc-pw");
    let public = Image::single("public", DOCKER_MANIFEST, 100);
    let private = Image::single("private", DOCKER_MANIFEST, 100);
    hub.push("library/alpine", "1", &public);
    hub.push("acme/app", "1", &private);
    hub.make_private("acme/app");
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
        let r = proxy
            .request(
                reqwest::Method::GET,
                "/v2/",
                &[("authorization", &basic("alice", "guess"))],
            )
            .await;
        assert_eq!(r.status(), 401);
    }
    // Even the right password waits now.
    let r = proxy
        .request(
            reqwest::Method::GET,
            "/v2/",
            &[("authorization", &basic("alice", "alice-pw"))],
        )
        .await;
    assert_eq!(r.status(), 429);
    assert!(r.headers().contains_key("retry-after"));
}

#[test]
fn a_non_bcrypt_htpasswd_entry_stops_startup() {
    let dir = tempfile::tempdir().unwrap();
    let htpasswd = dir.path().join("htpasswd");
    std::fs::write(&htpasswd, "alice:$apr1$abc$def\n").unwrap();
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_pullthrough"))
        .env("PULLTHROUGH_LISTEN", "127.0.0.1:0")
        .env("PULLTHROUGH_DATA_DIR", dir.path().join("cache"))
        .env("PULLTHROUGH_HTPASSWD", &htpasswd)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    let stderr = String::from_utf8(out.stderr).unwrap();
    assert!(
        stderr.contains("htpasswd -B") && stderr.trim_end().lines().count() == 1,
        "{stderr}"
    );
}
