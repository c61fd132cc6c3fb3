//! The OCI 1.1 referrers API through pullthrough, against the emulated registry with and
//! without its own referrers API: the union of the API's answer (all pages) and the
//! tag-schema index, the empty index, the `artifactType` filter, caching like a tag (single
//! flight, HEAD revalidation, GET only when the tag moved, stale while revalidating or failing),
//! persistence, purges, `explain`, access control, several upstreams, and the metrics. Also:
//! signatures, SBOMs, Helm charts and empty-config artifacts pass through byte for byte.

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::too_many_lines,
    reason = "a test panics on what it did not expect, and may read as one long story"
)]

mod support;

use serde_json::{Value, json};
use std::sync::Arc;
use std::time::Duration;
use support::hub::{EMPTY_CONFIG, referrers_tag, sha256};
use support::{FakeHub, Fault, Image, TestProxy, error_code, eventually};

const INDEX: &str = "application/vnd.oci.image.index.v1+json";
const EMPTY_INDEX: &str =
    r#"{"schemaVersion":2,"mediaType":"application/vnd.oci.image.index.v1+json","manifests":[]}"#;
const SBOM: &str = "application/spdx+json";
const SIGNATURE: &str = "application/vnd.dev.cosign.artifact.sig.v1+json";

/// A subject image `app:1` in `repo` with an SBOM (found by the referrers API, when the hub
/// has it) and a signature (pushed under the tag schema only, with the SBOM beside it).
struct Fixture {
    subject: Image,
    sbom: Image,
    signature: Image,
    tag_index: Image,
}

fn fixture(hub: &FakeHub, repo: &str) -> Fixture {
    let subject = Image::single(&format!("{repo}-subject"), support::DOCKER_MANIFEST, 100);
    hub.push(repo, "1", &subject);
    let sbom = Image::artifact("sbom", SBOM, &subject);
    hub.push_untagged(repo, &sbom);
    // The signature is in the repository too, but it names no subject: only the tag-schema
    // index (as cosign writes it for registries without the API) leads to it.
    let signature = Image::artifact_with(
        SIGNATURE,
        (EMPTY_CONFIG, bytes::Bytes::from_static(b"{}")),
        (
            "application/vnd.dev.cosign.simplesigning.v1+json",
            bytes::Bytes::from_static(b"{\"critical\":{}}"),
        ),
        None,
        r#"{"dev.sigstore.cosign/signature":"MEUCIQ"}"#,
    );
    hub.push_untagged(repo, &signature);
    let tag_index = Image::referrers_index(&[&signature, &sbom]);
    hub.push(repo, &referrers_tag(&subject.digest), &tag_index);
    Fixture {
        subject,
        sbom,
        signature,
        tag_index,
    }
}

fn path(repo: &str, subject: &str) -> String {
    format!("/v2/{repo}/referrers/{subject}")
}

async fn index(r: reqwest::Response) -> Value {
    assert_eq!(r.status(), 200);
    assert_eq!(r.headers()["content-type"], INDEX);
    r.json().await.unwrap()
}

#[tokio::test]
async fn the_answer_is_the_union_of_the_api_and_the_tag_schema() {
    let hub = FakeHub::start().await;
    hub.set_referrers_api(true, 0);
    let f = fixture(&hub, "org/app");
    let proxy = TestProxy::start(&hub).await;

    let r = proxy.get(&path("org/app", &f.subject.digest)).await;
    assert_eq!(r.headers()["x-cache"], "MISS");
    assert!(r.headers().get("link").is_none(), "one answer, no pages");
    assert!(r.headers().get("oci-filters-applied").is_none());
    let body = index(r).await;
    assert_eq!(body["schemaVersion"], 2);
    assert_eq!(body["mediaType"], INDEX);
    // The API's SBOM first, then the tag index's signature; the SBOM it also lists, once.
    assert_eq!(
        body["manifests"],
        json!([
            f.sbom.referrer_descriptor(),
            f.signature.referrer_descriptor()
        ])
    );
    assert_eq!(hub.count("referrers"), 1);
    assert_eq!(
        hub.count(&format!(
            "HEAD /v2/org/app/manifests/{}",
            referrers_tag(&f.subject.digest)
        )),
        1
    );
    assert_eq!(
        hub.count(&format!("GET /v2/org/app/manifests/{}", f.tag_index.digest)),
        1,
        "the tag index fetched by the digest its HEAD gave"
    );
    // Clients then pull what the descriptors name, byte for byte.
    for artifact in [&f.sbom, &f.signature] {
        let r = proxy
            .request(
                reqwest::Method::GET,
                &format!("/v2/org/app/manifests/{}", artifact.digest),
                &[("accept", "application/vnd.oci.image.manifest.v1+json")],
            )
            .await;
        assert_eq!(r.status(), 200);
        assert_eq!(
            r.headers()["docker-content-digest"],
            artifact.digest.as_str()
        );
        assert_eq!(r.bytes().await.unwrap(), artifact.bytes);
    }
}

