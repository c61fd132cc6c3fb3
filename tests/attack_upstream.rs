//! Attacks from the upstream side: resumes that overrun or misplace a blob, absurd
//! `Retry-After` values, registry 400s, a slow `/v2/` ping, a token realm that redirects
//! credentials to another host, a private blob shared while it downloads, manifest, tags and
//! token requests redirected to an address upstream chose, manifest answers that are not of a
//! manifest type, token realms on private or link-local addresses, and a manifest body that
//! stalls half way. Each test states the required behaviour; each failed on the code it was
//! written against.

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::too_many_lines,
    reason = "a test panics on what it did not expect, and may read as one long story"
)]

mod support;

use axum::http::Method;
use bytes::Bytes;
use futures_util::StreamExt;
use pullthrough::config::Secret;
use std::sync::Arc;
use std::time::Duration;
use support::hostile::{Hostile, Recorded, json_error, respond, stream, unauthorized};
use support::hub::{pattern, sha256};
use support::{FakeHub, Fault, Image, TestProxy, error_code};

use support::DOCKER_MANIFEST;
/// Every test ends: a hang on broken code fails instead.
const TEST_LIMIT: Duration = Duration::from_secs(60);

fn manifest_response(image: &Image) -> axum::response::Response {
    respond(
        200,
        &[
            ("content-type", image.media_type.as_str()),
            ("docker-content-digest", image.digest.as_str()),
        ],
        image.bytes.clone(),
    )
}

const SIZE: usize = 4 * 1024 * 1024;
const HALF: usize = SIZE / 2;
const BLOB_PATH: &str = "/v2/acme/app/blobs/";

/// How upstream answers the resume (`Range: bytes=HALF-`): its body is streamed in 64 KiB
/// pieces 10 ms apart, ending 200 ms after the last.
struct Resume {
    label: &'static str,
    status: u16,
    content_range: Option<String>,
    /// Send `Content-Length` (else the body is chunked, its end known only when it comes).
    length: bool,
    body: Vec<u8>,
}

/// Two clients GET a blob whose first upstream body breaks off at half, then upstream answers
/// the resume as `resume` says; later requests get the right blob. Neither client may complete
/// a transfer (the resume does not fit), and nothing may be stored.
async fn bad_resume(resume: Resume) {
    let label = resume.label;
    let blob = Bytes::from(pattern("overrun", SIZE));
    let digest = sha256(&blob);
    let up = Hostile::start().await;
    up.answer_ping(Duration::ZERO, None);
    let good = blob.clone();
    let resume_body = Bytes::from(resume.body);
    up.on(Method::GET, BLOB_PATH, move |_, n| {
        let octets = ("content-type", "application/octet-stream");
        let (size, resume_len) = (SIZE.to_string(), resume_body.len().to_string());
        match n {
            // Slow enough that the second client joins before the break.
            1 => respond(
                200,
                &[octets, ("content-length", &size)],
                stream(
                    good.clone(),
                    64 * 1024,
                    Duration::from_millis(10),
                    Some(HALF),
                ),
            ),
            2 => {
                let mut headers = vec![octets];
                if let Some(range) = &resume.content_range {
                    headers.push(("content-range", range));
                }
                if resume.length {
                    headers.push(("content-length", &resume_len));
                }
                let body = stream(
                    resume_body.clone(),
                    64 * 1024,
                    Duration::from_millis(10),
                    None,
                );
                respond(resume.status, &headers, body)
            }
            _ => respond(200, &[octets, ("content-length", &size)], good.clone()),
        }
    });
    let proxy = TestProxy::start_for(&up.url, |_| {}).await;
    let url = format!("{}{BLOB_PATH}{digest}", proxy.url);
    let clients: Vec<_> = (0..2)
        .map(|_| {
            let (client, url) = (proxy.client.clone(), url.clone());
            tokio::spawn(async move {
                let r = client.get(url).send().await.unwrap();
                let status = r.status().as_u16();
                let mut body = r.bytes_stream();
                let mut got = Vec::new();
                while let Some(chunk) = body.next().await {
                    match chunk {
                        Ok(c) => got.extend_from_slice(&c),
                        Err(_) => return (status, got, false),
                    }
                }
                (status, got, true)
            })
        })
        .collect();
    for (i, client) in clients.into_iter().enumerate() {
        let (status, got, complete) = client.await.unwrap();
        assert_eq!(status, 200, "{label}: client {i}");
        assert!(
            !complete || got.len() != SIZE || got == blob,
            "{label}: client {i} received a complete {SIZE}-byte body that is not the blob"
        );
        assert!(
            !complete,
            "{label}: client {i} completed a {}-byte transfer (the blob: {}) although the \
             resume did not fit; it must abort",
            got.len(),
            got == blob
        );
    }
    let gets: Vec<Recorded> = up
        .requests()
        .into_iter()
        .filter(|r| r.method == Method::GET && r.path.starts_with(BLOB_PATH))
        .collect();
    assert_eq!(gets.len(), 2, "{label}: one GET and one resume");
    // The resume asks for exactly the missing rest.
    assert_eq!(
        gets[1].header("range"),
        format!("bytes={HALF}-{}", SIZE - 1),
        "{label}"
    );

    // Nothing was stored: once the download is over, with upstream fixed, the next GET
    // downloads again and is right.
    support::settled(&proxy).await;
    let r = proxy.get(&format!("{BLOB_PATH}{digest}")).await;
    assert_eq!(r.status(), 200, "{label}");
    assert_eq!(
        r.headers()["x-cache"],
        "MISS",
        "{label}: nothing was stored"
    );
    assert_eq!(r.bytes().await.unwrap(), blob, "{label}");
    assert_eq!(up.count(Method::GET, BLOB_PATH), 3, "{label}");
}

