//! Blobs through the emulated Docker Hub and its CDN: streaming, verification, single-flight,
//! ranges, cross-repository reuse, eviction and persistence.

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::too_many_lines,
    reason = "a test panics on what it did not expect, and may read as one long story"
)]

mod support;

use bytes::Bytes;
use futures_util::StreamExt;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};
use support::hub::{pattern, sha256};
use support::{FakeHub, Fault, Image, TestProxy, error_code, eventually};

use support::DOCKER_MANIFEST;

fn blob_path(repo: &str, digest: &str) -> String {
    format!("/v2/{repo}/blobs/{digest}")
}

#[tokio::test]
async fn blob_streams_through_the_cdn_redirect_and_is_cached() {
    let hub = FakeHub::start().await;
    let blob = Bytes::from(pattern("layer", 3 * 1024 * 1024 + 17));
    let digest = hub.push_blob("library/alpine", blob.clone());
    let proxy = TestProxy::start(&hub).await;
    let path = blob_path("library/alpine", &digest);

    let r = proxy.get(&path).await;
    assert_eq!(r.status(), 200);
    assert_eq!(r.headers()["x-cache"], "MISS");
    assert_eq!(
        r.headers()["content-length"],
        blob.len().to_string().as_str()
    );
    assert_eq!(r.headers()["docker-content-digest"], digest.as_str());
    assert_eq!(r.headers()["content-type"], "application/octet-stream");
    assert_eq!(r.headers()["accept-ranges"], "bytes");
    assert_eq!(r.bytes().await.unwrap(), blob);
    assert_eq!((hub.count("blob_get"), hub.count("cdn_get")), (1, 1));
    let before = hub.total() + hub.count("cdn_get");

    let r = proxy.get(&path).await;
    assert_eq!(r.headers()["x-cache"], "HIT");
    assert_eq!(r.bytes().await.unwrap(), blob);
    let head = proxy.head(&path).await;
    assert_eq!(head.status(), 200);
    assert_eq!(
        head.headers()["content-length"],
        blob.len().to_string().as_str()
    );
    assert_eq!(
        hub.total() + hub.count("cdn_get"),
        before,
        "hits made no upstream request"
    );
}

#[tokio::test]
async fn head_of_an_uncached_blob_is_an_upstream_head() {
    let hub = FakeHub::start().await;
    let blob = Bytes::from(pattern("head", 1000));
    let digest = hub.push_blob("library/alpine", blob);
    let proxy = TestProxy::start(&hub).await;
    let head = proxy.head(&blob_path("library/alpine", &digest)).await;
    assert_eq!(head.status(), 200);
    assert_eq!(head.headers()["content-length"], "1000");
    assert_eq!(head.headers()["docker-content-digest"], digest.as_str());
    assert_eq!(
        (
            hub.count("blob_head"),
            hub.count("blob_get"),
            hub.count("cdn_get")
        ),
        (1, 0, 0)
    );
    let missing = proxy
        .head(&blob_path("library/alpine", &sha256(b"nope")))
        .await;
    assert_eq!(missing.status(), 404);
    assert_eq!(hub.count("blob_get"), 0);
}

#[tokio::test]
async fn blob_head_works_when_the_cdn_refuses_head() {
    let hub = FakeHub::start().await;
    let blob = Bytes::from(pattern("cdnhead", 4321));
    let digest = hub.push_blob("library/alpine", blob);
    hub.fault(Fault::CdnRefusesHead);
    let proxy = TestProxy::start(&hub).await;
    let head = proxy.head(&blob_path("library/alpine", &digest)).await;
    assert_eq!(head.status(), 200);
    assert_eq!(head.headers()["content-length"], "4321");
    assert_eq!(head.headers()["docker-content-digest"], digest.as_str());
}

