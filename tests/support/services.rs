//! Real services for the replica tests, each on a free loopback port and stopped on drop: an
//! S3-compatible object store (`moto_server`, from PyPI's `moto[server]`) and `redis-server`
//! (`.ci/run` installs both).

use super::{Process, eventually, free_port};
use bytes::Bytes;
use std::process::{Command, Stdio};
use std::time::Duration;

/// The bucket every replica shares.
pub const BUCKET: &str = "pullthrough-test";

/// `moto_server` with an empty bucket, [`BUCKET`].
pub struct S3 {
    process: Option<Process>,
    pub url: String,
}

impl S3 {
    pub async fn start() -> S3 {
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
        let s3 = S3 {
            process: Some(Process(process)),
            url: format!("http://127.0.0.1:{port}"),
        };
        let client = super::client();
        assert!(
            eventually(Duration::from_secs(90), async || client
                .get(&s3.url)
                .send()
                .await
                .is_ok())
            .await,
            "{} did not come up",
            s3.url
        );
        let created = client
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

    pub fn stop(&mut self) {
        self.process = None;
    }

    /// The URL of the object a replica stores under `key` (below `cache/`).
    pub fn object_url(&self, key: &str) -> String {
        format!("{}/{BUCKET}/cache/{key}", self.url)
    }

    pub async fn object(&self, key: &str) -> Option<Bytes> {
        let r = super::client()
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
    pub async fn has(&self, key: &str) -> bool {
        let listing = super::client()
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
    pub async fn wait_for(&self, key: &str) {
        assert!(
            eventually(Duration::from_secs(20), async || self.has(key).await).await,
            "{key} never reached the bucket"
        );
    }
}

/// `redis-server` without persistence.
pub struct Redis {
    process: Option<Process>,
    port: u16,
}

impl Redis {
    pub async fn start() -> Redis {
        let mut redis = Redis {
            process: None,
            port: free_port(),
        };
        redis.resume().await;
        redis
    }

    /// Starts (again) on the same port.
    pub async fn resume(&mut self) {
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
        let port = self.port;
        assert!(
            eventually(Duration::from_secs(10), async || {
                tokio::net::TcpStream::connect(("127.0.0.1", port))
                    .await
                    .is_ok()
            })
            .await,
            "redis-server did not start"
        );
    }

    pub fn stop(&mut self) {
        self.process = None;
    }

    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}/0", self.port)
    }

    /// The score of `member` in the sorted set `key`.
    pub async fn zscore(&self, key: &str, member: &str) -> Option<f64> {
        let client = redis::Client::open(self.url()).unwrap();
        let mut connection = client.get_multiplexed_async_connection().await.unwrap();
        redis::cmd("ZSCORE")
            .arg(key)
            .arg(member)
            .query_async(&mut connection)
            .await
            .unwrap()
    }
}