fn junk(n: usize) -> Vec<u8> {
    pattern("junk", n)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_resume_longer_than_the_missing_rest_aborts_and_nothing_is_stored() {
    tokio::time::timeout(TEST_LIMIT, async {
        let blob = pattern("overrun", SIZE);
        let rest = || blob[HALF..].to_vec();
        let right_range = Some(format!("bytes {HALF}-{}/{SIZE}", SIZE - 1));
        let cases = [
            Resume {
                label: "junk before the rest",
                status: 206,
                content_range: right_range.clone(),
                length: false,
                body: [junk(1000), rest()].concat(),
            },
            Resume {
                label: "body starting 1000 bytes early",
                status: 206,
                content_range: right_range.clone(),
                length: false,
                body: blob[HALF - 1000..].to_vec(),
            },
            Resume {
                label: "the rest, then 1 MiB of junk, Content-Length saying so",
                status: 206,
                content_range: right_range.clone(),
                length: true,
                body: [rest(), junk(1024 * 1024)].concat(),
            },
            Resume {
                label: "Content-Range naming a longer blob",
                status: 206,
                content_range: Some(format!("bytes {HALF}-{}/{}", SIZE + 999, SIZE + 1000)),
                length: false,
                body: [rest(), junk(1000)].concat(),
            },
        ];
        for resume in cases {
            bad_resume(resume).await;
        }
    })
    .await
    .expect("test hung");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_resume_at_the_wrong_offset_aborts_and_nothing_is_stored() {
    tokio::time::timeout(TEST_LIMIT, async {
        let blob = pattern("overrun", SIZE);
        let (early, late) = (HALF - 1000, HALF + 1000);
        let cases = [
            Resume {
                label: "honest range starting 1000 bytes early",
                status: 206,
                content_range: Some(format!("bytes {early}-{}/{SIZE}", SIZE - 1)),
                length: true,
                body: blob[early..].to_vec(),
            },
            Resume {
                label: "range starting 1000 bytes early, body of junk and the rest",
                status: 206,
                content_range: Some(format!("bytes {early}-{}/{SIZE}", SIZE - 1)),
                length: false,
                body: [junk(1000), blob[HALF..].to_vec()].concat(),
            },
            Resume {
                label: "range starting 1000 bytes late, padded past the end",
                status: 206,
                content_range: Some(format!("bytes {late}-{}/{SIZE}", SIZE + 999)),
                length: false,
                body: [blob[late..].to_vec(), junk(2000)].concat(),
            },
            Resume {
                label: "200 (whole blob) whose body starts 1000 bytes off",
                status: 200,
                content_range: None,
                length: false,
                body: [junk(1000), blob.clone()].concat(),
            },
        ];
        for resume in cases {
            bad_resume(resume).await;
        }
    })
    .await
    .expect("test hung");
}

/// `up` answers its ping, and acme/app's manifests, with a challenge naming `realm`, and
/// serves `image` as those manifests to requests that carry `Bearer <token>`.
fn challenge_with(up: &Hostile, realm: &str, image: &Image, token: &str) {
    let challenge = format!(r#"Bearer realm="{realm}",service="hostile""#);
    up.answer_ping(Duration::ZERO, Some(challenge.clone()));
    let (served, expected) = (image.clone(), format!("Bearer {token}"));
    up.on(Method::GET, "/v2/acme/app/manifests/", move |r, _| {
        if r.header("authorization") == expected {
            manifest_response(&served)
        } else {
            unauthorized(&format!(r#"{challenge},scope="repository:acme/app:pull""#))
        }
    });
}

/// A token endpoint's answer granting `token`.
fn token_json(token: &str) -> axum::response::Response {
    respond(
        200,
        &[("content-type", "application/json")],
        format!(r#"{{"token":"{token}","expires_in":300}}"#),
    )
}

#[tokio::test]
async fn an_absurd_retry_after_pauses_at_most_an_hour_and_breaks_nothing() {
    tokio::time::timeout(TEST_LIMIT, async {
        for retry_after in [u64::MAX, 99_999_999_999] {
            let hub = FakeHub::start().await;
            let a = Image::single("pause-a", DOCKER_MANIFEST, 1000);
            hub.push("acme/a", "1", &a);
            hub.push(
                "acme/b",
                "1",
                &Image::single("pause-b", DOCKER_MANIFEST, 1000),
            );
            let proxy = TestProxy::start(&hub).await;
            hub.fault(Fault::TooMany(retry_after));

            let r = proxy.get("/v2/acme/a/manifests/1").await;
            assert_eq!(r.status(), 429, "Retry-After {retry_after}: the 429 itself");

            // (a) The pause holds, bounded by max_upstream_pause (1 h by default).
            let r = proxy.get("/v2/acme/b/manifests/1").await;
            assert_eq!(r.status(), 429, "Retry-After {retry_after}: paused");
            let secs: u64 = support::retry_after(&r);
            assert!(
                (1..=3600).contains(&secs),
                "Retry-After {retry_after}: paused for {secs} s"
            );
            assert_eq!(error_code(r).await, "TOOMANYREQUESTS");
            assert_eq!(
                hub.count("manifest_get"),
                1,
                "Retry-After {retry_after}: the paused GET stayed here"
            );

            // (b) Tags lists and blobs do not count against pulls: they still work.
            let r = proxy.get("/v2/acme/a/tags/list").await;
            assert_eq!(r.status(), 200, "Retry-After {retry_after}: tags list");
            let tags: serde_json::Value = r.json().await.unwrap();
            assert_eq!(tags["tags"], serde_json::json!(["1"]));
            let layer = &a.blobs[1];
            let got = proxy
                .get_ok(&format!("/v2/acme/a/blobs/{}", sha256(layer)))
                .await;
            assert_eq!(got, *layer, "Retry-After {retry_after}: blob");
        }
    })
    .await
    .expect("test hung");
}

#[tokio::test]
async fn an_upstream_400_reaches_the_client_as_400_with_its_code() {
    tokio::time::timeout(TEST_LIMIT, async {
        let up = Hostile::start().await;
        up.answer_ping(Duration::ZERO, None);
        let with_code = format!("/v2/acme/app/manifests/sha512:{}", "a".repeat(128));
        let plain = format!("/v2/acme/app/manifests/sha512:{}", "b".repeat(128));
        up.on(Method::GET, &with_code, |_, _| {
            json_error(400, "DIGEST_INVALID", "unsupported digest algorithm")
        });
        up.on(Method::GET, &plain, |_, _| {
            respond(400, &[("content-type", "text/plain")], "bad request")
        });
        let proxy = TestProxy::start_for(&up.url, |_| {}).await;

        let r = proxy.get(&with_code).await;
        assert_eq!(r.status(), 400);
        assert_eq!(error_code(r).await, "DIGEST_INVALID");
        let r = proxy.get(&plain).await;
        assert_eq!(r.status(), 400, "a 400 without a registry body");
        assert_eq!(
            (
                up.count(Method::GET, &with_code),
                up.count(Method::GET, &plain)
            ),
            (1, 1)
        );
    })
    .await
    .expect("test hung");
}

#[tokio::test]
async fn a_slow_ping_still_maps_single_component_names_to_library() {
    tokio::time::timeout(TEST_LIMIT, async {
        let up = Hostile::start().await;
        let challenge = format!(
            r#"Bearer realm="{}/token",service="registry.docker.io""#,
            up.url
        );
        up.answer_ping(Duration::from_secs(3), Some(challenge.clone()));
        up.on(Method::GET, "/token", |_, _| {
            respond(
                200,
                &[("content-type", "application/json")],
                r#"{"token":"t1","expires_in":300}"#,
            )
        });
        let image = Image::single("alpine", DOCKER_MANIFEST, 1000);
        let served = image.clone();
        up.on(Method::GET, "/v2/library/alpine/manifests/", move |r, _| {
            if r.header("authorization") == "Bearer t1" {
                manifest_response(&served)
            } else {
                unauthorized(&format!(
                    r#"{challenge},scope="repository:library/alpine:pull""#
                ))
            }
        });
        let proxy =
            TestProxy::start_for(&up.url, |c| c.upstream_deadline = Duration::from_secs(10)).await;

        let r = proxy.get("/v2/alpine/manifests/latest").await;
        let status = r.status();
        let body = r.bytes().await.unwrap();
        let asked: Vec<String> = up.requests().into_iter().map(|r| r.path).collect();
        assert_eq!(status, 200, "upstream was asked {asked:?}");
        assert_eq!(body, image.bytes);
        assert!(
            !asked.iter().any(|p| p.starts_with("/v2/alpine/")),
            "a one-component name reached Docker Hub unmapped: {asked:?}"
        );
        assert_eq!(
            up.count(Method::GET, "/v2/library/alpine/manifests/latest"),
            1
        );
    })
    .await
    .expect("test hung");
}

#[tokio::test]
async fn a_token_realm_redirect_never_carries_the_password_to_another_host() {
    tokio::time::timeout(TEST_LIMIT, async {
        const PASSWORD: &str = "hunter2-s3cr3t";
        let (up, realm, thief) = (
            Hostile::start().await,
            Hostile::start().await,
            Hostile::start().await,
        );
        // The realm is on the upstream's own host (so trusted), another port.
        let image = Image::single("redirect", DOCKER_MANIFEST, 1000);
        let token_url = format!("http://127.0.0.1:{}/token", realm.port);
        challenge_with(&up, &token_url, &image, "good");
        // "localhost" is another host than "127.0.0.1" as far as credentials go.
        let steal = format!("http://localhost:{}/steal", thief.port);
        realm.on(Method::POST, "/token", move |_, _| {
            respond(307, &[("location", steal.as_str())], "")
        });
        realm.on(Method::GET, "/token", |_, _| token_json("good"));
        let proxy = TestProxy::start_for(&up.url, |c| {
            c.upstream_username = Some("alice".into());
            c.upstream_password = Some(Secret(PASSWORD.into()));
        })
        .await;

        let status = proxy.get("/v2/acme/app/manifests/1").await.status();
        assert!(
            realm.count(Method::POST, "/token") >= 1,
            "the OAuth2 POST was tried (client got {status})"
        );
        let stolen: Vec<Recorded> = thief
            .requests()
            .into_iter()
            .filter(|r| carries(r, PASSWORD))
            .collect();
        assert!(
            stolen.is_empty(),
            "the password reached another host ({} request(s) there in all): {stolen:?}",
            thief.requests().len()
        );
    })
    .await
    .expect("test hung");
}

/// Whether `secret` appears anywhere in a request: path, query, headers (Basic decoded), body.
fn carries(r: &Recorded, secret: &str) -> bool {
    use base64::Engine as _;
    let encoded: String = url::form_urlencoded::byte_serialize(secret.as_bytes()).collect();
    let text = |b: &[u8]| {
        let s = String::from_utf8_lossy(b);
        s.contains(secret) || s.contains(&encoded)
    };
    text(r.path.as_bytes())
        || text(&r.body)
        || r.headers.values().any(|v| {
            let v = v.as_bytes();
            text(v)
                || v.strip_prefix(b"Basic ").is_some_and(|b| {
                    base64::engine::general_purpose::STANDARD
                        .decode(b)
                        .is_ok_and(|d| text(&d))
                })
        })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_private_blob_being_downloaded_is_not_served_for_another_repository() {
    tokio::time::timeout(TEST_LIMIT, async {
        let hub = FakeHub::start().await;
        let secret = Bytes::from(pattern("private-layer", 2 * 1024 * 1024));
        let digest = hub.push_blob("private/secret", secret.clone());
        hub.make_private("private/secret");
        hub.push(
            "public/y",
            "1",
            &Image::single("public", DOCKER_MANIFEST, 1000),
        );
        hub.add_user("alice", "s3cret");
        // 32 chunks of 64 KiB, 40 ms apart: the download takes over a second.
        hub.fault(Fault::SlowBlob(Duration::from_millis(40)));
        let proxy = TestProxy::start_with(&hub, |c| {
            c.upstream_username = Some("alice".into());
            c.upstream_password = Some(Secret("s3cret".into()));
        })
        .await;

        let private = proxy
            .get(&format!("/v2/private/secret/blobs/{digest}"))
            .await;
        assert_eq!(private.status(), 200);
        let mut private = private.bytes_stream();
        let mut got = private.next().await.unwrap().unwrap().to_vec();

        let public_path = format!("/v2/public/y/blobs/{digest}");
        let r = proxy.get(&public_path).await;
        let status = r.status();
        let body = r.bytes().await.unwrap_or_default();
        assert_eq!(
            status,
            404,
            "public/y was answered from the private download ({} bytes)",
            body.len()
        );
        let error: serde_json::Value = serde_json::from_slice(&body).unwrap();
        assert_eq!(error["errors"][0]["code"], "BLOB_UNKNOWN");

        while let Some(chunk) = private.next().await {
            got.extend_from_slice(&chunk.unwrap());
        }
        assert_eq!(got, secret, "the private client got its blob");
        support::settled(&proxy).await;

        // Stored now: public/y is still refused, after asking upstream again.
        let asked = hub.count("blob_head") + hub.count("blob_get");
        let r = proxy.get(&public_path).await;
        assert_eq!(r.status(), 404, "public/y served from the store");
        assert_eq!(error_code(r).await, "BLOB_UNKNOWN");
        assert!(
            hub.count("blob_head") + hub.count("blob_get") > asked,
            "upstream was asked about public/y"
        );
    })
    .await
    .expect("test hung");
}

#[tokio::test]
async fn a_blob_announced_empty_is_never_answered_before_it_verified() {
    tokio::time::timeout(TEST_LIMIT, async {
        let blob = Bytes::from(pattern("announced-empty", 100_000));
        let digest = sha256(&blob);
        let up = Hostile::start().await;
        up.answer_ping(Duration::ZERO, None);
        // A Content-Length of 0 for a digest whose content is not empty.
        up.on_async(Method::GET, BLOB_PATH, |_, _| async {
            // An upstream that takes its time to answer.
            tokio::time::sleep(Duration::from_millis(50)).await;
            respond(
                200,
                &[
                    ("content-type", "application/octet-stream"),
                    ("content-length", "0"),
                ],
                "",
            )
        });
        let proxy = TestProxy::start_for(&up.url, |_| {}).await;
        let r = proxy.get(&format!("{BLOB_PATH}{digest}")).await;
        assert_eq!(r.status(), 502, "an empty body cannot be the blob");
        assert_eq!(error_code(r).await, "UNAVAILABLE");
    })
    .await
    .expect("test hung");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn requests_arriving_as_a_download_is_stored_never_get_404() {
    tokio::time::timeout(TEST_LIMIT, async {
        for round in 0..8 {
            const SIZE: usize = 256 * 1024;
            let blob = Bytes::from(pattern(&format!("store-gap-{round}"), SIZE));
            let digest = sha256(&blob);
            let up = Hostile::start().await;
            up.answer_ping(Duration::ZERO, None);
            let data = blob.clone();
            // Four chunks 5 ms apart, and the hostile stream's 200 ms pause before its end: the
            // download is stored about 220 ms after it starts.
            up.on(Method::GET, BLOB_PATH, move |_, _| {
                respond(
                    200,
                    &[
                        ("content-type", "application/octet-stream"),
                        ("content-length", &SIZE.to_string()),
                    ],
                    stream(data.clone(), 64 * 1024, Duration::from_millis(5), None),
                )
            });
            let proxy = Arc::new(TestProxy::start_for(&up.url, |_| {}).await);
            let path = format!("{BLOB_PATH}{digest}");
            let mut tasks = Vec::new();
            // 300 requests within 45 ms join one short download: on 2 cores some reach its temp
            // file only after it was renamed into the store (this timing makes the old code
            // answer 404; checked by reverting the fix).
            for i in 0..300u64 {
                let (proxy, path, blob) = (proxy.clone(), path.clone(), blob.clone());
                tasks.push(tokio::spawn(async move {
                    tokio::time::sleep(Duration::from_micros(190_000 + 150 * i)).await;
                    let r = proxy.get(&path).await;
                    let status = r.status().as_u16();
                    if status == 200 {
                        assert_eq!(r.bytes().await.unwrap(), blob);
                    }
                    status
                }));
            }
            for t in tasks {
                assert_eq!(t.await.unwrap(), 200, "round {round}");
            }
            assert_eq!(up.count(Method::GET, BLOB_PATH), 1, "round {round}");
        }
    })
    .await
    .expect("test hung");
}

/// Status and registry error message of a response.
async fn status_and_message(r: reqwest::Response) -> (u16, String) {
    let status = r.status().as_u16();
    let body: serde_json::Value = r.json().await.unwrap_or_default();
    let message = body["errors"][0]["message"].as_str().unwrap_or_default();
    (status, message.to_owned())
}

#[tokio::test]
async fn a_manifest_or_tags_redirect_is_never_followed_nor_stored() {
    tokio::time::timeout(TEST_LIMIT, async {
        let (up, secret) = (Hostile::start().await, Hostile::start().await);
        up.answer_ping(Duration::ZERO, None);
        secret.on(Method::GET, "/secret", |_, _| {
            respond(200, &[("content-type", "text/plain")], "root:s3cr3t")
        });
        secret.on(Method::HEAD, "/secret", |_, _| {
            respond(200, &[("content-type", "text/plain")], "")
        });
        let to_secret = format!("{}/secret", secret.url);
        for (method, path) in [
            (Method::GET, "/v2/acme/app/manifests/"),
            (Method::HEAD, "/v2/acme/app/manifests/"),
            (Method::GET, "/v2/acme/app/tags/list"),
        ] {
            let location = to_secret.clone();
            up.on(method, path, move |_, _| {
                respond(302, &[("location", location.as_str())], "")
            });
        }
        let proxy = TestProxy::start_for(&up.url, |_| {}).await;

        let digest = format!("sha256:{}", "c".repeat(64));
        for round in 1..=2 {
            for (path, what) in [
                ("/v2/acme/app/manifests/1".to_owned(), "manifest"),
                (format!("/v2/acme/app/manifests/{digest}"), "manifest"),
                ("/v2/acme/app/tags/list".to_owned(), "tags list"),
            ] {
                let (status, message) = status_and_message(proxy.get(&path).await).await;
                assert_eq!(status, 502, "round {round} {path}: {message}");
                assert!(
                    message.contains(&format!("upstream redirected a {what} request")),
                    "round {round} {path}: {message}"
                );
            }
            let r = proxy.head("/v2/acme/app/manifests/2").await;
            assert_eq!(r.status(), 502, "round {round}: HEAD");
        }
        // Nothing was stored: the second round asked upstream again.
        assert_eq!(up.count(Method::GET, "/v2/acme/app/manifests/"), 4);
        assert_eq!(up.count(Method::GET, "/v2/acme/app/tags/list"), 2);
        assert!(up.count(Method::HEAD, "/v2/acme/app/manifests/2") >= 2);
        assert!(
            secret.requests().is_empty(),
            "the redirect target was asked: {:?}",
            secret.requests()
        );
    })
    .await
    .expect("test hung");
}

#[tokio::test]
async fn a_manifest_answer_that_is_not_a_manifest_type_is_refused_and_not_stored() {
    tokio::time::timeout(TEST_LIMIT, async {
        let up = Hostile::start().await;
        up.answer_ping(Duration::ZERO, None);
        let image = Image::single("as-text", DOCKER_MANIFEST, 1000);
        for (repo, content_type) in [("text", "text/plain"), ("html", "text/html; charset=utf-8")] {
            let served = image.clone();
            up.on(
                Method::GET,
                &format!("/v2/acme/{repo}/manifests/"),
                move |_, _| {
                    respond(
                        200,
                        &[
                            ("content-type", content_type),
                            ("docker-content-digest", served.digest.as_str()),
                        ],
                        served.bytes.clone(),
                    )
                },
            );
        }
        let proxy = TestProxy::start_for(&up.url, |_| {}).await;

        for repo in ["text", "html"] {
            for round in 1..=2 {
                for reference in ["1", image.digest.as_str()] {
                    let path = format!("/v2/acme/{repo}/manifests/{reference}");
                    let (status, message) = status_and_message(proxy.get(&path).await).await;
                    assert_eq!(status, 502, "round {round} {path}: {message}");
                    assert!(
                        message.contains("not a manifest type"),
                        "round {round} {path}: {message}"
                    );
                }
            }
            // Neither by tag nor by digest was it stored: each request asked upstream.
            let asked = up.count(Method::GET, &format!("/v2/acme/{repo}/manifests/"));
            assert_eq!(asked, 4, "{repo}");
        }
    })
    .await
    .expect("test hung");
}

#[tokio::test]
async fn a_manifest_without_a_manifest_content_type_is_typed_by_its_own_body() {
    tokio::time::timeout(TEST_LIMIT, async {
        const OCI_MANIFEST: &str = "application/vnd.oci.image.manifest.v1+json";
        let up = Hostile::start().await;
        up.answer_ping(Duration::ZERO, None);
        // Its own mediaType names it, and upstream sends no Content-Type at all.
        let named = Image::single("untyped", OCI_MANIFEST, 1000);
        // No mediaType (optional in OCI 1.0), sent as plain JSON: its shape is an OCI manifest.
        let shaped = Bytes::from_static(br#"{"schemaVersion":2,"config":{"mediaType":"application/vnd.oci.image.config.v1+json","size":2,"digest":"sha256:44136fa355b3678a1146ad16f7e8649e94fb4fc21fe77e8310c060f61caaff8a"},"layers":[]}"#);
        let (a, b) = (named.bytes.clone(), shaped.clone());
        up.on(Method::GET, "/v2/acme/named/manifests/", move |_, _| respond(200, &[], a.clone()));
        up.on(Method::GET, "/v2/acme/shaped/manifests/", move |_, _| {
            respond(200, &[("content-type", "application/json")], b.clone())
        });
        let proxy = TestProxy::start_for(&up.url, |_| {}).await;

        for (repo, bytes) in [("named", named.bytes.clone()), ("shaped", shaped)] {
            for round in 1..=2 {
                let r = proxy.get(&format!("/v2/acme/{repo}/manifests/1")).await;
                assert_eq!(r.status(), 200, "{repo} round {round}");
                assert_eq!(r.headers()["content-type"], OCI_MANIFEST, "{repo}");
                assert_eq!(r.bytes().await.unwrap(), bytes, "{repo}: the bytes as sent");
            }
            let asked = up.count(Method::GET, &format!("/v2/acme/{repo}/manifests/"));
            assert_eq!(asked, 1, "{repo}: stored");
        }
    })
    .await
    .expect("test hung");
}

/// Token requests counted by a proxy's metrics (any outcome, a failed connection included).
async fn token_requests(proxy: &TestProxy) -> f64 {
    support::metric(
        &support::scrape(proxy).await,
        "pullthrough_upstream_requests_total",
        &[("kind", "token")],
    )
}

#[tokio::test]
async fn a_token_realm_on_a_private_or_link_local_address_is_never_asked() {
    tokio::time::timeout(TEST_LIMIT, async {
        // The upstream is on loopback, so a loopback realm would be allowed; these are not.
        // None is ever connected to: the refusal comes before any connection.
        for realm in [
            "http://10.0.0.1/token",
            "http://169.254.169.254/latest/api/token",
            "http://[::ffff:169.254.169.254]/token",
            "http://[fd00:ec2::254]/token",
            "http://192.168.1.1:5001/token",
        ] {
            let up = Hostile::start().await;
            // No token is ever granted: the realm is refused before it is asked.
            let image = Image::single("refused-realm", DOCKER_MANIFEST, 10);
            challenge_with(&up, realm, &image, "never");
            let proxy = TestProxy::start_for(&up.url, |c| {
                c.upstream_username = Some("alice".into());
                c.upstream_password = Some(Secret("hunter2-s3cr3t".into()));
                // A connection attempt would hang this long, not fail fast.
                c.connect_timeout = Duration::from_secs(30);
            })
            .await;

            let started = std::time::Instant::now();
            let (status, message) =
                status_and_message(proxy.get("/v2/acme/app/manifests/1").await).await;
            assert_eq!(status, 502, "{realm}: {message}");
            assert!(
                message.contains("token realm") && message.contains("refused"),
                "{realm}: {message}"
            );
            assert!(
                started.elapsed() < Duration::from_secs(10),
                "{realm}: no connection wait"
            );
            assert_eq!(
                token_requests(&proxy).await,
                0.0,
                "{realm}: a token request was sent"
            );
        }
    })
    .await
    .expect("test hung");
}

#[tokio::test]
async fn a_token_realm_by_name_on_the_upstreams_kind_of_address_is_asked() {
    tokio::time::timeout(TEST_LIMIT, async {
        let (up, realm) = (Hostile::start().await, Hostile::start().await);
        // "localhost" resolves to loopback, as the upstream 127.0.0.1 is: allowed, and
        // connected to at the addresses checked.
        let image = Image::single("named-realm", DOCKER_MANIFEST, 1000);
        let token_url = format!("http://localhost:{}/token", realm.port);
        challenge_with(&up, &token_url, &image, "named");
        realm.on(Method::GET, "/token", |_, _| token_json("named"));
        let proxy = TestProxy::start_for(&up.url, |_| {}).await;

        let got = proxy.get_ok("/v2/acme/app/manifests/1").await;
        assert_eq!(got, image.bytes);
        assert_eq!(realm.count(Method::GET, "/token"), 1);
    })
    .await
    .expect("test hung");
}

#[tokio::test]
async fn a_token_endpoint_redirect_is_not_followed_even_on_its_own_host() {
    tokio::time::timeout(TEST_LIMIT, async {
        let (up, realm) = (Hostile::start().await, Hostile::start().await);
        let image = Image::single("token-redirect", DOCKER_MANIFEST, 1000);
        challenge_with(&up, &format!("{}/token", realm.url), &image, "moved");
        let moved = format!("{}/elsewhere", realm.url);
        realm.on(Method::GET, "/token", move |_, _| {
            respond(302, &[("location", moved.as_str())], "")
        });
        realm.on(Method::GET, "/elsewhere", |_, _| token_json("moved"));
        let proxy = TestProxy::start_for(&up.url, |_| {}).await;

        let (status, message) =
            status_and_message(proxy.get("/v2/acme/app/manifests/1").await).await;
        assert_eq!(status, 502, "{message}");
        assert!(message.contains("token endpoint redirected"), "{message}");
        assert!(realm.count(Method::GET, "/token") >= 1);
        assert_eq!(
            realm.count(Method::GET, "/elsewhere"),
            0,
            "the redirect was followed"
        );
    })
    .await
    .expect("test hung");
}

/// The whole exchange has a deadline, not only its silences: a body that stops half way, and
/// one that never stops arriving a byte at a time (20 s in all), each end at the 2 s request
/// timeout and give their upstream place back.
#[tokio::test]
async fn a_manifest_body_that_stalls_or_trickles_ends_at_the_request_timeout_and_frees_its_upstream_place()
 {
    tokio::time::timeout(TEST_LIMIT, async {
        let up = Hostile::start().await;
        up.answer_ping(Duration::ZERO, None);
        let fine = Image::single("fine", DOCKER_MANIFEST, 1000);
        // Headers (with the whole length), then half the body at once and nothing more.
        slow_manifest(&up, "stalled", |bytes| {
            let half = bytes.slice(..bytes.len() / 2);
            futures_util::stream::once(async move { Ok::<_, std::io::Error>(half) })
                .chain(futures_util::stream::pending())
                .boxed()
        });
        // Headers, then a byte every 20 ms.
        slow_manifest(&up, "trickled", |bytes| {
            futures_util::stream::unfold(0, move |at| {
                let bytes = bytes.clone();
                async move {
                    tokio::time::sleep(Duration::from_millis(20)).await;
                    (at < bytes.len()).then(|| (Ok(bytes.slice(at..=at)), at + 1))
                }
            })
            .boxed()
        });
        let served = fine.clone();
        up.on(Method::GET, "/v2/acme/fine/manifests/", move |_, _| {
            respond(
                200,
                &[
                    ("content-type", DOCKER_MANIFEST),
                    ("docker-content-digest", served.digest.as_str()),
                ],
                served.bytes.clone(),
            )
        });
        // One upstream place: the slow exchange holds it until its deadline.
        let proxy = TestProxy::start_for(&up.url, |c| {
            c.upstream_max_concurrency = 1;
            c.request_timeout = Duration::from_secs(2);
            c.upstream_deadline = Duration::from_secs(10);
        })
        .await;

        for repo in ["stalled", "trickled"] {
            let started = std::time::Instant::now();
            let (status, message) =
                status_and_message(proxy.get(&format!("/v2/acme/{repo}/manifests/1")).await).await;
            let took = started.elapsed();
            assert!(status >= 500, "{repo}: {status}: {message}");
            assert!(
                took >= Duration::from_millis(1500) && took < Duration::from_secs(8),
                "the {repo} body ended after {took:?}, not at the 2 s request timeout"
            );
            // Its place is free again: the next manifest goes out at once.
            let started = std::time::Instant::now();
            let r = proxy.get("/v2/acme/fine/manifests/1").await;
            assert_eq!(r.status(), 200);
            assert_eq!(r.bytes().await.unwrap(), fine.bytes);
            assert!(
                started.elapsed() < Duration::from_secs(1),
                "{repo}: {:?}",
                started.elapsed()
            );
            let path = format!("/v2/acme/{repo}/manifests/");
            assert_eq!(up.count(Method::GET, &path), 1, "{repo}");
        }
    })
    .await
    .expect("test hung");
}

/// Serves a manifest for `acme/<repo>` with its whole length announced and `body` making what
/// arrives of its bytes.
fn slow_manifest(
    up: &Hostile,
    repo: &str,
    body: impl Fn(Bytes) -> futures_util::stream::BoxStream<'static, std::io::Result<Bytes>>
    + Send
    + Sync
    + 'static,
) {
    let image = Image::single(repo, DOCKER_MANIFEST, 1000);
    up.on(
        Method::GET,
        &format!("/v2/acme/{repo}/manifests/"),
        move |_, _| {
            let length = image.bytes.len().to_string();
            respond(
                200,
                &[
                    ("content-type", DOCKER_MANIFEST),
                    ("content-length", length.as_str()),
                    ("docker-content-digest", image.digest.as_str()),
                ],
                axum::body::Body::from_stream(body(image.bytes.clone())),
            )
        },
    );
}

/// The connect timeout covers the whole connect, the TLS handshake included: an upstream that
/// accepts TCP connections and never answers a ClientHello costs a request `connect_timeout`
/// (1 s here) per attempt to connect, not `request_timeout` (20 s).
#[tokio::test]
async fn a_tls_handshake_that_never_ends_fails_at_the_connect_timeout() {
    tokio::time::timeout(TEST_LIMIT, async {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("https://{}", listener.local_addr().unwrap());
        let accepted = Arc::new(std::sync::atomic::AtomicU64::new(0));
        let counted = Arc::clone(&accepted);
        let silent = tokio::spawn(async move {
            let mut held = Vec::new();
            while let Ok((socket, _)) = listener.accept().await {
                counted.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                held.push(socket);
            }
        });
        let proxy = TestProxy::start_for(&url, |c| {
            c.connect_timeout = Duration::from_secs(1);
            c.request_timeout = Duration::from_secs(20);
            c.upstream_deadline = Duration::from_secs(30);
        })
        .await;

        let started = std::time::Instant::now();
        let (status, message) =
            status_and_message(proxy.get("/v2/acme/app/manifests/1").await).await;
        let took = started.elapsed();
        // The ping before it may take its own second (it is asked again after failing).
        assert!(status >= 500, "{status}: {message}");
        assert!(
            took >= Duration::from_millis(900) && took < Duration::from_secs(6),
            "the stalled handshake ended after {took:?}, not at the 1 s connect timeout"
        );
        assert!(accepted.load(std::sync::atomic::Ordering::SeqCst) >= 1);
        silent.abort();
    })
    .await
    .expect("test hung");
}

/// An HTTP/2 upstream that refuses a stream before acting on it (`REFUSED_STREAM`, RFC 9113
/// §8.7, as a server at its stream limit or going away does) has the request sent again, as
/// reqwest did for every request: the manifest is served, after one refusal.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stream_refused_by_an_http2_upstream_is_sent_again() {
    use std::sync::atomic::{AtomicU64, Ordering::SeqCst};
    tokio::time::timeout(TEST_LIMIT, async {
        let dir = tempfile::tempdir().unwrap();
        let (ca, cert, key) = support::ca_and_certificate("127.0.0.1");
        let image = Image::single("refused", DOCKER_MANIFEST, 300);
        let (asked, served) = (Arc::new(AtomicU64::new(0)), Arc::new(AtomicU64::new(0)));
        let url = h2_upstream(&cert, &key, {
            let (image, asked, served) = (image.clone(), asked.clone(), served.clone());
            move |path: &str, respond: &mut h2::server::SendResponse<Bytes>| {
                if path == "/v2/" {
                    return Some((200, "application/json", Bytes::from_static(b"{}")));
                }
                if path != "/v2/acme/app/manifests/1" {
                    return Some((404, "application/json", Bytes::new()));
                }
                if asked.fetch_add(1, SeqCst) == 0 {
                    respond.send_reset(h2::Reason::REFUSED_STREAM);
                    return None;
                }
                served.fetch_add(1, SeqCst);
                Some((200, DOCKER_MANIFEST, image.bytes.clone()))
            }
        })
        .await;
        let roots = dir.path().join("ca.pem");
        std::fs::write(&roots, &ca).unwrap();
        let proxy = support::binary::Pullthrough::new()
            .upstream(&url)
            .env("SSL_CERT_FILE", &roots)
            .start()
            .await;

        let answer = reqwest::Client::builder()
            .no_proxy()
            .build()
            .unwrap()
            .get(format!("{}/v2/acme/app/manifests/1", proxy.url))
            .header("accept", DOCKER_MANIFEST)
            .send()
            .await
            .unwrap();
        assert_eq!(answer.status(), 200);
        assert_eq!(
            answer.headers()["docker-content-digest"],
            image.digest.as_str()
        );
        assert_eq!(answer.bytes().await.unwrap(), image.bytes);
        assert_eq!(asked.load(SeqCst), 2, "refused once, then sent again");
        assert_eq!(served.load(SeqCst), 1);
    })
    .await
    .expect("test hung");
}

/// An HTTPS upstream speaking HTTP/2 only, with the PEM `cert` and `key`: `answer` gets each
/// request's path and either answers it (status, content type, body) or resets the stream
/// itself. Its URL.
async fn h2_upstream(
    cert: &str,
    key: &str,
    answer: impl Fn(&str, &mut h2::server::SendResponse<Bytes>) -> Option<(u16, &'static str, Bytes)>
    + Clone
    + Send
    + Sync
    + 'static,
) -> String {
    use rustls::pki_types::pem::PemObject;
    let certs = rustls::pki_types::CertificateDer::pem_slice_iter(cert.as_bytes())
        .collect::<Result<Vec<_>, _>>()
        .unwrap();
    let key = rustls::pki_types::PrivateKeyDer::from_pem_slice(key.as_bytes()).unwrap();
    let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
    let mut config = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_no_client_auth()
        .with_single_cert(certs, key)
        .unwrap();
    config.alpn_protocols = vec![b"h2".to_vec()];
    let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(config));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("https://{}", listener.local_addr().unwrap());
    tokio::spawn(async move {
        while let Ok((socket, _)) = listener.accept().await {
            let (acceptor, answer) = (acceptor.clone(), answer.clone());
            tokio::spawn(async move {
                let Ok(tls) = acceptor.accept(socket).await else {
                    return;
                };
                let Ok(mut connection) = h2::server::handshake(tls).await else {
                    return;
                };
                while let Some(Ok((request, mut respond))) = connection.accept().await {
                    let Some((status, content_type, body)) =
                        answer(request.uri().path(), &mut respond)
                    else {
                        continue;
                    };
                    let response = axum::http::Response::builder()
                        .status(status)
                        .header("content-type", content_type)
                        .header("content-length", body.len())
                        .body(())
                        .unwrap();
                    if let Ok(mut stream) = respond.send_response(response, body.is_empty())
                        && !body.is_empty()
                    {
                        let _ = stream.send_data(body, true);
                    }
                }
            });
        }
    });
    url
}