#[tokio::test]
async fn twenty_concurrent_cold_pulls_share_one_download_and_stream_early() {
    let hub = FakeHub::start().await;
    let blob = Bytes::from(pattern("big", 64 * 1024 * 1024));
    let digest = hub.push_blob("library/big", blob.clone());
    // 1,024 chunks of 64 KiB, 1 ms apart: the download takes over a second.
    hub.fault(Fault::SlowBlob(Duration::from_millis(1)));
    let proxy = TestProxy::start(&hub).await;
    let url = format!("{}{}", proxy.url, blob_path("library/big", &digest));
    let started = Instant::now();
    let mut tasks = Vec::new();
    for _ in 0..20 {
        let (client, url) = (proxy.client.clone(), url.clone());
        tasks.push(tokio::spawn(async move {
            let response = client.get(url).send().await.unwrap();
            assert_eq!(response.status(), 200);
            let mut stream = response.bytes_stream();
            let mut hasher = Vec::new();
            let mut first_byte = None;
            let mut len = 0usize;
            while let Some(chunk) = stream.next().await {
                let chunk = chunk.unwrap();
                first_byte.get_or_insert(started.elapsed());
                len += chunk.len();
                hasher.push(chunk);
            }
            let all: Vec<u8> = hasher.concat();
            (first_byte.unwrap(), started.elapsed(), len, sha256(&all))
        }));
    }
    let mut results = Vec::new();
    for t in tasks {
        results.push(t.await.unwrap());
    }
    let first_done = results.iter().map(|r| r.1).min().unwrap();
    for (first_byte, _, len, got) in &results {
        assert_eq!(*len, blob.len());
        assert_eq!(*got, digest);
        assert!(
            *first_byte < first_done,
            "every client started before the download ended: {first_byte:?} vs {first_done:?}"
        );
    }
    assert_eq!(hub.count("blob_get"), 1);
    assert_eq!(hub.count("cdn_get"), 1);
}

/// Followers that keep up are served from the download's recent bytes in memory (8 MiB); one
/// that joins late or stops reading for a while starts from the temp file and catches up.
#[tokio::test]
async fn late_and_slow_followers_get_the_whole_blob_from_one_download() {
    let hub = FakeHub::start().await;
    let blob = Bytes::from(pattern("late", 32 * 1024 * 1024));
    let digest = hub.push_blob("library/late", blob.clone());
    // 512 chunks of 64 KiB, 1 ms apart.
    hub.fault(Fault::SlowBlob(Duration::from_millis(1)));
    let proxy = TestProxy::start(&hub).await;
    let url = format!("{}{}", proxy.url, blob_path("library/late", &digest));
    // Each pull counts the bytes it received in `progress`.
    let pull = |pause_after_first: Duration, progress: Arc<AtomicUsize>| {
        let (client, url) = (proxy.client.clone(), url.clone());
        tokio::spawn(async move {
            let response = client.get(url).send().await.unwrap();
            assert_eq!(response.status(), 200);
            let mut stream = response.bytes_stream();
            let mut all = Vec::new();
            while let Some(chunk) = stream.next().await {
                if all.is_empty() {
                    // A follower that stops reading for a while, on purpose.
                    tokio::time::sleep(pause_after_first).await;
                }
                let chunk = chunk.unwrap();
                progress.fetch_add(chunk.len(), Ordering::SeqCst);
                all.extend_from_slice(&chunk);
            }
            all
        })
    };
    let steady_progress = Arc::new(AtomicUsize::new(0));
    let steady = pull(Duration::ZERO, steady_progress.clone());
    let stalled = pull(Duration::from_millis(400), Arc::default());
    // Joins once the download is well past the first 8 MiB (the steady follower has 12).
    let well_past = eventually(Duration::from_secs(10), async || {
        steady_progress.load(Ordering::SeqCst) >= 12 * 1024 * 1024
    })
    .await;
    assert!(well_past, "the download started");
    let late = pull(Duration::ZERO, Arc::default());
    for task in [steady, stalled, late] {
        let got = task.await.unwrap();
        assert_eq!(got.len(), blob.len());
        assert_eq!(sha256(&got), digest);
    }
    assert_eq!(hub.count("blob_get"), 1);
    assert_eq!(hub.count("cdn_get"), 1);
}

#[tokio::test]
async fn a_departing_client_does_not_stop_the_download() {
    let hub = FakeHub::start().await;
    let blob = Bytes::from(pattern("departing", 4 * 1024 * 1024));
    let digest = hub.push_blob("library/d", blob.clone());
    hub.fault(Fault::SlowBlob(Duration::from_millis(2)));
    let proxy = TestProxy::start(&hub).await;
    let path = blob_path("library/d", &digest);
    let response = proxy.get(&path).await;
    let mut stream = response.bytes_stream();
    stream.next().await.unwrap().unwrap();
    drop(stream);
    support::settled(&proxy).await;
    let r = proxy.get(&path).await;
    assert_eq!(
        r.headers()["x-cache"],
        "HIT",
        "the download finished for the cache"
    );
    assert_eq!(r.bytes().await.unwrap(), blob);
    assert_eq!(hub.count("blob_get"), 1);
}

