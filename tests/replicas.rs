//! Replicas sharing one cache through object storage and coordinating through Redis: real
//! pullthrough processes against a real S3-compatible server (`moto_server`, from PyPI's
//! `moto[server]`), a real `redis-server` (`.ci/run` installs both) and the emulated Docker Hub.

mod support;

use bytes::Bytes;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};
use support::hub::sha256;
use support::{DOCKER_MANIFEST, FakeHub, Fault, Image, Process, free_port};

const BUCKET: &str = "pullthrough-test";

async fn wait_up(url: &str) {
    let client = support::client();
    let deadline = Instant::now() + Duration::from_secs(30);
    while client.get(url).send().await.is_err() {
        assert!(Instant::now() < deadline, "{url} did not come up");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// `moto_server` on a free loopback port, with an empty bucket.
struct S3 {
    process: Option<Process>,
    url: String,
}

impl S3 {
    async fn start() -> S3 {
        let binary = std::env::var("MOTO_SERVER")
            .ok()
            .or_else(|| {
                ["/opt/pullthrough-moto/bin/moto_server"]
                    .into_iter()
                    .find(|p| std::path::Path::new(p).exists())
                    .map(str::to_owned)
            })
            .unwrap_or_else(|| "moto_server".to_owned());
        let port = free_port();
        let process = Command::new(&binary)
            .args(["-H", "127.0.0.1", "-p", &port.to_string()])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap_or_else(|e| {
                panic!("cannot run {binary} ({e}): install moto[server] (.ci/run does)")
            });
        let url = format!("http://127.0.0.1:{port}");
        let s3 = S3 {
            process: Some(Process(process)),
            url,
        };
        wait_up(&s3.url).await;
        let created = support::client()
            .put(format!("{}/{BUCKET}", s3.url))
            .send()
            .await
            .unwrap();
        assert!(
            created.status().is_success(),
            "bucket: {}",
            created.status()
        );
        s3
    }

    fn stop(&mut self) {
        self.process = None;
    }

    fn object_url(&self, key: &str) -> String {
        format!("{}/{BUCKET}/cache/{key}", self.url)
    }

    async fn object(&self, key: &str) -> Option<Bytes> {
        let r = support::client()
            .get(self.object_url(key))
            .send()
            .await
            .unwrap();
        if !r.status().is_success() {
            return None;
        }
        Some(r.bytes().await.unwrap())
    }

    /// Whether `key` is in the bucket, by listing (moto refuses some unsigned GETs).
    async fn has(&self, key: &str) -> bool {
        let listing = support::client()
            .get(format!(
                "{}/{BUCKET}?list-type=2&prefix=cache/{key}",
                self.url
            ))
            .send()
            .await
            .unwrap()
            .text()
            .await
            .unwrap();
        listing.contains(&format!("<Key>cache/{key}</Key>"))
    }

    /// Waits until `key` is in the bucket (uploads run behind the responses).
    async fn wait_for(&self, key: &str) {
        let deadline = Instant::now() + Duration::from_secs(20);
        while !self.has(key).await {
            assert!(Instant::now() < deadline, "{key} never reached the bucket");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}

/// `redis-server` on a free loopback port, without persistence.
struct Redis {
    process: Option<Process>,
    port: u16,
}

impl Redis {
    fn start() -> Redis {
        let port = free_port();
        let mut redis = Redis {
            process: None,
            port,
        };
        redis.resume();
        redis
    }

    /// Starts (again) on the same port.
    fn resume(&mut self) {
        let process = Command::new("redis-server")
            .args([
                "--port",
                &self.port.to_string(),
                "--bind",
                "127.0.0.1",
                "--save",
                "",
                "--appendonly",
                "no",
            ])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("redis-server (apt-get install redis-server; .ci/run does)");
        self.process = Some(Process(process));
        let deadline = Instant::now() + Duration::from_secs(10);
        while std::net::TcpStream::connect(("127.0.0.1", self.port)).is_err() {
            assert!(Instant::now() < deadline, "redis-server did not start");
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    fn stop(&mut self) {
        self.process = None;
    }

    fn url(&self) -> String {
        format!("redis://127.0.0.1:{}/0", self.port)
    }
}

/// One pullthrough process sharing the bucket (and Redis, when given).
struct Replica {
    process: Process,
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
        let port = free_port();
        let mut command = Command::new(env!("CARGO_BIN_EXE_pullthrough"));
        command.envs(env.iter().copied());
        if let Some(redis) = redis {
            command
                .env("PULLTHROUGH_REDIS_URL", redis.url())
                .env("PULLTHROUGH_CLUSTER_SECRET", "replica-test-secret-0123");
        }
        let process = command
            .env("PULLTHROUGH_UPSTREAM", upstream)
            .env("PULLTHROUGH_DATA_DIR", data)
            .env("PULLTHROUGH_LISTEN", format!("127.0.0.1:{port}"))
            .env("PULLTHROUGH_UPSTREAM_DEADLINE", "2s")
            .env("PULLTHROUGH_STORAGE_URL", format!("s3://{BUCKET}/cache"))
            .env("AWS_ENDPOINT_URL", &s3.url)
            .env("AWS_ACCESS_KEY_ID", "test")
            .env("AWS_SECRET_ACCESS_KEY", "test")
            .env("AWS_REGION", "us-east-1")
            .env("AWS_ALLOW_HTTP", "true")
            .env(
                "RUST_LOG",
                std::env::var("REPLICA_LOG").unwrap_or("pullthrough=warn".into()),
            )
            .stdout(if std::env::var("REPLICA_LOG").is_ok() {
                Stdio::inherit()
            } else {
                Stdio::null()
            })
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        let url = format!("http://127.0.0.1:{port}");
        wait_up(&format!("{url}/v2/")).await;
        Replica {
            process: Process(process),
            url,
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

    async fn get(&self, path: &str) -> reqwest::Response {
        self.client
            .get(format!("{}{path}", self.url))
            .header("Accept", DOCKER_MANIFEST)
            .send()
            .await
            .unwrap()
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
    let got = match replica.try_get(&path).await {
        Ok(r) => r.bytes().await,
        Err(e) => Err(e),
    };
    assert!(
        got.map_or(true, |b| b != *layer),
        "a corrupt blob arrived whole"
    );
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
    let got = match other.try_get(&path).await {
        Ok(first) => first.bytes().await,
        Err(e) => Err(e),
    };
    assert!(
        got.as_ref()
            .map_or(true, |b| b != layer && b.len() < layer.len()),
        "the damaged object never arrives whole"
    );
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        if let Ok(r) = other.try_get(&path).await
            && r.status() == 200
            && let Ok(bytes) = r.bytes().await
            && bytes == *layer
        {
            break;
        }
        assert!(Instant::now() < deadline, "the blob was never served again");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
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
    use futures_util::StreamExt;
    let response = support::client().get(url).send().await.unwrap();
    assert_eq!(response.status(), 200);
    let mut stream = response.bytes_stream();
    let mut first = None;
    let mut all = Vec::new();
    while let Some(chunk) = stream.next().await {
        let chunk = chunk.unwrap();
        first.get_or_insert(started.elapsed());
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
    // 1,024 chunks of 64 KiB, 1 ms apart: the download takes over a second.
    hub.fault(Fault::SlowBlob(Duration::from_millis(1)));
    let s3 = S3::start().await;
    let redis = Redis::start();
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
    // 512 chunks of 64 KiB, 4 ms apart: about two seconds.
    hub.fault(Fault::SlowBlob(Duration::from_millis(4)));
    let s3 = S3::start().await;
    let redis = Redis::start();
    let (mut replicas, _dirs) = cluster(&hub, &s3, &redis).await;
    let started = Instant::now();
    let path = format!("/v2/library/big/blobs/{digest}");
    // The first replica takes the lock; the others follow it.
    let owner = tokio::spawn(timed_pull(format!("{}{path}", replicas[0].url), started));
    let deadline = Instant::now() + Duration::from_secs(10);
    while hub.count("cdn_get") == 0 {
        assert!(Instant::now() < deadline, "the download did not start");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let followers: Vec<_> = replicas[1..]
        .iter()
        .map(|r| tokio::spawn(timed_pull(format!("{}{path}", r.url), started)))
        .collect();
    tokio::time::sleep(Duration::from_millis(500)).await;
    replicas[0].process.0.kill().unwrap();
    replicas[0].process.0.wait().unwrap();
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
    let mut redis = Redis::start();
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
    let metrics = replicas[1].get("/metrics").await.text().await.unwrap();
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
    redis.resume();
    // Every replica back in the cluster (not resting after a Redis failure), twice in a row.
    let deadline = Instant::now() + Duration::from_secs(30);
    let mut together = 0;
    while together < 2 {
        assert!(Instant::now() < deadline, "the replicas never rejoined");
        tokio::time::sleep(Duration::from_secs(1)).await;
        let mut all = true;
        for replica in &replicas {
            let metrics = replica.get("/metrics").await.text().await.unwrap();
            all &= metrics.contains("pullthrough_cluster_alone 0");
        }
        together = if all { together + 1 } else { 0 };
    }
    let again = Bytes::from(support::hub::pattern("again", 16 * 1024 * 1024));
    let again_digest = hub.push_blob("library/app", again.clone());
    hub.fault(Fault::SlowBlob(Duration::from_millis(2)));
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
    let redis = Redis::start();
    let (replicas, _dirs) = cluster_with(&hub, &s3, &redis, &[("PULLTHROUGH_TAG_TTL", "2s")]).await;

    // Concurrent cold GETs of the tag on every replica: one upstream GET.
    hub.fault(Fault::Delay(Duration::from_millis(300)));
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
    let redis = Redis::start();
    let (replicas, _dirs) = cluster(&hub, &s3, &redis).await;
    hub.fault(Fault::TooMany(30));
    let r = replicas[0].get("/v2/library/app/manifests/1").await;
    assert_eq!(r.status(), 429);
    let gets = hub.count("manifest_get");
    assert_eq!(gets, 1);
    // Shared within half a second: the other replicas do not ask upstream while it lasts.
    tokio::time::sleep(Duration::from_millis(1500)).await;
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
    let redis = Redis::start();
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
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let (manifest_gets, blob_gets) = (hub.count("manifest_get"), hub.count("blob_get"));
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
    assert_eq!(hub.count("manifest_get"), manifest_gets + 1);
    assert_eq!(hub.count("blob_get"), blob_gets + 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs redis-server and moto_server (run by .ci/run)"]
async fn with_object_storage_down_cached_pulls_go_on_and_new_content_is_fetched() {
    let hub = FakeHub::start().await;
    let image = image();
    hub.push("library/app", "1", &image);
    let mut s3 = S3::start().await;
    let redis = Redis::start();
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
    let metrics = replicas[1].get("/metrics").await.text().await.unwrap();
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
    let redis = Redis::start();
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
    // Every replica's access times reach Redis (each flushes every 5 s) before x is used.
    tokio::time::sleep(Duration::from_secs(6)).await;
    // x is used again, on another replica (read from object storage): y is now the coldest.
    pull(&replicas[2], &digests[0]).await;
    tokio::time::sleep(Duration::from_secs(6)).await;
    // z takes the bucket to 36 MiB: over 30, so y goes (down to 27 MiB).
    pull(&replicas[0], &digests[2]).await;
    s3.wait_for(&key(&digests[2])).await;
    let deadline = Instant::now() + Duration::from_secs(20);
    while s3.has(&key(&digests[1])).await {
        assert!(
            Instant::now() < deadline,
            "the least recently used blob was never evicted"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
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
    let redis = Redis::start();
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
    let deadline = Instant::now() + Duration::from_secs(10);
    while hub.count("blob_get") == gets {
        assert!(Instant::now() < deadline, "the download did not start");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
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
    let redis = Redis::start();
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
    let secret = "Bearer replica-test-secret-0123";
    let r = client
        .get(&url)
        .header("authorization", secret)
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
        .header("authorization", secret)
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
    hub.fault(Fault::SlowBlob(Duration::from_millis(2)));
    let s3 = S3::start().await;
    let redis = Redis::start();
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
        let port = free_port();
        let process = Command::new(env!("CARGO_BIN_EXE_pullthrough"))
            .env("PULLTHROUGH_UPSTREAM", &hub.url)
            .env("PULLTHROUGH_DATA_DIR", dir.path())
            .env("PULLTHROUGH_LISTEN", format!("127.0.0.1:{port}"))
            .env("PULLTHROUGH_TLS_CERT", &cert_file)
            .env("PULLTHROUGH_TLS_KEY", &key_file)
            .env("PULLTHROUGH_STORAGE_URL", format!("s3://{BUCKET}/cache"))
            .env("PULLTHROUGH_REDIS_URL", redis.url())
            .env("PULLTHROUGH_CLUSTER_SECRET", "replica-test-secret-0123")
            .env("AWS_ENDPOINT_URL", &s3.url)
            .env("AWS_ACCESS_KEY_ID", "test")
            .env("AWS_SECRET_ACCESS_KEY", "test")
            .env("AWS_REGION", "us-east-1")
            .env("AWS_ALLOW_HTTP", "true")
            .env("RUST_LOG", "pullthrough=warn")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        let url = format!("https://127.0.0.1:{port}");
        let deadline = Instant::now() + Duration::from_secs(30);
        while client.get(format!("{url}/v2/")).send().await.is_err() {
            assert!(Instant::now() < deadline, "{url} did not come up");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        replicas.push((Process(process), url));
    }
    let started = Instant::now();
    let pulls: Vec<_> = replicas
        .iter()
        .map(|(_, url)| {
            let (client, url) = (
                client.clone(),
                format!("{url}/v2/library/big/blobs/{digest}"),
            );
            tokio::spawn(async move {
                use futures_util::StreamExt;
                let r = client.get(url).send().await.unwrap();
                assert_eq!(r.status(), 200);
                let (mut first, mut all) = (None, Vec::new());
                let mut stream = r.bytes_stream();
                while let Some(chunk) = stream.next().await {
                    first.get_or_insert(started.elapsed());
                    all.extend_from_slice(&chunk.unwrap());
                }
                (first.unwrap_or_default(), started.elapsed(), all)
            })
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
