//! Replicas sharing one cache through object storage and coordinating through Redis: real
//! pullthrough processes against a real S3-compatible server and a real `redis-server` (see
//! `support::services`) and the emulated Docker Hub.

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::too_many_lines,
    reason = "a test panics on what it did not expect, and may read as one long story"
)]

mod support;

use bytes::Bytes;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};
use support::binary::{Pullthrough, Running};
use support::hub::sha256;
use support::services::{BUCKET, Redis, S3};
use support::{DOCKER_MANIFEST, FakeHub, Fault, Image, eventually, free_port};

const CLUSTER_SECRET: &str = "replica-test-secret-0123";

/// A pullthrough sharing the bucket (and Redis, when given). `REPLICA_LOG`, when set, is its
/// `RUST_LOG` (it must keep `pullthrough=info`), and what it logs is shown.
fn replica(upstream: &str, s3: &S3, redis: Option<&Redis>, data: &std::path::Path) -> Pullthrough {
    let log = std::env::var("REPLICA_LOG").ok();
    // A port of its own, not port 0: the other replicas reach this one at the address it
    // listens on as configured.
    let mut binary = Pullthrough::new()
        .listen(&format!("127.0.0.1:{}", free_port()))
        .upstream(upstream)
        .data_dir(data)
        .env("PULLTHROUGH_STORAGE_URL", format!("s3://{BUCKET}/cache"))
        .envs([
            ("AWS_ENDPOINT_URL", s3.url.as_str()),
            ("AWS_ACCESS_KEY_ID", "test"),
            ("AWS_SECRET_ACCESS_KEY", "test"),
            ("AWS_REGION", "us-east-1"),
            ("AWS_ALLOW_HTTP", "true"),
        ])
        .echo(log.is_some());
    if let Some(log) = log {
        binary = binary.env("RUST_LOG", log);
    }
    if let Some(redis) = redis {
        binary = binary
            .env("PULLTHROUGH_REDIS_URL", redis.url())
            .env("PULLTHROUGH_CLUSTER_SECRET", CLUSTER_SECRET);
    }
    binary
}

/// One pullthrough process sharing the bucket (and Redis, when given).
struct Replica {
    process: Running,
    url: String,
    client: reqwest::Client,
}

impl Replica {
    async fn start(upstream: &str, s3: &S3, data: &std::path::Path) -> Replica {
        Replica::start_with(upstream, s3, None, data, &[]).await
    }

    async fn start_with(
        upstream: &str,
        s3: &S3,
        redis: Option<&Redis>,
        data: &std::path::Path,
        env: &[(&str, &str)],
    ) -> Replica {
        let process = replica(upstream, s3, redis, data)
            .env("PULLTHROUGH_UPSTREAM_DEADLINE", "2s")
            .envs(env.iter().copied())
            .start()
            .await;
        Replica {
            url: process.url.clone(),
            process,
            client: support::client(),
        }
    }

    /// A GET that may fail outright (a transfer cut before its head).
    async fn try_get(&self, path: &str) -> reqwest::Result<reqwest::Response> {
        self.client
            .get(format!("{}{path}", self.url))
            .header("Accept", DOCKER_MANIFEST)
            .send()
            .await
    }

    /// A GET's body, or the error that cut it (before its head or during the body).
    async fn try_body(&self, path: &str) -> reqwest::Result<Bytes> {
        self.try_get(path).await?.bytes().await
    }

    async fn get(&self, path: &str) -> reqwest::Response {
        self.try_get(path).await.unwrap()
    }

    async fn metrics(&self) -> String {
        self.get("/metrics").await.text().await.unwrap()
    }

    /// Object storage requests that failed (after one, a replica goes without it for 10 s).
    async fn storage_failures(&self) -> f64 {
        let text = self.metrics().await;
        let scrape =
            prometheus_parse::Scrape::parse(text.lines().map(|l| Ok(l.to_owned()))).unwrap();
        support::metric(&scrape, "pullthrough_object_storage_failures_total", &[])
    }

    /// What it logged about object storage, for an assertion's message.
    fn storage_lines(&self) -> String {
        let lines = self.process.lines();
        let about: Vec<&String> = lines
            .iter()
            .filter(|l| l.contains("object storage"))
            .collect();
        format!("{}: {about:?}", self.url)
    }

    /// Pulls the image by tag and every blob, checking each against its digest.
    async fn pull(&self, image: &Image) {
        let r = self.get("/v2/library/app/manifests/1").await;
        assert_eq!(r.status(), 200);
        assert_eq!(r.headers()["docker-content-digest"], image.digest.as_str());
        assert_eq!(r.bytes().await.unwrap(), image.bytes);
        let r = self
            .get(&format!("/v2/library/app/manifests/{}", image.digest))
            .await;
        assert_eq!(r.status(), 200);
        assert_eq!(r.bytes().await.unwrap(), image.bytes);
        for blob in &image.blobs {
            let r = self
                .get(&format!("/v2/library/app/blobs/{}", sha256(blob)))
                .await;
            assert_eq!(r.status(), 200);
            let got = r.bytes().await.unwrap();
            assert_eq!(sha256(&got), sha256(blob));
        }
    }
}

/// Milliseconds since the Unix epoch, as pullthrough writes times to Redis.
fn now_ms() -> f64 {
    let since = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH);
    since.unwrap().as_millis() as f64
}