#[tokio::test]
async fn a_broken_upstream_stream_resumes_with_a_range_request() {
    let hub = FakeHub::start().await;
    let blob = Bytes::from(pattern("resume", 4 * 1024 * 1024));
    let digest = hub.push_blob("library/r", blob.clone());
    hub.break_next_streams(2);
    let proxy = TestProxy::start(&hub).await;
    let path = blob_path("library/r", &digest);
    let r = proxy.get(&path).await;
    assert_eq!(r.status(), 200);
    assert_eq!(
        r.bytes().await.unwrap(),
        blob,
        "the client never saw the breaks"
    );
    assert_eq!(hub.count("blob_get"), 3, "one GET and two resumes");
    let r = proxy.get(&path).await;
    assert_eq!(r.headers()["x-cache"], "HIT");
    assert_eq!(r.bytes().await.unwrap(), blob);

    // A CDN that ignores Range answers the resume with the whole blob: the prefix is skipped.
    let other = Bytes::from(pattern("resume-200", 3 * 1024 * 1024));
    let digest = hub.push_blob("library/r", other.clone());
    hub.fault(Fault::IgnoreRange);
    hub.break_next_streams(1);
    let r = proxy.get(&blob_path("library/r", &digest)).await;
    assert_eq!(r.bytes().await.unwrap(), other);
    assert_eq!(
        hub.count("blob_get"),
        5,
        "one GET and one resume answered with 200"
    );
    assert_eq!(hub.count("cdn_get"), 5);
}

#[tokio::test]
async fn corrupt_or_truncated_blobs_are_never_served_or_stored() {
    for fault in [Fault::CorruptBlob, Fault::TruncateBlob] {
        let hub = FakeHub::start().await;
        let blob = Bytes::from(pattern("bad", 2 * 1024 * 1024));
        let digest = hub.push_blob("library/bad", blob.clone());
        let proxy = TestProxy::start(&hub).await;
        let path = blob_path("library/bad", &digest);
        hub.fault(fault.clone());
        // Either the response fails outright (an error status, or the connection cut before
        // the head when the download failed first) or its body is cut short: never the whole
        // blob.
        let sent = proxy
            .client
            .get(format!("{}{path}", proxy.url))
            .send()
            .await;
        if let Ok(r) = sent
            && r.status() == 200
        {
            let body = r.bytes().await;
            assert!(
                body.is_err() || body.unwrap().len() < blob.len(),
                "{fault:?} served a complete body"
            );
        }
        support::settled(&proxy).await;
        let stored = std::fs::read_dir(proxy.config.data_dir.join("blobs/sha256"))
            .map(|d| d.count())
            .unwrap_or(0);
        assert_eq!(stored, 0, "{fault:?} left a file in the store");
        hub.clear_faults();
        let before = hub.count("blob_get");
        let r = proxy.get(&path).await;
        assert_eq!(r.status(), 200);
        assert_eq!(r.bytes().await.unwrap(), blob, "{fault:?}");
        assert_eq!(hub.count("blob_get") - before, 1);
    }
}

#[tokio::test]
async fn ranges_are_206_or_416_and_never_download_twice() {
    let hub = FakeHub::start().await;
    let blob = Bytes::from(pattern("range", 100_000));
    let digest = hub.push_blob("library/range", blob.clone());
    let proxy = TestProxy::start(&hub).await;
    let path = blob_path("library/range", &digest);

    // Cold range: served once the bytes are there, from the one download.
    let r = proxy
        .request(reqwest::Method::GET, &path, &[("range", "bytes=10-19")])
        .await;
    assert_eq!(r.status(), 206);
    assert_eq!(r.headers()["content-range"], "bytes 10-19/100000");
    assert_eq!(r.bytes().await.unwrap(), blob.slice(10..20));
    // The range did not wait for the whole blob; a full GET follows the same download.
    assert_eq!(proxy.get_ok(&path).await, blob);
    let r = proxy
        .request(reqwest::Method::GET, &path, &[("range", "bytes=99990-")])
        .await;
    assert_eq!(r.status(), 206);
    assert_eq!(r.headers()["x-cache"], "HIT");
    assert_eq!(r.bytes().await.unwrap(), blob.slice(99_990..));
    let r = proxy
        .request(reqwest::Method::GET, &path, &[("range", "bytes=-5")])
        .await;
    assert_eq!(r.bytes().await.unwrap(), blob.slice(99_995..));
    let r = proxy
        .request(reqwest::Method::GET, &path, &[("range", "bytes=100000-")])
        .await;
    assert_eq!(r.status(), 416);
    assert_eq!(r.headers()["content-range"], "bytes */100000");
    assert_eq!(hub.count("blob_get"), 1);
}