#[tokio::test]
async fn without_the_api_the_tag_schema_answers_and_nothing_is_an_empty_index() {
    let hub = FakeHub::start().await;
    let f = fixture(&hub, "library/app");
    let proxy = TestProxy::start(&hub).await;
    // Docker Hub's implied library/ applies as to manifests.
    let body = index(proxy.get(&path("app", &f.subject.digest)).await).await;
    assert_eq!(
        body["manifests"],
        json!([
            f.signature.referrer_descriptor(),
            f.sbom.referrer_descriptor()
        ]),
        "the tag index's entries as they are"
    );
    assert_eq!(hub.count("other"), 1, "the API was asked and answered 404");

    // Neither the API nor the tag: 200 with the empty index, never 404.
    let nothing = sha256(b"refers to nothing");
    let r = proxy.get(&path("library/app", &nothing)).await;
    assert_eq!(r.status(), 200);
    assert_eq!(r.headers()["content-type"], INDEX);
    assert_eq!(r.text().await.unwrap(), EMPTY_INDEX);
    // A repository upstream does not know: the same.
    let r = proxy.get(&path("library/none", &nothing)).await;
    assert_eq!(r.status(), 200);
    assert_eq!(r.text().await.unwrap(), EMPTY_INDEX);
    // HEAD: the headers alone.
    let r = proxy.head(&path("library/app", &nothing)).await;
    assert_eq!(r.status(), 200);
    assert_eq!(
        r.headers()["content-length"],
        EMPTY_INDEX.len().to_string().as_str()
    );
    assert_eq!(r.headers()["x-cache"], "HIT");

    // Empty lists stay in memory: any client may ask for any subject, and a file for each
    // would fill the disk. The list with entries is on disk.
    let data_dir = proxy.config.data_dir.clone();
    let referrers_files = || {
        let mut files = Vec::new();
        let mut dirs = vec![data_dir.clone()];
        while let Some(dir) = dirs.pop() {
            for entry in std::fs::read_dir(&dir).unwrap() {
                let entry = entry.unwrap();
                if entry.file_type().unwrap().is_dir() {
                    dirs.push(entry.path());
                } else if entry.path().to_string_lossy().contains("_referrers") {
                    files.push(entry.path());
                }
            }
        }
        files
    };
    // (Written behind the answers.)
    eventually(Duration::from_secs(5), async || {
        !referrers_files().is_empty()
    })
    .await;
    let files = referrers_files();
    let hex = |d: &str| d.split_once(':').unwrap().1.to_owned();
    assert_eq!(files.len(), 1, "{files:?}");
    assert!(files[0].to_string_lossy().contains(&hex(&f.subject.digest)));
    assert!(
        !files
            .iter()
            .any(|p| p.to_string_lossy().contains(&hex(&nothing)))
    );
}

