//! What the binary writes to its log: the port it really listens on, plain text when the
//! output is not a terminal, durations without float noise, and a refused upstream credential
//! as a loud error that never shows the password.

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::too_many_lines,
    reason = "a test panics on what it did not expect, and may read as one long story"
)]

mod support;

use std::time::Duration;
use support::binary::{Pullthrough, Running};
use support::{FakeHub, Image};

/// The binary with `env`, started.
async fn start(env: &[(&str, &str)]) -> Running {
    Pullthrough::new().envs(env.iter().copied()).start().await
}

#[tokio::test]
async fn the_log_names_the_bound_port_in_plain_text_with_clean_durations() {
    let mut running = start(&[]).await;
    let url = running.url.clone();
    let r = support::client()
        .get(format!("{url}/v2/"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let line = running.line("elapsed_ms=").await;
    let elapsed = line
        .split_whitespace()
        .find_map(|w| w.strip_prefix("elapsed_ms="))
        .unwrap_or_else(|| panic!("no elapsed_ms in {line}"));
    let decimals = elapsed.split_once('.').map_or(0, |(_, d)| d.len());
    assert!(decimals <= 3, "float noise in {line}");
    let all = running.quiet_log(Duration::from_millis(100)).await;
    assert!(
        !all.contains('\u{1b}'),
        "ANSI escapes in a non-terminal log:\n{all}"
    );
}

#[tokio::test]
async fn refused_upstream_credentials_are_a_loud_error_without_the_password() {
    let hub = FakeHub::start().await;
    hub.add_user("bob", "the-right-one");
    let image = Image::single(
        "creds",
        "application/vnd.docker.distribution.manifest.v2+json",
        10,
    );
    hub.push("library/public", "1", &image);
    let mut running = start(&[
        ("PULLTHROUGH_UPSTREAM", &hub.url),
        ("PULLTHROUGH_UPSTREAM_USERNAME", "bob"),
        ("PULLTHROUGH_UPSTREAM_PASSWORD", "pw-s3cr3t-typo"),
    ])
    .await;
    let url = running.url.clone();
    let r = support::client()
        .get(format!("{url}/v2/library/public/manifests/1"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200, "public content is still served");
    assert_eq!(r.bytes().await.unwrap(), image.bytes);
    let line = running
        .line("refused the configured upstream credentials")
        .await;
    assert!(line.contains("ERROR"), "{line}");
    assert!(line.contains("bob"), "{line}");
    let all = running.quiet_log(Duration::from_millis(200)).await;
    assert!(
        !all.contains("pw-s3cr3t-typo"),
        "the password was logged:\n{all}"
    );
}

#[tokio::test]
async fn json_logs_carry_the_request_id_in_every_event_of_the_request() {
    let hub = FakeHub::start().await;
    let image = Image::single(
        "json-logs",
        "application/vnd.docker.distribution.manifest.v2+json",
        10,
    );
    hub.push("library/logged", "1", &image);
    let mut running = start(&[
        ("PULLTHROUGH_UPSTREAM", &hub.url),
        ("PULLTHROUGH_LOG_FORMAT", "json"),
        ("RUST_LOG", "pullthrough=debug"),
    ])
    .await;
    let event: serde_json::Value = serde_json::from_str(&running.listening).unwrap();
    let url = format!("http://{}", event["addr"].as_str().unwrap());
    let r = support::client()
        .get(format!("{url}/v2/library/logged/manifests/1"))
        .header("x-request-id", "trace-me-1")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(r.headers()["x-request-id"], "trace-me-1");
    running.line("\"message\":\"request\"").await;
    let all = running.quiet_log(Duration::from_millis(200)).await;
    let events: Vec<serde_json::Value> = all
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("not JSON ({e}): {l}")))
        .collect();
    let request = events
        .iter()
        .find(|e| e["message"] == "request")
        .expect("an access-log event");
    for field in [
        "timestamp",
        "level",
        "target",
        "method",
        "path",
        "status",
        "cache",
        "elapsed_ms",
    ] {
        assert!(!request[field].is_null(), "{field} missing in {request}");
    }
    assert_eq!(request["span"]["request_id"], "trace-me-1");
    // The upstream fetch the request started logs inside its span too.
    let upstream: Vec<_> = events
        .iter()
        .filter(|e| e["message"] == "upstream request")
        .collect();
    assert!(!upstream.is_empty(), "{all}");
    for e in upstream {
        assert_eq!(e["span"]["request_id"], "trace-me-1", "{e}");
    }
}

#[tokio::test]
async fn no_secret_appears_in_any_log_or_cache_api_output() {
    let hub = FakeHub::start().await;
    hub.add_user("carol", "pw-s3cr3t-right");
    let image = Image::single(
        "secret",
        "application/vnd.docker.distribution.manifest.v2+json",
        1000,
    );
    hub.push("carol/private", "1", &image);
    hub.make_private("carol/private");
    let running = start(&[
        ("PULLTHROUGH_UPSTREAM", &hub.url),
        ("PULLTHROUGH_UPSTREAM_USERNAME", "carol"),
        ("PULLTHROUGH_UPSTREAM_PASSWORD", "pw-s3cr3t-right"),
        ("PULLTHROUGH_ADMIN_TOKEN", "admin-s3cr3t-token-42"),
        ("RUST_LOG", "trace"),
    ])
    .await;
    let url = running.url.clone();
    let client = support::client();
    let r = client
        .get(format!("{url}/v2/carol/private/manifests/1"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let blob = support::hub::sha256(&image.blobs[1]);
    let r = client
        .get(format!("{url}/v2/carol/private/blobs/{blob}"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.bytes().await.unwrap(), image.blobs[1]);
    let mut api = String::new();
    for path in [
        "/_pullthrough/cache",
        "/_pullthrough/stats",
        "/_pullthrough/cache/carol/private/manifests/1?explain=pull",
        "/metrics",
        "/",
    ] {
        let r = client
            .get(format!("{url}{path}"))
            .bearer_auth("admin-s3cr3t-token-42")
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 200, "{path}");
        api.push_str(&r.text().await.unwrap());
    }
    assert!(api.contains("carol/private"), "the API shows the entry");
    assert!(
        hub.count("token_with_credentials") > 0,
        "tokens were requested with the password"
    );
    let all = format!(
        "{}\n{api}",
        running.quiet_log(Duration::from_millis(300)).await
    );
    for secret in ["pw-s3cr3t-right", "admin-s3cr3t-token-42", "Y2Fyb2w6"] {
        assert!(!all.contains(secret), "{secret} appeared in the output");
    }
    // The emulator's tokens are tok<n>.
    let issued = all
        .split(|c: char| !c.is_ascii_alphanumeric())
        .filter(|w| {
            w.len() > 3 && w.starts_with("tok") && w[3..].bytes().all(|b| b.is_ascii_digit())
        })
        .count();
    assert_eq!(issued, 0, "a bearer token appeared in the output");
}

#[tokio::test]
async fn the_first_braking_of_an_address_logs_one_warning() {
    let dir = tempfile::tempdir().unwrap();
    let htpasswd = dir.path().join("htpasswd");
    let hash = bcrypt::hash("alice-pw", 4).unwrap();
    std::fs::write(&htpasswd, format!("alice:{hash}\n")).unwrap();
    let mut running = start(&[("PULLTHROUGH_HTPASSWD", htpasswd.to_str().unwrap())]).await;
    let url = running.url.clone();
    let client = support::client();
    let mut statuses = Vec::new();
    for i in 0..15 {
        use base64::Engine as _;
        let auth = base64::engine::general_purpose::STANDARD.encode(format!("alice:guess-{i}"));
        let r = client
            .get(format!("{url}/v2/"))
            .header("authorization", format!("Basic {auth}"))
            .send()
            .await
            .unwrap();
        statuses.push(r.status().as_u16());
    }
    assert_eq!(
        statuses.iter().filter(|s| **s == 429).count(),
        5,
        "{statuses:?}"
    );
    let warning = running.line("too many failed logins").await;
    assert!(
        warning.contains("WARN") && warning.contains("127.0.0.1"),
        "{warning}"
    );
    assert!(
        !warning.contains("guess"),
        "no password in the log: {warning}"
    );
    let all = running.quiet_log(Duration::from_millis(500)).await;
    assert_eq!(
        all.matches("too many failed logins").count(),
        1,
        "one warning, not one per refusal: {all}"
    );
}

#[tokio::test]
async fn the_access_log_names_the_upstream_and_keeps_the_query_without_secrets() {
    let hub = FakeHub::start().await;
    let image = Image::single("logged", support::DOCKER_MANIFEST, 100);
    hub.push("library/logged", "1", &image);
    let mut running = start(&[("PULLTHROUGH_UPSTREAM", hub.url.as_str())]).await;
    let url = running.url.clone();
    // One startup line per upstream: host, URL, credentials, tags.
    let startup = match running
        .lines()
        .into_iter()
        .find(|l| l.contains(" upstream ") && l.contains("credentials="))
    {
        Some(line) => line,
        None => running.line("credentials=").await,
    };
    assert!(
        startup.contains(&format!("url={}", hub.url)) && startup.contains("credentials=false"),
        "{startup}"
    );
    let client = support::client();
    for path in ["/healthz", "/readyz", "/metrics"] {
        let r = client.get(format!("{url}{path}")).send().await.unwrap();
        assert_eq!(r.status(), 200);
    }
    let r = client
        .get(format!(
            "{url}/v2/library/logged/manifests/1?ns=docker.io&access_token=s3cr3t"
        ))
        .header("x-request-id", "trace-text-1")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let line = running.line("path=\"/v2/library/logged").await;
    assert!(
        line.contains("?ns=docker.io&access_token=<redacted>") && !line.contains("s3cr3t"),
        "{line}"
    );
    let host = hub.url.trim_start_matches("http://");
    assert!(line.contains(&format!("upstream=\"{host}\"")), "{line}");
    // The line as tracing's default format writes the event, in its request's span.
    assert!(
        line.contains(
            " INFO request{request_id=\"trace-text-1\"}: pullthrough::http::observe: request method=GET path=\"/v2/library/logged/manifests/1?"
        ) && line.contains(" status=200 upstream=") && line.contains(" cache=\"MISS\" upstream_ms="),
        "{line}"
    );
    let all = running.quiet_log(Duration::from_millis(300)).await;
    for probe in ["/healthz", "/readyz", "/metrics"] {
        assert!(
            !all.contains(probe),
            "{probe} is logged at debug only: {all}"
        );
    }
}

/// A GET of `path` from the running binary.
async fn get(running: &Running, path: &str) -> reqwest::Response {
    support::client()
        .get(format!("{}{path}", running.url))
        .send()
        .await
        .unwrap()
}

/// The first line of the whole log (startup included) that contains `needle`, within 10 s.
async fn logged(running: &Running, needle: &str) -> String {
    let mut found = None;
    support::eventually(Duration::from_secs(10), async || {
        found = running.lines().into_iter().find(|l| l.contains(needle));
        found.is_some()
    })
    .await;
    found.unwrap_or_else(|| panic!("no log line with {needle:?}; saw {:#?}", running.lines()))
}

#[tokio::test]
async fn a_failed_request_logs_its_cause_chain_in_words() {
    let dead = format!("http://127.0.0.1:{}", support::free_port());
    let mut running = start(&[("PULLTHROUGH_UPSTREAM", &dead)]).await;
    let url = running.url.clone();
    let r = support::client()
        .get(format!("{url}/v2/library/x/manifests/1"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 502);
    let line = running.line("request failed").await;
    // Display with sources, from the class down to the operating system's words; never the
    // Debug form of the error types.
    assert!(
        line.contains("upstream registry failed: upstream unreachable: connection refused: "),
        "{line}"
    );
    assert!(line.contains("Connection refused"), "{line}");
    assert!(
        !line.contains("Unreachable {") && !line.contains("Upstream("),
        "{line}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn startup_says_whether_each_upstream_answered_without_waiting_for_it() {
    let hub = FakeHub::start().await;
    let running = start(&[("PULLTHROUGH_UPSTREAM", &hub.url)]).await;
    let line = logged(&running, "upstream answered").await;
    assert!(
        line.contains("INFO") && line.contains("host=127.0.0.1:"),
        "{line}"
    );
    assert_eq!(hub.count("ping"), 1, "the one ping it costs, done early");
    // A first miss needs no second ping.
    let r = get(&running, "/v2/library/none/manifests/1").await;
    assert_eq!(r.status(), 404);
    assert_eq!(hub.count("ping"), 1);

    let dead = format!("http://127.0.0.1:{}", support::free_port());
    let running = start(&[("PULLTHROUGH_UPSTREAM", &dead)]).await;
    let line = logged(&running, "upstream did not answer").await;
    assert!(line.contains("WARN"), "{line}");
    assert!(line.contains("connection refused"), "{line}");
    // Readiness does not wait for upstream.
    let ready = get(&running, "/readyz").await;
    assert_eq!(ready.status(), 200);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_log_reader_that_stalls_does_not_stall_requests() {
    let hub = FakeHub::start().await;
    hub.push(
        "library/stall",
        "1",
        &support::Image::single("stall", support::DOCKER_MANIFEST, 10),
    );
    let dir = tempfile::tempdir().unwrap();
    let port = support::free_port();
    // Standard output is a pipe nobody reads: once its 64 KiB are full, a worker writing its
    // access-log line there itself would wait, and every request with it.
    let mut child = std::process::Command::new(env!("CARGO_BIN_EXE_pullthrough"))
        .env_clear()
        .env("PULLTHROUGH_UPSTREAM", &hub.url)
        .env("PULLTHROUGH_DATA_DIR", dir.path())
        .env("PULLTHROUGH_LISTEN", format!("127.0.0.1:{port}"))
        .env("RUST_LOG", "pullthrough=info")
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let unread = child.stdout.take();
    let url = format!("http://127.0.0.1:{port}");
    let client = support::client();
    let up = support::eventually(Duration::from_secs(30), async || {
        client.get(format!("{url}/healthz")).send().await.is_ok()
    })
    .await;
    assert!(up, "pullthrough did not come up");
    let path = format!("{url}/v2/library/stall/manifests/1");
    // About 3,000 access-log lines: several times what the pipe holds.
    let served = tokio::time::timeout(Duration::from_secs(60), async {
        for _ in 0..3000 {
            let r = client
                .get(&path)
                .header("accept", support::FULL_ACCEPT)
                .send()
                .await
                .unwrap();
            assert_eq!(r.status(), 200);
        }
    })
    .await;
    let _ = child.kill();
    let _ = child.wait();
    drop(unread);
    assert!(served.is_ok(), "requests stalled behind an unread log");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn started_offline_it_says_so_and_asks_nothing() {
    let hub = FakeHub::start().await;
    let running = start(&[
        ("PULLTHROUGH_UPSTREAM", &hub.url),
        ("PULLTHROUGH_OFFLINE", "true"),
    ])
    .await;
    let line = logged(&running, "offline: no upstream is asked").await;
    assert!(line.contains("WARN"), "{line}");
    let r = get(&running, "/v2/library/none/manifests/1").await;
    assert_eq!(r.status(), 503);
    // Offline by choice: the access log's 503 is the only line about it, not a WARN.
    let line = logged(&running, "status=503").await;
    assert!(line.contains(" INFO "), "{line}");
    let lines = running.lines();
    assert!(
        !lines.iter().any(|l| l.contains("request failed")),
        "{lines:#?}"
    );
    let ready = get(&running, "/readyz").await;
    assert_eq!(ready.status(), 200);
    assert_eq!(
        hub.total() + hub.count("ping"),
        0,
        "nothing asked, not even a ping"
    );
}