fn hex(digest: &str) -> &str {
    digest.trim_start_matches("sha256:")
}

/// An image whose layer needs a multipart upload (parts of 8 MiB).
fn image() -> Image {
    Image::single("replicas", DOCKER_MANIFEST, 12 * 1024 * 1024 + 5)
}

/// Waits until everything of `image` is in the bucket.
async fn shared(s3: &S3, image: &Image) {
    s3.wait_for("tags/library/app/_tags/1").await;
    s3.wait_for(&format!("manifests/sha256/{}", hex(&image.digest)))
        .await;
    for blob in &image.blobs {
        s3.wait_for(&format!("blobs/sha256/{}", hex(&sha256(blob))))
            .await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs redis-server and moto_server (run by .ci/run)"]
async fn content_fetched_through_one_replica_is_served_by_the_others_without_upstream() {
    let hub = FakeHub::start().await;
    let image = image();
    hub.push("library/app", "1", &image);
    let s3 = S3::start().await;
    let dirs: Vec<_> = (0..3).map(|_| tempfile::tempdir().unwrap()).collect();
    let mut replicas = Vec::new();
    for dir in &dirs {
        replicas.push(Replica::start(&hub.url, &s3, dir.path()).await);
    }
    replicas[0].pull(&image).await;
    assert_eq!(hub.count("manifest_get"), 1);
    assert_eq!(hub.count("blob_get"), 2);
    shared(&s3, &image).await;
    // What is stored is exactly what verified.
    let layer = &image.blobs[1];
    let stored = s3
        .object(&format!("blobs/sha256/{}", hex(&sha256(layer))))
        .await
        .unwrap();
    assert_eq!(stored, *layer);

    let before = hub.total();
    for replica in &replicas[1..] {
        replica.pull(&image).await;
    }
    assert_eq!(
        hub.total(),
        before,
        "the other replicas asked upstream nothing: {:?}",
        hub.count("manifest_get")
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs redis-server and moto_server (run by .ci/run)"]
async fn replicas_restarted_empty_with_upstream_down_serve_everything_from_object_storage() {
    let hub = FakeHub::start().await;
    let image = image();
    hub.push("library/app", "1", &image);
    let s3 = S3::start().await;
    let first_dir = tempfile::tempdir().unwrap();
    let first = Replica::start(&hub.url, &s3, first_dir.path()).await;
    first.pull(&image).await;
    shared(&s3, &image).await;
    drop(first);
    hub.fault(Fault::Status(503));

    for _ in 0..2 {
        let empty = tempfile::tempdir().unwrap();
        let replica = Replica::start("http://127.0.0.1:9", &s3, empty.path()).await;
        replica.pull(&image).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs redis-server and moto_server (run by .ci/run)"]
async fn corrupt_blobs_never_reach_object_storage_and_a_damaged_object_is_replaced() {
    let hub = FakeHub::start().await;
    let image = image();
    hub.push("library/app", "1", &image);
    let s3 = S3::start().await;
    let dir = tempfile::tempdir().unwrap();
    let replica = Replica::start(&hub.url, &s3, dir.path()).await;
    let layer = &image.blobs[1];
    let key = format!("blobs/sha256/{}", hex(&sha256(layer)));
    let path = format!("/v2/library/app/blobs/{}", sha256(layer));

    // Upstream sends a corrupt layer: the client's transfer fails, nothing reaches the bucket.
    hub.fault(Fault::CorruptBlob);
    let got = replica.try_body(&path).await;
    assert!(
        got.map_or(true, |b| b.len() < layer.len()),
        "a corrupt blob arrived whole"
    );
    // Nothing to wait for when nothing happens: half a second for an upload to show, were one
    // made.
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert!(!s3.has(&key).await, "a corrupt blob was uploaded");
    hub.clear_faults();

    // A damaged object in the bucket is never served whole: it is deleted, and the blob is
    // fetched from upstream again.
    let damaged = {
        let mut bytes = layer.to_vec();
        bytes[1000] ^= 0xff;
        bytes
    };
    let put = support::client()
        .put(s3.object_url(&key))
        .body(damaged)
        .send()
        .await
        .unwrap();
    assert!(put.status().is_success());
    let other_dir = tempfile::tempdir().unwrap();
    let other = Replica::start(&hub.url, &s3, other_dir.path()).await;
    let got = other.try_body(&path).await;
    assert!(
        got.as_ref()
            .map_or(true, |b| b != layer && b.len() < layer.len()),
        "the damaged object never arrives whole"
    );
    let served = eventually(Duration::from_secs(10), async || {
        let Ok(r) = other.try_get(&path).await else {
            return false;
        };
        r.status() == 200 && r.bytes().await.is_ok_and(|bytes| bytes == *layer)
    })
    .await;
    assert!(served, "the blob was never served again");
    // Uploaded again once verified.
    s3.wait_for(&key).await;
    assert_eq!(s3.object(&key).await.unwrap(), *layer);
}

/// Three replicas coordinated through Redis.
async fn cluster(hub: &FakeHub, s3: &S3, redis: &Redis) -> (Vec<Replica>, Vec<tempfile::TempDir>) {
    cluster_with(hub, s3, redis, &[]).await
}

async fn cluster_with(
    hub: &FakeHub,
    s3: &S3,
    redis: &Redis,
    env: &[(&str, &str)],
) -> (Vec<Replica>, Vec<tempfile::TempDir>) {
    let dirs: Vec<_> = (0..3).map(|_| tempfile::tempdir().unwrap()).collect();
    let mut replicas = Vec::new();
    for dir in &dirs {
        replicas.push(Replica::start_with(&hub.url, s3, Some(redis), dir.path(), env).await);
    }
    (replicas, dirs)
}

/// Pulls `url` as a stream: (time of the first byte, time done, the bytes).
async fn timed_pull(url: String, started: Instant) -> (Duration, Duration, Vec<u8>) {
    timed_pull_by(support::client(), url, started, Arc::default()).await
}

/// [`timed_pull`] with `client`, adding one to `streaming` at the first byte.
async fn timed_pull_by(
    client: reqwest::Client,
    url: String,
    started: Instant,
    streaming: Arc<AtomicUsize>,
) -> (Duration, Duration, Vec<u8>) {
    use futures_util::StreamExt;
    let response = client.get(url).send().await.unwrap();
    assert_eq!(response.status(), 200);
    let mut stream = response.bytes_stream();
    let mut first = None;
    let mut all = Vec::new();
    while let Some(chunk) = stream.next().await {
        let chunk = chunk.unwrap();
        if first.is_none() {
            first = Some(started.elapsed());
            streaming.fetch_add(1, Ordering::SeqCst);
        }
        all.extend_from_slice(&chunk);
    }
    (first.unwrap_or_default(), started.elapsed(), all)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs redis-server and moto_server (run by .ci/run)"]
async fn concurrent_cold_pulls_on_every_replica_make_one_upstream_get() {
    let hub = FakeHub::start().await;
    let blob = Bytes::from(support::hub::pattern("cluster", 64 * 1024 * 1024));
    let digest = hub.push_blob("library/big", blob.clone());
    // 1,024 chunks of 64 KiB, 3 ms apart: the download takes over three seconds, for every
    // client to join it on a loaded machine.
    hub.fault(Fault::SlowBlob(Duration::from_millis(3)));
    let s3 = S3::start().await;
    let redis = Redis::start().await;
    let (replicas, _dirs) = cluster(&hub, &s3, &redis).await;
    let started = Instant::now();
    let mut pulls = Vec::new();
    for replica in &replicas {
        for _ in 0..20 {
            let url = format!("{}/v2/library/big/blobs/{digest}", replica.url);
            pulls.push(tokio::spawn(timed_pull(url, started)));
        }
    }
    let mut results = Vec::new();
    for pull in pulls {
        results.push(pull.await.unwrap());
    }
    let first_done = results.iter().map(|r| r.1).min().unwrap();
    for (first_byte, _, bytes) in &results {
        assert_eq!(bytes.len(), blob.len());
        assert_eq!(sha256(bytes), digest);
        assert!(
            *first_byte < first_done,
            "every client, on every replica, got its first byte before the download ended: {first_byte:?} vs {first_done:?}"
        );
    }
    assert_eq!(
        hub.count("blob_get"),
        1,
        "one upstream GET for 60 clients on 3 replicas"
    );
    assert_eq!(hub.count("cdn_get"), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs redis-server and moto_server (run by .ci/run)"]
async fn a_replica_killed_mid_download_is_replaced_and_its_followers_finish() {
    let hub = FakeHub::start().await;
    let blob = Bytes::from(support::hub::pattern("killed", 32 * 1024 * 1024));
    let digest = hub.push_blob("library/big", blob.clone());
    // 512 chunks of 64 KiB, 20 ms apart: about ten seconds, for the followers to join it on a
    // loaded machine (the resume after the kill goes at full speed).
    hub.fault(Fault::SlowBlob(Duration::from_millis(20)));
    let s3 = S3::start().await;
    let redis = Redis::start().await;
    let (mut replicas, _dirs) = cluster(&hub, &s3, &redis).await;
    let started = Instant::now();
    let path = format!("/v2/library/big/blobs/{digest}");
    // The first replica takes the lock; the others follow it.
    let owner = tokio::spawn(timed_pull(format!("{}{path}", replicas[0].url), started));
    let downloading = eventually(Duration::from_secs(10), async || hub.count("cdn_get") > 0).await;
    assert!(downloading, "the download did not start");
    let streaming = Arc::new(AtomicUsize::new(0));
    let followers: Vec<_> = replicas[1..]
        .iter()
        .map(|r| {
            let url = format!("{}{path}", r.url);
            tokio::spawn(timed_pull_by(
                support::client(),
                url,
                started,
                streaming.clone(),
            ))
        })
        .collect();
    // Killed while the followers stream from it.
    let following = eventually(Duration::from_secs(10), async || {
        streaming.load(Ordering::SeqCst) == followers.len()
    })
    .await;
    assert!(following, "the followers got no byte");
    replicas[0].process.kill();
    hub.clear_faults();
    assert!(
        owner.await.is_err(),
        "the killed replica's own client is cut off"
    );
    for follower in followers {
        let (_, _, bytes) = follower.await.unwrap();
        assert_eq!(
            sha256(&bytes),
            digest,
            "a follower got the complete verified blob"
        );
    }
    // The replica that took over resumed with a range: two upstream GETs in all, at most.
    assert!(hub.count("blob_get") <= 2, "{}", hub.count("blob_get"));
    replicas.remove(0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs redis-server and moto_server (run by .ci/run)"]
async fn with_redis_stopped_pulls_go_on_and_coordination_resumes_when_it_is_back() {
    let hub = FakeHub::start().await;
    let image = image();
    hub.push("library/app", "1", &image);
    let s3 = S3::start().await;
    let mut redis = Redis::start().await;
    let (replicas, _dirs) = cluster(&hub, &s3, &redis).await;
    replicas[0].pull(&image).await;
    shared(&s3, &image).await;
    redis.stop();
    // Cached pulls succeed on every replica, and new content is still fetched.
    for replica in &replicas {
        replica.pull(&image).await;
    }
    let fresh = Bytes::from(support::hub::pattern("new", 3 * 1024 * 1024));
    let fresh_digest = hub.push_blob("library/app", fresh.clone());
    let r = replicas[1]
        .get(&format!("/v2/library/app/blobs/{fresh_digest}"))
        .await;
    assert_eq!(r.status(), 200);
    assert_eq!(sha256(&r.bytes().await.unwrap()), fresh_digest);
    // Shown in metrics; readiness stays true.
    let metrics = replicas[1].metrics().await;
    assert!(
        metrics.contains("pullthrough_cluster_alone 1"),
        "{}",
        metrics
            .lines()
            .filter(|l| l.contains("redis") || l.contains("alone"))
            .collect::<Vec<_>>()
            .join("\n")
    );
    assert_eq!(replicas[1].get("/readyz").await.status(), 200);

    // Back: concurrent cold pulls on every replica share one download again.
    redis.resume().await;
    // Every replica back in the cluster (not resting after a Redis failure), for a second.
    let mut together_since: Option<Instant> = None;
    let rejoined = eventually(Duration::from_secs(30), async || {
        let mut all = true;
        for replica in &replicas {
            all &= replica
                .metrics()
                .await
                .contains("pullthrough_cluster_alone 0");
        }
        if !all {
            together_since = None;
            return false;
        }
        together_since.get_or_insert_with(Instant::now).elapsed() >= Duration::from_secs(1)
    })
    .await;
    assert!(rejoined, "the replicas never rejoined");
    let again = Bytes::from(support::hub::pattern("again", 16 * 1024 * 1024));
    let again_digest = hub.push_blob("library/app", again.clone());
    // 256 chunks 8 ms apart: about two seconds, for every replica to join on a loaded machine.
    hub.fault(Fault::SlowBlob(Duration::from_millis(8)));
    let started = Instant::now();
    let pulls: Vec<_> = replicas
        .iter()
        .map(|r| {
            tokio::spawn(timed_pull(
                format!("{}/v2/library/app/blobs/{again_digest}", r.url),
                started,
            ))
        })
        .collect();
    for pull in pulls {
        let (_, _, bytes) = pull.await.unwrap();
        assert_eq!(sha256(&bytes), again_digest);
    }
    let gets = hub.count("blob_get");
    // 2 for the image, 1 for `fresh`, 1 for `again`.
    assert_eq!(
        gets, 4,
        "coordination resumed: one upstream GET for `again`"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs redis-server and moto_server (run by .ci/run)"]
async fn a_tag_costs_one_get_and_one_head_per_ttl_across_the_cluster() {
    let hub = FakeHub::start().await;
    let image = image();
    hub.push("library/app", "1", &image);
    let s3 = S3::start().await;
    let redis = Redis::start().await;
    let (replicas, _dirs) = cluster_with(&hub, &s3, &redis, &[("PULLTHROUGH_TAG_TTL", "2s")]).await;

    // Concurrent cold GETs of the tag on every replica: one upstream GET (held long enough for
    // all 30 to arrive on a loaded machine).
    hub.fault(Fault::Delay(Duration::from_millis(1_500)));
    let mut gets = Vec::new();
    for replica in &replicas {
        for _ in 0..10 {
            let url = format!("{}/v2/library/app/manifests/1", replica.url);
            gets.push(tokio::spawn(async move {
                let r = support::client()
                    .get(url)
                    .header("Accept", DOCKER_MANIFEST)
                    .send()
                    .await
                    .unwrap();
                assert_eq!(r.status(), 200);
                r.bytes().await.unwrap()
            }));
        }
    }
    for get in gets {
        assert_eq!(get.await.unwrap(), image.bytes);
    }
    hub.clear_faults();
    assert_eq!(
        hub.count("manifest_get"),
        1,
        "one GET for 30 cold requests on 3 replicas"
    );
    let heads_before = hub.count("manifest_head");
    // The tag was validated at most this long ago.
    let cached = Instant::now();

    // 1,000 requests spread over the replicas across two TTL windows (4.5 s of a 2 s TTL):
    // one HEAD per window for the whole cluster, no GET.
    let started = Instant::now();
    for i in 0..1000u32 {
        let due = Duration::from_micros(4500 * u64::from(i));
        if let Some(wait) = due.checked_sub(started.elapsed()) {
            tokio::time::sleep(wait).await;
        }
        let r = replicas[i as usize % 3]
            .get("/v2/library/app/manifests/1")
            .await;
        assert_eq!(r.status(), 200);
        assert_eq!(r.headers()["docker-content-digest"], image.digest.as_str());
    }
    assert_eq!(hub.count("manifest_get"), 1, "no GET once cached");
    // Two windows when the requests kept their 4.5 s pace (a third may begin by the end when
    // they run slow): never one HEAD per replica.
    let windows = (cached.elapsed().as_secs_f64() / 2.0).ceil() as u64;
    let heads = hub.count("manifest_head") - heads_before;
    assert!(
        (2..=windows.max(2)).contains(&heads),
        "one HEAD per TTL window across three replicas: {heads} in {:?}",
        started.elapsed()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs redis-server and moto_server (run by .ci/run)"]
async fn a_429_pause_on_one_replica_holds_every_replica() {
    let hub = FakeHub::start().await;
    hub.push(
        "library/app",
        "1",
        &Image::single("one", DOCKER_MANIFEST, 1000),
    );
    hub.push(
        "library/app",
        "2",
        &Image::single("two", DOCKER_MANIFEST, 1000),
    );
    hub.push(
        "library/app",
        "3",
        &Image::single("three", DOCKER_MANIFEST, 1000),
    );
    let s3 = S3::start().await;
    let redis = Redis::start().await;
    let (replicas, _dirs) = cluster(&hub, &s3, &redis).await;
    hub.fault(Fault::TooMany(30));
    let r = replicas[0].get("/v2/library/app/manifests/1").await;
    assert_eq!(r.status(), 429);
    let gets = hub.count("manifest_get");
    assert_eq!(gets, 1);
    // Shared within half a second: the other replicas do not ask upstream while it lasts. They
    // show that they know only in how they answer, and asking one too soon would go upstream:
    // time for the sharing (every 0.5 s) to reach them, on a loaded machine too.
    tokio::time::sleep(Duration::from_secs(4)).await;
    hub.clear_faults();
    for (replica, tag) in replicas[1..].iter().zip(["2", "3"]) {
        let r = replica
            .get(&format!("/v2/library/app/manifests/{tag}"))
            .await;
        assert_eq!(r.status(), 429, "paused by another replica's 429");
        assert!(r.headers().contains_key("retry-after"));
    }
    assert_eq!(
        hub.count("manifest_get"),
        gets,
        "no manifest GET during the pause"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs redis-server and moto_server (run by .ci/run)"]
async fn a_purge_through_one_replica_takes_effect_on_every_replica() {
    let hub = FakeHub::start().await;
    let image = image();
    hub.push("library/app", "1", &image);
    let s3 = S3::start().await;
    let redis = Redis::start().await;
    let (replicas, _dirs) = cluster(&hub, &s3, &redis).await;
    for replica in &replicas {
        replica.pull(&image).await;
    }
    assert_eq!(hub.count("manifest_get"), 1);
    let layer = sha256(&image.blobs[1]);
    for path in [
        "/_pullthrough/cache/library/app/manifests/1".to_owned(),
        format!("/_pullthrough/cache/blobs/{layer}"),
    ] {
        let r = support::client()
            .delete(format!("{}{path}", replicas[0].url))
            .send()
            .await
            .unwrap();
        assert!(r.status().is_success(), "{path}: {}", r.status());
    }
    // Every replica has dropped both (the cache API only looks, it never fetches).
    let client = support::client();
    let purged = eventually(Duration::from_secs(10), async || {
        for replica in &replicas {
            let json = async |path: String| -> serde_json::Value {
                let url = format!("{}/_pullthrough/cache/{path}", replica.url);
                client.get(url).send().await.unwrap().json().await.unwrap()
            };
            if !json("library/app/manifests/1".into()).await["tag"].is_null()
                || json(format!("blobs/{layer}")).await["cached"] != false
            {
                return false;
            }
        }
        true
    })
    .await;
    assert!(purged, "the purge did not reach every replica");
    let (manifest_gets, blob_gets) = (hub.count("manifest_get"), hub.count("blob_get"));
    let mut failures_before = 0.0;
    for replica in &replicas {
        failures_before += replica.storage_failures().await;
    }
    // The tag and the blob are gone everywhere: no replica serves them from its cache, and
    // the cluster fetches each once more.
    for replica in &replicas {
        let r = replica.get("/v2/library/app/manifests/1").await;
        assert_eq!(r.status(), 200);
        let cache = r.headers()["x-cache"].to_str().unwrap().to_owned();
        assert_ne!(
            cache, "HIT",
            "the purged tag was still served from a replica's cache"
        );
        let r = replica.get(&format!("/v2/library/app/blobs/{layer}")).await;
        assert_eq!(r.status(), 200);
        assert_ne!(
            r.headers()["x-cache"],
            "HIT",
            "the purged blob was still on a replica"
        );
        assert_eq!(sha256(&r.bytes().await.unwrap()), layer);
    }
    let mut failures = 0.0;
    for replica in &replicas {
        failures += replica.storage_failures().await;
    }
    let logged: Vec<String> = replicas.iter().map(Replica::storage_lines).collect();
    if failures > failures_before {
        // A bucket that failed (a request over 5 s on a loaded machine) is left alone for
        // 10 s: each replica then fetches for itself, once, as designed.
        eprintln!("object storage failed meanwhile: {logged:?}");
        assert!(hub.count("manifest_get") <= manifest_gets + 3, "{logged:?}");
        assert!(hub.count("blob_get") <= blob_gets + 3, "{logged:?}");
    } else {
        assert_eq!(hub.count("manifest_get"), manifest_gets + 1, "{logged:?}");
        assert_eq!(hub.count("blob_get"), blob_gets + 1, "{logged:?}");
    }
}

/// A replica applies another's purge up to half a second late. By then the purging replica
/// may have fetched the tag again and shared the new entry: applying the purge must not
/// delete that entry from object storage, or every replica fetches the tag once more.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs redis-server and moto_server (run by .ci/run)"]
async fn a_purge_applied_late_keeps_what_was_fetched_since() {
    let hub = FakeHub::start().await;
    let image = image();
    hub.push("library/app", "1", &image);
    let s3 = S3::start().await;
    let redis = Redis::start().await;
    let (replicas, _dirs) = cluster(&hub, &s3, &redis).await;
    for replica in &replicas {
        replica.pull(&image).await;
    }
    assert_eq!(hub.count("manifest_get"), 1);
    let client = support::client();
    let tag =
        |replica: &Replica| format!("{}/_pullthrough/cache/library/app/manifests/1", replica.url);
    // Purged and fetched again through the first replica, before the others apply the purge
    // (they read the announcements every half second).
    let r = client.delete(tag(&replicas[0])).send().await.unwrap();
    assert!(r.status().is_success(), "{}", r.status());
    let r = replicas[0].get("/v2/library/app/manifests/1").await;
    assert_eq!(r.status(), 200);
    assert_ne!(r.headers()["x-cache"], "HIT");
    assert_eq!(hub.count("manifest_get"), 2);
    let applied = eventually(Duration::from_secs(10), async || {
        for replica in &replicas[1..] {
            let view: serde_json::Value = client
                .get(tag(replica))
                .send()
                .await
                .unwrap()
                .json()
                .await
                .unwrap();
            if !view["tag"].is_null() {
                return false;
            }
        }
        true
    })
    .await;
    assert!(applied, "the purge did not reach every replica");
    // The others take the entry the first stored after its purge.
    for replica in &replicas[1..] {
        let r = replica.get("/v2/library/app/manifests/1").await;
        assert_eq!(r.status(), 200);
        assert_eq!(r.bytes().await.unwrap(), image.bytes);
    }
    let logged: Vec<String> = replicas.iter().map(Replica::storage_lines).collect();
    assert_eq!(hub.count("manifest_get"), 2, "{logged:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs redis-server and moto_server (run by .ci/run)"]
async fn a_purge_through_one_replica_forgets_a_remembered_404_on_every_replica() {
    let hub = FakeHub::start().await;
    hub.push("library/app", "1", &image());
    let s3 = S3::start().await;
    let redis = Redis::start().await;
    let (replicas, _dirs) =
        cluster_with(&hub, &s3, &redis, &[("PULLTHROUGH_NEGATIVE_TTL", "10m")]).await;
    let path = "/v2/library/app/manifests/late";
    for replica in &replicas {
        for _ in 0..3 {
            assert_eq!(replica.get(path).await.status(), 404);
        }
    }
    let asked = hub.count(&format!("GET {path}"));
    assert!(asked <= 3, "{asked} GETs: each replica remembers its 404");
    // Pushed upstream: still remembered everywhere, until a purge through one replica.
    hub.push(
        "library/app",
        "late",
        &Image::single("late", DOCKER_MANIFEST, 10),
    );
    for replica in &replicas {
        assert_eq!(replica.get(path).await.status(), 404);
    }
    assert_eq!(hub.count(&format!("GET {path}")), asked);
    let r = support::client()
        .delete(format!(
            "{}/_pullthrough/cache/library/app/manifests/late",
            replicas[0].url
        ))
        .send()
        .await
        .unwrap();
    assert!(r.status().is_success(), "{}", r.status());
    let forgotten = eventually(Duration::from_secs(10), async || {
        for replica in &replicas {
            if replica.get(path).await.status() != 200 {
                return false;
            }
        }
        true
    })
    .await;
    assert!(forgotten, "a replica still answered its remembered 404");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs redis-server and moto_server (run by .ci/run)"]
async fn with_object_storage_down_cached_pulls_go_on_and_new_content_is_fetched() {
    let hub = FakeHub::start().await;
    let image = image();
    hub.push("library/app", "1", &image);
    let mut s3 = S3::start().await;
    let redis = Redis::start().await;
    let (replicas, _dirs) = cluster(&hub, &s3, &redis).await;
    replicas[0].pull(&image).await;
    shared(&s3, &image).await;
    s3.stop();
    // What a replica holds is served; what it does not is fetched from upstream, verified.
    replicas[0].pull(&image).await;
    replicas[1].pull(&image).await;
    let fresh = Bytes::from(support::hub::pattern("fresh", 2 * 1024 * 1024));
    let digest = hub.push_blob("library/app", fresh.clone());
    let r = replicas[2]
        .get(&format!("/v2/library/app/blobs/{digest}"))
        .await;
    assert_eq!(r.status(), 200);
    assert_eq!(sha256(&r.bytes().await.unwrap()), digest);
    let metrics = replicas[1].metrics().await;
    let failures: f64 = metrics
        .lines()
        .find_map(|l| l.strip_prefix("pullthrough_object_storage_failures_total "))
        .and_then(|v| v.parse().ok())
        .unwrap_or(0.0);
    assert!(failures > 0.0, "object storage failures are counted");
    assert_eq!(replicas[1].get("/readyz").await.status(), 200);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs redis-server and moto_server (run by .ci/run)"]
async fn object_storage_is_kept_under_its_limit_least_recently_used_across_the_cluster_first() {
    let hub = FakeHub::start().await;
    let blobs: Vec<Bytes> = ["x", "y", "z"]
        .iter()
        .map(|seed| Bytes::from(support::hub::pattern(seed, 12 * 1024 * 1024)))
        .collect();
    let digests: Vec<String> = blobs
        .iter()
        .map(|b| hub.push_blob("library/app", b.clone()))
        .collect();
    let s3 = S3::start().await;
    let redis = Redis::start().await;
    let (replicas, _dirs) = cluster_with(
        &hub,
        &s3,
        &redis,
        &[("PULLTHROUGH_STORAGE_MAX_BYTES", "30 MiB")],
    )
    .await;
    let key = |d: &str| format!("blobs/sha256/{}", hex(d));
    async fn pull(replica: &Replica, digest: &str) {
        let r = replica
            .get(&format!("/v2/library/app/blobs/{digest}"))
            .await;
        assert_eq!(r.status(), 200);
        assert_eq!(sha256(&r.bytes().await.unwrap()), digest);
    }
    pull(&replicas[0], &digests[0]).await;
    s3.wait_for(&key(&digests[0])).await;
    pull(&replicas[1], &digests[1]).await;
    s3.wait_for(&key(&digests[1])).await;
    // Every replica's access times reach Redis (each flushes every 5 s) before x is used. A
    // flush with nothing newer to write leaves no trace, so time must pass; and a flush writes
    // its own time, so y's coming after x is used again would make y look the newer.
    tokio::time::sleep(Duration::from_secs(8)).await;
    // x is used again, on another replica (read from object storage): y is now the coldest,
    // once that replica's flush brings x's new access time to Redis.
    let used = now_ms();
    pull(&replicas[2], &digests[0]).await;
    let flushed = eventually(Duration::from_secs(10), async || {
        redis
            .zscore("pullthrough:blobs:access", &digests[0])
            .await
            .is_some_and(|at| at >= used)
    })
    .await;
    assert!(flushed, "x's new access time never reached Redis");
    // z takes the bucket to 36 MiB: over 30, so y goes (down to 27 MiB).
    pull(&replicas[0], &digests[2]).await;
    s3.wait_for(&key(&digests[2])).await;
    let evicted = eventually(Duration::from_secs(20), async || {
        !s3.has(&key(&digests[1])).await
    })
    .await;
    assert!(evicted, "the least recently used blob was never evicted");
    assert!(
        s3.has(&key(&digests[0])).await,
        "the recently used blob stays"
    );
    assert!(s3.has(&key(&digests[2])).await, "the newest blob stays");
    // Evicted from the bucket only: the replica that holds y still serves it without upstream.
    let gets = hub.count("blob_get");
    pull(&replicas[1], &digests[1]).await;
    assert_eq!(hub.count("blob_get"), gets);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs redis-server and moto_server (run by .ci/run)"]
async fn blobs_fetched_with_credentials_are_shared_only_where_upstream_shows_them() {
    let hub = FakeHub::start().await;
    hub.add_user("svc", "svc-password");
    let secret = Image::single("secret", DOCKER_MANIFEST, 3 * 1024 * 1024);
    hub.push("org/secret", "1", &secret);
    hub.push(
        "org/other",
        "1",
        &Image::single("other", DOCKER_MANIFEST, 1000),
    );
    hub.make_private("org/secret");
    hub.make_private("org/other");
    let s3 = S3::start().await;
    let redis = Redis::start().await;
    let credentials = [
        ("PULLTHROUGH_UPSTREAM_USERNAME", "svc"),
        ("PULLTHROUGH_UPSTREAM_PASSWORD", "svc-password"),
    ];
    let (replicas, _dirs) = cluster_with(&hub, &s3, &redis, &credentials).await;
    let layer = sha256(&secret.blobs[1]);
    let r = replicas[0]
        .get(&format!("/v2/org/secret/blobs/{layer}"))
        .await;
    assert_eq!(r.status(), 200);
    assert_eq!(sha256(&r.bytes().await.unwrap()), layer);
    s3.wait_for(&format!("blobs/sha256/{}", hex(&layer))).await;

    // Another replica serves it from object storage to the repository upstream shows it in,
    // after one upstream HEAD, with no upstream GET.
    let (gets, heads) = (hub.count("blob_get"), hub.count("blob_head"));
    let r = replicas[1]
        .get(&format!("/v2/org/secret/blobs/{layer}"))
        .await;
    assert_eq!(r.status(), 200);
    assert_eq!(sha256(&r.bytes().await.unwrap()), layer);
    assert_eq!(hub.count("blob_get"), gets, "read from object storage");
    assert_eq!(
        hub.count("blob_head"),
        heads + 1,
        "after upstream showed it"
    );

    // Never to a repository upstream does not show it in.
    let r = replicas[2]
        .get(&format!("/v2/org/other/blobs/{layer}"))
        .await;
    assert_eq!(
        r.status(),
        404,
        "a private blob was served to another repository"
    );

    // Nor while another replica is still downloading it (streamed from that replica).
    let slow = Bytes::from(support::hub::pattern("slow-secret", 8 * 1024 * 1024));
    let slow_digest = hub.push_blob("org/secret", slow.clone());
    hub.fault(Fault::SlowBlob(Duration::from_millis(5)));
    let gets = hub.count("blob_get");
    let owner = tokio::spawn(timed_pull(
        format!("{}/v2/org/secret/blobs/{slow_digest}", replicas[0].url),
        Instant::now(),
    ));
    let downloading = eventually(Duration::from_secs(10), async || {
        hub.count("blob_get") > gets
    })
    .await;
    assert!(downloading, "the download did not start");
    let r = replicas[2]
        .get(&format!("/v2/org/other/blobs/{slow_digest}"))
        .await;
    assert_eq!(
        r.status(),
        404,
        "a private download was streamed to another repository"
    );
    let (_, _, bytes) = owner.await.unwrap();
    assert_eq!(sha256(&bytes), slow_digest);
    assert_eq!(hub.count("blob_get"), gets + 1, "one upstream GET in all");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs redis-server and moto_server (run by .ci/run)"]
async fn the_internal_blob_endpoint_needs_the_cluster_secret_and_never_fetches() {
    let hub = FakeHub::start().await;
    let image = image();
    hub.push("library/app", "1", &image);
    let s3 = S3::start().await;
    let redis = Redis::start().await;
    let dir = tempfile::tempdir().unwrap();
    let replica = Replica::start_with(&hub.url, &s3, Some(&redis), dir.path(), &[]).await;
    let config = sha256(&image.blobs[0]);
    let url = format!("{}/_pullthrough/cluster/blobs/{config}", replica.url);
    let client = support::client();
    for auth in [None, Some("Bearer wrong-secret-0000000000")] {
        let mut request = client.get(&url);
        if let Some(auth) = auth {
            request = request.header("authorization", auth);
        }
        assert_eq!(request.send().await.unwrap().status(), 401, "{auth:?}");
    }
    let secret = format!("Bearer {CLUSTER_SECRET}");
    let r = client
        .get(&url)
        .header("authorization", &secret)
        .send()
        .await
        .unwrap();
    assert_eq!(
        r.status(),
        404,
        "not held here: never fetched for another replica"
    );
    assert_eq!(hub.count("blob_get"), 0);
    // Held here: served, ranges included.
    replica.pull(&image).await;
    let r = client
        .get(&url)
        .header("authorization", &secret)
        .header("range", "bytes=2-")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 206);
    assert_eq!(r.bytes().await.unwrap(), image.blobs[0].slice(2..));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs redis-server and moto_server (run by .ci/run)"]
async fn replicas_serving_tls_stream_blobs_to_each_other_trusting_their_certificate() {
    let hub = FakeHub::start().await;
    let blob = Bytes::from(support::hub::pattern("tls", 16 * 1024 * 1024));
    let digest = hub.push_blob("library/big", blob.clone());
    // 256 chunks 8 ms apart: about two seconds, for the other replicas to join.
    hub.fault(Fault::SlowBlob(Duration::from_millis(8)));
    let s3 = S3::start().await;
    let redis = Redis::start().await;
    // A CA and a certificate for 127.0.0.1 it signed; the replicas' tls_cert file has both.
    let (ca, cert, key) = support::ca_and_certificate("127.0.0.1");
    let certs = tempfile::tempdir().unwrap();
    let (cert_file, key_file) = (certs.path().join("cert.pem"), certs.path().join("key.pem"));
    std::fs::write(&cert_file, format!("{cert}{ca}")).unwrap();
    std::fs::write(&key_file, key).unwrap();
    let client = reqwest::Client::builder()
        .no_proxy()
        .tls_certs_only([reqwest::Certificate::from_pem(ca.as_bytes()).unwrap()])
        .build()
        .unwrap();
    let dirs: Vec<_> = (0..2).map(|_| tempfile::tempdir().unwrap()).collect();
    let mut replicas = Vec::new();
    for dir in &dirs {
        let binary = replica(&hub.url, &s3, Some(&redis), dir.path())
            .env("PULLTHROUGH_TLS_CERT", &cert_file)
            .env("PULLTHROUGH_TLS_KEY", &key_file);
        replicas.push(binary.start().await);
    }
    let started = Instant::now();
    let pulls: Vec<_> = replicas
        .iter()
        .map(|replica| {
            let url = format!("{}/v2/library/big/blobs/{digest}", replica.url);
            tokio::spawn(timed_pull_by(client.clone(), url, started, Arc::default()))
        })
        .collect();
    let mut results = Vec::new();
    for pull in pulls {
        results.push(pull.await.unwrap());
    }
    let first_done = results.iter().map(|r| r.1).min().unwrap();
    for (first_byte, _, bytes) in &results {
        assert_eq!(sha256(bytes), digest);
        // Streamed from the downloading replica over TLS, not read from the bucket afterwards.
        assert!(*first_byte < first_done, "{first_byte:?} vs {first_done:?}");
    }
    assert_eq!(
        hub.count("blob_get"),
        1,
        "one upstream GET for both replicas"
    );
}