#[tokio::test]
async fn artifact_type_filters_the_one_cached_list() {
    let hub = FakeHub::start().await;
    hub.set_referrers_api(true, 0);
    let f = fixture(&hub, "org/app");
    let proxy = TestProxy::start(&hub).await;
    let sboms = format!(
        "{}?artifactType=application%2Fspdx%2Bjson",
        path("org/app", &f.subject.digest)
    );
    let r = proxy.get(&sboms).await;
    assert_eq!(r.headers()["oci-filters-applied"], "artifactType");
    assert_eq!(r.headers()["x-cache"], "MISS");
    assert_eq!(
        index(r).await["manifests"],
        json!([f.sbom.referrer_descriptor()])
    );
    let before = hub.total();
    let signatures = format!(
        "{}?artifactType={}",
        path("org/app", &f.subject.digest),
        SIGNATURE.replace('/', "%2F").replace('+', "%2B")
    );
    let r = proxy.get(&signatures).await;
    assert_eq!(r.headers()["x-cache"], "HIT");
    assert_eq!(
        index(r).await["manifests"],
        json!([f.signature.referrer_descriptor()])
    );
    let r = proxy
        .get(&format!(
            "{}?artifactType=text%2Fplain",
            path("org/app", &f.subject.digest)
        ))
        .await;
    assert_eq!(r.headers()["oci-filters-applied"], "artifactType");
    assert_eq!(r.text().await.unwrap(), EMPTY_INDEX);
    let all = index(proxy.get(&path("org/app", &f.subject.digest)).await).await;
    assert_eq!(all["manifests"].as_array().unwrap().len(), 2);
    assert_eq!(hub.total(), before, "every filter served from the one list");

    // A filter that is no media type is refused before anything else.
    let r = proxy
        .get(&format!(
            "{}?artifactType=a%0Ab",
            path("org/app", &f.subject.digest)
        ))
        .await;
    assert_eq!(r.status(), 400);
    assert_eq!(error_code(r).await, "UNSUPPORTED");
    assert_eq!(hub.total(), before);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn concurrent_requests_share_one_fetch_and_hits_cost_nothing() {
    let hub = FakeHub::start().await;
    hub.set_referrers_api(true, 0);
    let f = fixture(&hub, "org/app");
    hub.fault(Fault::Delay(Duration::from_millis(100)));
    let proxy = Arc::new(TestProxy::start(&hub).await);
    let p = path("org/app", &f.subject.digest);
    let answers = futures_util::future::join_all((0..20).map(|_| {
        let (proxy, p) = (Arc::clone(&proxy), p.clone());
        async move { proxy.get(&p).await.bytes().await.unwrap() }
    }))
    .await;
    assert!(answers.windows(2).all(|w| w[0] == w[1]));
    let answer: Value = serde_json::from_slice(&answers[0]).unwrap();
    assert_eq!(
        answer["manifests"],
        json!([
            f.sbom.referrer_descriptor(),
            f.signature.referrer_descriptor()
        ]),
        "{answer}"
    );
    assert_eq!(hub.count("referrers"), 1, "one API request for 20 clients");
    assert_eq!(hub.count("manifest_head"), 1, "one HEAD of the tag");
    assert_eq!(hub.count("manifest_get"), 1, "one GET of the tag's index");
    let before = hub.total();
    for _ in 0..5 {
        let r = proxy.get(&p).await;
        assert_eq!(r.headers()["x-cache"], "HIT");
    }
    assert_eq!(hub.total(), before, "hits within tag_ttl ask nothing");
}

#[tokio::test]
async fn the_tag_is_revalidated_by_head_and_fetched_only_when_it_moved() {
    let hub = FakeHub::start().await;
    let f = fixture(&hub, "org/app");
    let proxy = TestProxy::start_with(&hub, |c| {
        // Long enough for the checks after a refresh to run within it on a loaded machine.
        c.tag_ttl = Duration::from_secs(2);
        c.max_stale = Duration::from_secs(3600);
    })
    .await;
    let p = path("org/app", &f.subject.digest);
    index(proxy.get(&p).await).await;
    let (heads, gets, api) = (
        hub.count("manifest_head"),
        hub.count("manifest_get"),
        hub.count("other"),
    );
    assert_eq!((heads, gets, api), (1, 1, 1));

    // Past tag_ttl, unchanged upstream: served stale while one refresh asks the API and
    // HEADs the tag; no GET.
    tokio::time::sleep(Duration::from_millis(2_100)).await;
    let r = proxy.get(&p).await;
    assert_eq!(r.headers()["x-cache"], "STALE");
    assert!(
        eventually(Duration::from_secs(5), async || hub.count("manifest_head")
            == 2)
        .await,
        "the tag was revalidated"
    );
    support::settled(&proxy).await;
    assert_eq!(
        hub.count("manifest_get"),
        1,
        "an unchanged tag costs no GET"
    );
    let r = proxy.get(&p).await;
    assert_eq!(r.headers()["x-cache"], "HIT");

    // The tag moves (a new signature): its new index is fetched once, by digest.
    let second = Image::artifact("second-signature", SIGNATURE, &f.subject);
    hub.push_untagged("org/app", &second);
    let moved = Image::referrers_index(&[&f.signature, &f.sbom, &second]);
    hub.push("org/app", &referrers_tag(&f.subject.digest), &moved);
    tokio::time::sleep(Duration::from_millis(2_100)).await;
    assert_eq!(proxy.get(&p).await.headers()["x-cache"], "STALE");
    let now_three = eventually(Duration::from_secs(5), async || {
        let body: Value = proxy.get(&p).await.json().await.unwrap();
        body["manifests"].as_array().unwrap().len() == 3
    })
    .await;
    assert!(now_three, "the moved tag's index is served");
    assert_eq!(
        hub.count(&format!("GET /v2/org/app/manifests/{}", moved.digest)),
        1
    );
    assert_eq!(hub.count("manifest_get"), 2);
}

#[tokio::test]
async fn served_stale_when_upstream_fails_within_max_stale() {
    let hub = FakeHub::start().await;
    hub.set_referrers_api(true, 0);
    let f = fixture(&hub, "org/app");
    let proxy = TestProxy::start_with(&hub, |c| {
        // A failed refresh rests for the TTL: long enough to ask within it on a loaded machine.
        c.tag_ttl = Duration::from_secs(1);
        c.max_stale = Duration::from_secs(3);
    })
    .await;
    let p = path("org/app", &f.subject.digest);
    let first = proxy.get(&p).await.bytes().await.unwrap();
    hub.fault(Fault::Status(503));
    tokio::time::sleep(Duration::from_millis(1_100)).await;
    let r = proxy.get(&p).await;
    assert_eq!(r.headers()["x-cache"], "STALE");
    assert_eq!(r.bytes().await.unwrap(), first);
    support::settled(&proxy).await;
    // The failed refresh rests: the next stale answers do not ask again at once.
    let asked = hub.count("referrers");
    assert!(
        asked >= 2,
        "the stale answer started a refresh, which failed: {asked}"
    );
    let r = proxy.get(&p).await;
    assert_eq!(r.headers()["x-cache"], "STALE");
    assert_eq!(hub.count("referrers"), asked);
    // Past max_stale the request waits for upstream, and fails with it.
    tokio::time::sleep(Duration::from_millis(3100)).await;
    let r = proxy.get(&p).await;
    assert_eq!(r.status(), 502);
    assert_eq!(error_code(r).await, "UNAVAILABLE");
    hub.clear_faults();
    let r = proxy.get(&p).await;
    assert_eq!(r.headers()["x-cache"], "REVALIDATED");
    assert_eq!(r.bytes().await.unwrap(), first);
}

#[tokio::test]
async fn pages_are_followed_and_bounded() {
    let hub = FakeHub::start().await;
    hub.set_referrers_api(true, 2);
    let subject = Image::single("paged", support::DOCKER_MANIFEST, 10);
    hub.push("org/app", "1", &subject);
    let mut artifacts: Vec<Image> = (0..5)
        .map(|i| Image::artifact(&format!("a{i}"), SBOM, &subject))
        .collect();
    for a in &artifacts {
        hub.push_untagged("org/app", a);
    }
    let proxy = TestProxy::start(&hub).await;
    let body = index(proxy.get(&path("org/app", &subject.digest)).await).await;
    artifacts.sort_by(|a, b| a.digest.cmp(&b.digest));
    let want: Vec<Value> = artifacts.iter().map(Image::referrer_descriptor).collect();
    assert_eq!(body["manifests"], json!(want), "three pages, one answer");
    assert_eq!(hub.count("referrers"), 3);

    // A list that goes on and on is cut at 16 pages.
    hub.set_referrers_api(true, 1);
    let other = Image::single("long", support::DOCKER_MANIFEST, 10);
    hub.push("org/app", "2", &other);
    for i in 0..20 {
        hub.push_untagged("org/app", &Image::artifact(&format!("l{i}"), SBOM, &other));
    }
    let before = hub.count("referrers");
    let body = index(proxy.get(&path("org/app", &other.digest)).await).await;
    assert_eq!(body["manifests"].as_array().unwrap().len(), 16);
    assert_eq!(hub.count("referrers") - before, 16);
    let shown: Value = proxy
        .get(&format!(
            "/_pullthrough/cache/org/app/referrers/{}",
            other.digest
        ))
        .await
        .json()
        .await
        .unwrap();
    assert_eq!(shown["truncated"], true);
}

#[tokio::test]
async fn a_link_to_another_origin_is_not_followed() {
    let (hub, elsewhere) = (FakeHub::start().await, FakeHub::start().await);
    hub.set_referrers_api(true, 1);
    hub.set_referrers_link_base(&elsewhere.url);
    let subject = Image::single("linked", support::DOCKER_MANIFEST, 10);
    hub.push("org/app", "1", &subject);
    for i in 0..3 {
        hub.push_untagged(
            "org/app",
            &Image::artifact(&format!("x{i}"), SBOM, &subject),
        );
    }
    let proxy = TestProxy::start(&hub).await;
    let body = index(proxy.get(&path("org/app", &subject.digest)).await).await;
    assert_eq!(
        body["manifests"].as_array().unwrap().len(),
        1,
        "the first page only"
    );
    assert_eq!(hub.count("referrers"), 1);
    assert_eq!(
        elsewhere.total(),
        0,
        "nothing (and no token) sent to another origin"
    );
}

#[tokio::test]
async fn an_invalid_digest_is_400_without_an_upstream_request() {
    let hub = FakeHub::start().await;
    hub.set_referrers_api(true, 0);
    let proxy = TestProxy::start(&hub).await;
    for bad in [
        "sha256:xyz",
        "latest",
        "md5:d41d8cd98f00b204e9800998ecf8427e",
        "sha256:ABCDEF",
    ] {
        let r = proxy.get(&path("org/app", bad)).await;
        assert_eq!(r.status(), 400, "{bad}");
        assert_eq!(error_code(r).await, "DIGEST_INVALID", "{bad}");
    }
    let r = proxy
        .get(&format!("/v2/Org/app/referrers/{}", sha256(b"x")))
        .await;
    assert_eq!(error_code(r).await, "NAME_INVALID");
    assert_eq!(hub.total(), 0, "nothing asked upstream");
}

#[tokio::test]
async fn lists_outlive_a_restart_and_are_purged_through_the_cache_api() {
    let hub = FakeHub::start().await;
    hub.set_referrers_api(true, 0);
    let f = fixture(&hub, "org/app");
    let dir = Arc::new(tempfile::tempdir().unwrap());
    let config = TestProxy::config(&hub.url, dir.path());
    let proxy = TestProxy::start_config(config.clone(), Some(Arc::clone(&dir))).await;
    let p = path("org/app", &f.subject.digest);
    let first = proxy.get(&p).await.bytes().await.unwrap();
    support::settled(&proxy).await;
    proxy.stop().await;

    // Restarted with upstream down: the list is served from disk, fresh.
    hub.fault(Fault::Status(503));
    let proxy = TestProxy::start_config(config, Some(dir)).await;
    let r = proxy.get(&p).await;
    assert_eq!(r.headers()["x-cache"], "HIT");
    assert_eq!(r.bytes().await.unwrap(), first);

    // The cache API shows it, explains a request, and purges it.
    let cache_path = format!("/_pullthrough/cache/org/app/referrers/{}", f.subject.digest);
    let shown: Value = proxy.get(&cache_path).await.json().await.unwrap();
    assert_eq!(shown["cached"], true);
    assert_eq!(shown["freshness"], "fresh");
    assert_eq!(shown["upstream_api"], true);
    assert_eq!(shown["tag_index"], f.tag_index.digest.as_str());
    assert_eq!(shown["manifests"].as_array().unwrap().len(), 2);
    let explained: Value = proxy
        .get(&format!("{cache_path}?explain=pull"))
        .await
        .json()
        .await
        .unwrap();
    assert_eq!(explained["upstream_requests"], json!([]));
    let dry: Value = proxy
        .request(
            reqwest::Method::DELETE,
            &format!("{cache_path}?dry_run=true"),
            &[],
        )
        .await
        .json()
        .await
        .unwrap();
    assert_eq!(
        dry["referrers"],
        json!([format!("org/app@{}", f.subject.digest)])
    );
    let purged: Value = proxy
        .request(reqwest::Method::DELETE, &cache_path, &[])
        .await
        .json()
        .await
        .unwrap();
    assert_eq!(purged["referrers"].as_array().unwrap().len(), 1);
    let shown: Value = proxy.get(&cache_path).await.json().await.unwrap();
    assert_eq!(shown["cached"], false);
    let explained: Value = proxy
        .get(&format!("{cache_path}?explain=pull"))
        .await
        .json()
        .await
        .unwrap();
    assert_eq!(explained["referrers_gets"], 1);
    assert_eq!(explained["manifest_gets"], 0);
    assert_eq!(explained["upstream_requests"][1]["method"], "HEAD");
    // The emulator is Docker Hub once its startup ping has told so: its GETs are then named
    // as pulls.
    assert_eq!(
        explained["summary"]
            .as_str()
            .unwrap()
            .replace(" (Docker Hub pulls)", ""),
        "1 referrers GET(s), 0 manifest GET(s), 1 HEAD(s), 0 blob GET(s) (0 bytes), and more once the missing manifests are known"
    );
    hub.clear_faults();
    let r = proxy.get(&p).await;
    assert_eq!(r.headers()["x-cache"], "MISS");

    // A repository purge takes its referrers lists too.
    let purged: Value = proxy
        .request(reqwest::Method::DELETE, "/_pullthrough/cache/org/app", &[])
        .await
        .json()
        .await
        .unwrap();
    assert_eq!(
        purged["referrers"],
        json!([format!("org/app@{}", f.subject.digest)])
    );
    assert_eq!(proxy.get(&p).await.headers()["x-cache"], "MISS");
}

#[tokio::test]
async fn several_upstreams_and_access_rules_apply_as_to_manifests() {
    let (hub, ghcr, proxy) = support::hub_and_ghcr().await;
    ghcr.set_referrers_api(true, 0);
    let on_ghcr = fixture(&ghcr, "org/app");
    let on_hub = fixture(&hub, "org/app");
    let by_ns = index(
        proxy
            .get(&format!(
                "{}?ns=ghcr.io",
                path("org/app", &on_ghcr.subject.digest)
            ))
            .await,
    )
    .await;
    assert_eq!(by_ns["manifests"].as_array().unwrap().len(), 2);
    let r = proxy
        .get(&path("ghcr.io/org/app", &on_ghcr.subject.digest))
        .await;
    assert_eq!(
        r.headers()["x-cache"],
        "HIT",
        "the prefix reaches the same list"
    );
    assert_eq!(ghcr.count("referrers"), 1);
    assert_eq!(hub.count("referrers") + hub.count("manifest_head"), 0);
    let default = index(proxy.get(&path("org/app", &on_hub.subject.digest)).await).await;
    assert_eq!(
        default["manifests"],
        json!([
            on_hub.signature.referrer_descriptor(),
            on_hub.sbom.referrer_descriptor()
        ])
    );

    // Access control: no credentials where a rule needs them is 401, before any upstream
    // request.
    let hub = FakeHub::start().await;
    let f = fixture(&hub, "team/app");
    let dir = tempfile::tempdir().unwrap();
    let htpasswd = dir.path().join("htpasswd");
    std::fs::write(
        &htpasswd,
        format!("dev:{}\n", bcrypt::hash("dev-pw", 4).unwrap()),
    )
    .unwrap();
    let proxy = TestProxy::start_with(&hub, |c| {
        c.htpasswd = Some(htpasswd);
        c.access = vec![pullthrough::config::AccessRule {
            upstream: "*".into(),
            prefix: "team/".into(),
            users: vec!["dev".into()],
            anonymous: false,
        }];
    })
    .await;
    let p = path("team/app", &f.subject.digest);
    let r = proxy.get(&p).await;
    assert_eq!(r.status(), 401);
    assert_eq!(hub.total(), 0);
    use base64::Engine as _;
    let basic = format!(
        "Basic {}",
        base64::engine::general_purpose::STANDARD.encode("dev:dev-pw")
    );
    let r = proxy
        .request(reqwest::Method::GET, &p, &[("authorization", &basic)])
        .await;
    assert_eq!(index(r).await["manifests"].as_array().unwrap().len(), 2);
}

#[tokio::test]
async fn referrers_are_their_own_kind_in_metrics_and_stats() {
    let hub = FakeHub::start().await;
    hub.set_referrers_api(true, 0);
    let f = fixture(&hub, "org/app");
    let proxy = TestProxy::start(&hub).await;
    let p = path("org/app", &f.subject.digest);
    proxy.get(&p).await;
    proxy.get(&p).await;
    let scrape = support::scrape(&proxy).await;
    let requests = |cache: &str| {
        support::metric(
            &scrape,
            "pullthrough_requests_total",
            &[("kind", "referrers"), ("cache", cache)],
        )
    };
    assert_eq!((requests("miss"), requests("hit")), (1.0, 1.0));
    assert_eq!(
        support::metric(
            &scrape,
            "pullthrough_upstream_requests_total",
            &[("kind", "referrers"), ("status", "200")]
        ),
        1.0
    );
    let stats: Value = proxy.get("/_pullthrough/stats").await.json().await.unwrap();
    let counted = &stats["counters"]["requests"]["referrers"];
    assert_eq!(
        (counted["hit"].as_u64(), counted["miss"].as_u64()),
        (Some(1), Some(1))
    );
    assert_eq!(
        stats["counters"]["upstream_requests"]["referrers"]["200"],
        1
    );
}

/// Signatures and attestations under cosign's tag scheme, a Helm chart, and an artifact with
/// the empty config: ordinary manifests and blobs, served byte for byte with their media
/// types and digests, by tag and by digest, whatever Accept a client sends.
#[tokio::test]
async fn signatures_charts_and_artifacts_pass_through_byte_exact() {
    let hub = FakeHub::start().await;
    let subject = Image::single("signed", support::DOCKER_MANIFEST, 100);
    hub.push("org/app", "1", &subject);
    let tag = referrers_tag(&subject.digest);
    let sig = Image::artifact_with(
        "",
        (
            "application/vnd.oci.image.config.v1+json",
            bytes::Bytes::from_static(br#"{"architecture":"","os":""}"#),
        ),
        (
            "application/vnd.dev.cosign.simplesigning.v1+json",
            bytes::Bytes::from(format!(
                r#"{{"critical":{{"image":{{"docker-manifest-digest":"{}"}},"type":"cosign container image signature"}},"optional":null}}"#,
                subject.digest
            )),
        ),
        None,
        r#"{"dev.cosignproject.cosign/signature":"MEUCIQDx"}"#,
    );
    let att = Image::artifact_with(
        "",
        (
            "application/vnd.oci.image.config.v1+json",
            bytes::Bytes::from_static(b"{}"),
        ),
        (
            "application/vnd.dsse.envelope.v1+json",
            bytes::Bytes::from_static(br#"{"payloadType":"application/vnd.in-toto+json"}"#),
        ),
        None,
        r#"{"predicateType":"https://slsa.dev/provenance/v1"}"#,
    );
    let sbom = Image::artifact_with(
        "",
        (
            "application/vnd.oci.image.config.v1+json",
            bytes::Bytes::from_static(b"{}"),
        ),
        (
            "text/spdx+json",
            bytes::Bytes::from_static(b"{\"spdxVersion\":\"SPDX-2.3\"}"),
        ),
        None,
        "{}",
    );
    hub.push("org/app", &format!("{tag}.sig"), &sig);
    hub.push("org/app", &format!("{tag}.att"), &att);
    hub.push("org/app", &format!("{tag}.sbom"), &sbom);
    let chart = Image::artifact_with(
        "",
        (
            "application/vnd.cncf.helm.config.v1+json",
            bytes::Bytes::from_static(br#"{"name":"app","version":"1.2.3","apiVersion":"v2"}"#),
        ),
        (
            "application/vnd.cncf.helm.chart.content.v1.tar+gzip",
            bytes::Bytes::from(support::hub::pattern("chart", 3000)),
        ),
        None,
        r#"{"org.opencontainers.image.title":"app","org.opencontainers.image.version":"1.2.3"}"#,
    );
    hub.push("charts/app", "1.2.3", &chart);
    let empty = Image::artifact("plain", "application/vnd.example.thing.v1", &subject);
    hub.push("org/app", "thing", &empty);
    let proxy = TestProxy::start(&hub).await;

    let accepts = [
        // cosign (go-containerregistry's remote.Get defaults)
        "application/vnd.oci.image.manifest.v1+json,application/vnd.docker.distribution.manifest.v2+json,application/vnd.oci.image.index.v1+json,application/vnd.docker.distribution.manifest.list.v2+json",
        // Helm
        "application/vnd.oci.image.manifest.v1+json",
        support::FULL_ACCEPT,
    ];
    let cases = [
        ("org/app", format!("{tag}.sig"), &sig),
        ("org/app", format!("{tag}.att"), &att),
        ("org/app", format!("{tag}.sbom"), &sbom),
        ("charts/app", "1.2.3".to_owned(), &chart),
        ("org/app", "thing".to_owned(), &empty),
    ];
    for (repo, reference, image) in cases {
        for (i, accept) in accepts.iter().enumerate() {
            for by in [reference.clone(), image.digest.clone()] {
                let r = proxy
                    .request(
                        reqwest::Method::GET,
                        &format!("/v2/{repo}/manifests/{by}"),
                        &[("accept", accept)],
                    )
                    .await;
                assert_eq!(r.status(), 200, "{repo}:{by} accept #{i}");
                assert_eq!(
                    r.headers()["content-type"],
                    "application/vnd.oci.image.manifest.v1+json"
                );
                assert_eq!(r.headers()["docker-content-digest"], image.digest.as_str());
                assert_eq!(r.bytes().await.unwrap(), image.bytes, "{repo}:{by}");
            }
        }
        for blob in &image.blobs {
            let got = proxy
                .get_ok(&format!("/v2/{repo}/blobs/{}", sha256(blob)))
                .await;
            assert_eq!(got, *blob);
        }
    }
    // A client that takes only Docker types is told the OCI manifest is not for it.
    let r = proxy
        .request(
            reqwest::Method::GET,
            "/v2/charts/app/manifests/1.2.3",
            &[("accept", support::DOCKER_MANIFEST)],
        )
        .await;
    assert_eq!(r.status(), 404);
    assert_eq!(error_code(r).await, "MANIFEST_UNKNOWN");
    // The empty-config artifact names its subject: the referrers API finds it (the hub here
    // has no API and no tag index, so it does not).
    let body = index(proxy.get(&path("org/app", &subject.digest)).await).await;
    assert_eq!(body["manifests"], json!([]));
    hub.set_referrers_api(true, 0);
    proxy
        .request(
            reqwest::Method::DELETE,
            &format!("/_pullthrough/cache/org/app/referrers/{}", subject.digest),
            &[],
        )
        .await;
    let body = index(proxy.get(&path("org/app", &subject.digest)).await).await;
    assert_eq!(body["manifests"], json!([empty.referrer_descriptor()]));
    assert_eq!(
        body["manifests"][0]["artifactType"],
        "application/vnd.example.thing.v1"
    );
}

#[tokio::test]
async fn offline_a_cached_list_is_served_at_any_age_and_a_missing_one_is_503() {
    let hub = FakeHub::start().await;
    hub.set_referrers_api(true, 0);
    let f = fixture(&hub, "org/app");
    let proxy = TestProxy::start_with(&hub, |c| {
        c.tag_ttl = Duration::from_millis(200);
        c.max_stale = Duration::from_millis(300);
    })
    .await;
    let p = path("org/app", &f.subject.digest);
    let online = index(proxy.get(&p).await).await;
    assert_eq!(online["manifests"].as_array().unwrap().len(), 2);
    let switched = proxy
        .request(reqwest::Method::PUT, "/_pullthrough/offline", &[])
        .await;
    // (The body goes with the request below; this one only proves the switch needs it.)
    assert_eq!(switched.status(), 400);
    let switched = support::client()
        .put(format!("{}/_pullthrough/offline", proxy.url))
        .body(r#"{"offline": true}"#)
        .send()
        .await
        .unwrap();
    assert_eq!(switched.status(), 200);
    let before = hub.total() + hub.count("ping");
    // Past tag_ttl and max_stale: still served, and nothing is asked.
    tokio::time::sleep(Duration::from_millis(600)).await;
    let r = proxy.get(&p).await;
    assert_eq!(r.headers()["x-cache"], "STALE");
    assert_eq!(index(r).await, online);
    let other = Image::single("offline-other", support::DOCKER_MANIFEST, 10);
    let r = proxy.get(&path("org/app", &other.digest)).await;
    assert_eq!(r.status(), 503);
    assert_eq!(error_code(r).await, "UNAVAILABLE");
    assert_eq!(
        hub.total() + hub.count("ping"),
        before,
        "nothing asked offline"
    );
}