#[tokio::test]
async fn stored_blobs_are_shared_across_public_repositories() {
    let hub = FakeHub::start().await;
    let blob = Bytes::from(pattern("shared", 5000));
    let digest = hub.push_blob("library/a", blob.clone());
    hub.push_blob("library/b", blob.clone());
    let proxy = TestProxy::start(&hub).await;
    assert_eq!(
        proxy
            .get(&blob_path("library/a", &digest))
            .await
            .bytes()
            .await
            .unwrap(),
        blob
    );
    let r = proxy.get(&blob_path("library/b", &digest)).await;
    assert_eq!(r.headers()["x-cache"], "HIT");
    assert_eq!(r.bytes().await.unwrap(), blob);
    assert_eq!(hub.count("blob_get"), 1);
}

#[tokio::test]
async fn private_blobs_are_shared_only_where_upstream_confirms_access() {
    let hub = FakeHub::start().await;
    let blob = Bytes::from(pattern("private", 5000));
    let digest = hub.push_blob("acme/private", blob.clone());
    hub.push_blob("acme/other", Bytes::from_static(b"unrelated"));
    hub.make_private("acme/private");
    hub.add_user("alice", "pw");
    let proxy = TestProxy::start_with(&hub, |c| {
        c.upstream_username = Some("alice".into());
        c.upstream_password = Some(pullthrough::config::Secret("pw".into()));
    })
    .await;
    assert_eq!(
        proxy
            .get(&blob_path("acme/private", &digest))
            .await
            .bytes()
            .await
            .unwrap(),
        blob
    );
    let r = proxy.get(&blob_path("acme/other", &digest)).await;
    assert_eq!(
        r.status(),
        404,
        "a repository without the blob upstream does not get it from the cache"
    );
    assert_eq!(error_code(r).await, "BLOB_UNKNOWN");
    let r = proxy.head(&blob_path("acme/other", &digest)).await;
    assert_eq!(r.status(), 404);
    assert_eq!(hub.count("blob_get"), 1);
}

