//! Replicas sharing one cache through object storage: real pullthrough processes against a real
//! S3-compatible server (`moto_server`, from PyPI's `moto[server]`; `.ci/run` installs it) and
//! the emulated Docker Hub.

mod support;

use bytes::Bytes;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};
use support::hub::sha256;
use support::{DOCKER_MANIFEST, FakeHub, Fault, Image};

const BUCKET: &str = "pullthrough-test";

/// A child process killed with the test.
struct Process(Child);

impl Drop for Process {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

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
    _process: Process,
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
            _process: Process(process),
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

/// One pullthrough process sharing the bucket.
struct Replica {
    _process: Process,
    url: String,
}

impl Replica {
    async fn start(upstream: &str, s3: &S3, data: &std::path::Path) -> Replica {
        let port = free_port();
        let process = Command::new(env!("CARGO_BIN_EXE_pullthrough"))
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
            .env("RUST_LOG", "pullthrough=warn")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        let url = format!("http://127.0.0.1:{port}");
        wait_up(&format!("{url}/v2/")).await;
        Replica {
            _process: Process(process),
            url,
        }
    }

    async fn get(&self, path: &str) -> reqwest::Response {
        support::client()
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
    let got = replica.get(&path).await.bytes().await;
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
    let first = other.get(&path).await;
    let got = first.bytes().await;
    assert!(
        got.as_ref()
            .map_or(true, |b| b != layer && b.len() < layer.len()),
        "the damaged object never arrives whole"
    );
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let r = other.get(&path).await;
        if r.status() == 200
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