#[tokio::test]
async fn eviction_keeps_the_store_under_its_limit() {
    let hub = FakeHub::start().await;
    let (blobs, digests) = push_mib_blobs(&hub, "evict", 8);
    let proxy = four_mib_store(&hub).await;
    for (d, b) in digests.iter().zip(&blobs) {
        assert_eq!(proxy.get_ok(&blob_path("library/e", d)).await, *b);
    }
    let under = eventually(Duration::from_secs(10), async || {
        walk(&proxy.config.data_dir.join("blobs")) <= 4 * 1024 * 1024
    })
    .await;
    let on_disk: u64 = walk(&proxy.config.data_dir.join("blobs"));
    assert!(under, "{on_disk} bytes on disk");
    // The most recent blob survived; an evicted one is fetched again, correctly.
    let last = proxy.get(&blob_path("library/e", &digests[7])).await;
    assert_eq!(last.headers()["x-cache"], "HIT");
    let first = proxy.get(&blob_path("library/e", &digests[0])).await;
    assert_eq!(first.bytes().await.unwrap(), blobs[0]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn eviction_during_a_pull_never_breaks_it() {
    let hub = FakeHub::start().await;
    let slow = Bytes::from(pattern("slow-evict", 2 * 1024 * 1024));
    let slow_digest = hub.push_blob("library/e", slow.clone());
    let (others, other_digests) = push_mib_blobs(&hub, "fill", 6);
    let proxy = four_mib_store(&hub).await;
    // Cache the big blob, then read it slowly while other pulls push the store over its limit.
    assert_eq!(
        proxy
            .get(&blob_path("library/e", &slow_digest))
            .await
            .bytes()
            .await
            .unwrap(),
        slow
    );
    let response = proxy.get(&blob_path("library/e", &slow_digest)).await;
    assert_eq!(response.headers()["x-cache"], "HIT");
    let mut stream = response.bytes_stream();
    let mut received = stream.next().await.unwrap().unwrap().to_vec();
    for (d, b) in other_digests.iter().zip(&others) {
        assert_eq!(
            proxy
                .get(&blob_path("library/e", d))
                .await
                .bytes()
                .await
                .unwrap(),
            *b
        );
    }
    // The store went over its limit while the pull was held: eviction ran.
    let evicted = eventually(Duration::from_secs(10), async || {
        let scrape = support::scrape(&proxy).await;
        support::metric(&scrape, "pullthrough_blob_evictions_total", &[]) > 0.0
    })
    .await;
    assert!(evicted, "nothing was evicted");
    while let Some(chunk) = stream.next().await {
        received.extend_from_slice(&chunk.unwrap());
    }
    assert_eq!(
        sha256(&received),
        slow_digest,
        "the pull in progress completed intact"
    );
    let on_disk = walk(&proxy.config.data_dir.join("blobs"));
    assert!(on_disk <= 4 * 1024 * 1024, "{on_disk} bytes on disk");
}

/// `n` blobs of 1 MiB in library/e, with their digests.
fn push_mib_blobs(hub: &FakeHub, seed: &str, n: usize) -> (Vec<Bytes>, Vec<String>) {
    let blobs: Vec<Bytes> = (0..n)
        .map(|i| Bytes::from(pattern(&format!("{seed}{i}"), 1024 * 1024)))
        .collect();
    let digests = blobs
        .iter()
        .map(|b| hub.push_blob("library/e", b.clone()))
        .collect();
    (blobs, digests)
}

/// A proxy whose blob store holds 4 MiB, evicting from 90 % down to 50 %.
async fn four_mib_store(hub: &FakeHub) -> TestProxy {
    TestProxy::start_with(hub, |c| {
        c.cache_max_disk = bytesize::ByteSize::mib(4);
        c.cache_high_watermark = 0.9;
        c.cache_low_watermark = 0.5;
    })
    .await
}

fn walk(dir: &std::path::Path) -> u64 {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return 0;
    };
    entries
        .flatten()
        .map(|e| {
            if e.file_type().unwrap().is_dir() {
                walk(&e.path())
            } else {
                e.metadata().unwrap().len()
            }
        })
        .sum()
}

#[tokio::test]
async fn a_restarted_proxy_serves_its_cache_with_upstream_down() {
    let hub = FakeHub::start().await;
    let image = Image::single("persist", DOCKER_MANIFEST, 300_000);
    hub.push("library/persist", "1", &image);
    let dir = Arc::new(tempfile::tempdir().unwrap());
    let config = TestProxy::config(&hub.url, dir.path());
    let proxy = TestProxy::start_config(config.clone(), Some(dir.clone())).await;
    assert_eq!(
        proxy.get("/v2/library/persist/manifests/1").await.status(),
        200
    );
    for b in &image.blobs {
        assert_eq!(
            proxy
                .get(&blob_path("library/persist", &sha256(b)))
                .await
                .bytes()
                .await
                .unwrap(),
            *b
        );
    }
    proxy.stop().await;

    let dead = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let mut offline = config.clone();
    offline.upstream = format!("http://{}", dead.local_addr().unwrap())
        .parse()
        .unwrap();
    drop(dead);
    // Put a partial download and a corrupted blob where a crash could have left them.
    std::fs::write(dir.path().join("tmp/part-crashed"), b"partial").unwrap();
    let bogus = sha256(b"the real content");
    let bogus_path = dir
        .path()
        .join("blobs/sha256")
        .join(&bogus[7..9])
        .join(&bogus[7..]);
    std::fs::create_dir_all(bogus_path.parent().unwrap()).unwrap();
    std::fs::write(&bogus_path, b"not the real content").unwrap();

    let proxy = TestProxy::start_config(offline, Some(dir.clone())).await;
    let r = proxy.get("/v2/library/persist/manifests/1").await;
    assert_eq!(r.status(), 200);
    assert_eq!(r.bytes().await.unwrap(), image.bytes);
    let r = proxy
        .get(&format!("/v2/library/persist/manifests/{}", image.digest))
        .await;
    assert_eq!(r.bytes().await.unwrap(), image.bytes);
    for b in &image.blobs {
        let r = proxy.get(&blob_path("library/persist", &sha256(b))).await;
        assert_eq!(r.headers()["x-cache"], "HIT");
        assert_eq!(r.bytes().await.unwrap(), *b);
    }
    let r = proxy.get(&blob_path("library/persist", &bogus)).await;
    assert_ne!(
        r.status(),
        200,
        "a blob that fails verification is never served"
    );
    assert!(!bogus_path.exists());
    assert!(!dir.path().join("tmp/part-crashed").exists());
}
