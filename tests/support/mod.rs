//! Test support: an emulated Docker Hub (registry, token realm on another port, blob CDN on a
//! third), image fixtures, a running pullthrough (in this process here, the binary in
//! `binary`), the replica tests' object store and Redis (`services`), and `eventually` for
//! waiting on what runs in the background. Everything binds to loopback and stops when dropped.
// Each test binary uses some of what is here.
#![allow(dead_code)]

pub mod binary;
pub mod hostile;
pub mod hub;
pub mod services;

use pullthrough::Config;

/// The Docker image manifest media type.
pub const DOCKER_MANIFEST: &str = pullthrough::registry::MediaType::DOCKER_MANIFEST;
use std::sync::Arc;
use std::time::Duration;
use tokio::net::TcpListener;
use tokio::sync::oneshot;

// Not every test binary names all three.
#[allow(unused_imports)]
pub use hub::{FakeHub, Fault, Gate, Image};

/// A pullthrough running against some upstream, stopped on drop.
pub struct TestProxy {
    pub url: String,
    pub config: Config,
    stop: Option<oneshot::Sender<()>>,
    task: Option<tokio::task::JoinHandle<()>>,
    _dir: Option<Arc<tempfile::TempDir>>,
    pub client: reqwest::Client,
}

impl TestProxy {
    /// A config pointing at `upstream`, with a fresh data dir.
    pub fn config(upstream: &str, dir: &std::path::Path) -> Config {
        Config {
            upstream: upstream.parse().unwrap(),
            data_dir: dir.to_path_buf(),
            listen: "127.0.0.1:0".parse().unwrap(),
            // The tests' disk may be nearly full; only the free-space tests set this.
            cache_min_free_disk: bytesize::ByteSize::b(0),
            ..Config::default()
        }
    }

    pub async fn start(hub: &FakeHub) -> TestProxy {
        Self::start_with(hub, |_| {}).await
    }

    /// A proxy in front of any registry URL.
    pub async fn start_with_upstream(upstream: &str) -> TestProxy {
        Self::start_for(upstream, |_| {}).await
    }

    pub async fn start_with(hub: &FakeHub, tweak: impl FnOnce(&mut Config)) -> TestProxy {
        Self::start_for(&hub.url, tweak).await
    }

    /// A proxy in front of any registry URL, its config tweaked.
    pub async fn start_for(upstream: &str, tweak: impl FnOnce(&mut Config)) -> TestProxy {
        let dir = Arc::new(tempfile::tempdir().unwrap());
        let mut config = Self::config(upstream, dir.path());
        tweak(&mut config);
        Self::start_config(config, Some(dir)).await
    }

    pub async fn start_config(config: Config, dir: Option<Arc<tempfile::TempDir>>) -> TestProxy {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}", listener.local_addr().unwrap());
        let (stop, stopped) = oneshot::channel::<()>();
        let run_config = config.clone();
        let task = tokio::spawn(async move {
            pullthrough::run(run_config, listener, async {
                let _ = stopped.await;
            })
            .await
            .unwrap();
        });
        TestProxy {
            url,
            config,
            stop: Some(stop),
            task: Some(task),
            _dir: dir,
            client: client(),
        }
    }

    /// Stops the server and waits for it.
    pub async fn stop(mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(task) = self.task.take() {
            let _ = tokio::time::timeout(Duration::from_secs(5), task).await;
        }
    }

    pub async fn get(&self, path: &str) -> reqwest::Response {
        self.request(reqwest::Method::GET, path, &[]).await
    }

    /// GETs `path`, asserts 200, and returns the body for the caller to compare.
    pub async fn get_ok(&self, path: &str) -> bytes::Bytes {
        let response = self.get(path).await;
        assert_eq!(response.status(), 200, "GET {path}");
        response.bytes().await.unwrap()
    }

    pub async fn head(&self, path: &str) -> reqwest::Response {
        self.request(reqwest::Method::HEAD, path, &[]).await
    }

    pub async fn request(
        &self,
        method: reqwest::Method,
        path: &str,
        headers: &[(&str, &str)],
    ) -> reqwest::Response {
        let mut req = self.client.request(method, format!("{}{path}", self.url));
        for (k, v) in headers {
            req = req.header(*k, *v);
        }
        req.send().await.unwrap()
    }
}

impl Drop for TestProxy {
    fn drop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(task) = self.task.take() {
            task.abort();
        }
    }
}

/// The emulated Docker Hub (the default upstream) and a second registry mirrored as
/// `ghcr.io`, with a pullthrough in front of both.
pub async fn hub_and_ghcr() -> (FakeHub, FakeHub, TestProxy) {
    let (hub, ghcr) = (FakeHub::start().await, FakeHub::start().await);
    let proxy =
        TestProxy::start_with(&hub, |c| c.upstreams = vec![ghcr.as_upstream("ghcr.io")]).await;
    (hub, ghcr, proxy)
}

/// A plain client: no proxy, no redirects followed, no decompression.
pub fn client() -> reqwest::Client {
    reqwest::Client::builder()
        .no_proxy()
        .redirect(reqwest::redirect::Policy::none())
        .build()
        .unwrap()
}

/// The full Accept list a modern client sends.
pub const FULL_ACCEPT: &str = "application/vnd.oci.image.index.v1+json, application/vnd.docker.distribution.manifest.list.v2+json, application/vnd.oci.image.manifest.v1+json, application/vnd.docker.distribution.manifest.v2+json";

/// `/metrics` of `proxy`, checked to be the Prometheus text format and parsed.
pub async fn scrape(proxy: &TestProxy) -> prometheus_parse::Scrape {
    let r = proxy.get("/metrics").await;
    assert!(
        r.headers()["content-type"]
            .to_str()
            .unwrap()
            .starts_with("text/plain")
    );
    let text = r.text().await.unwrap();
    prometheus_parse::Scrape::parse(text.lines().map(|l| Ok(l.to_owned()))).unwrap()
}

/// The sum of the samples of `name` whose labels include `labels`.
pub fn metric(scrape: &prometheus_parse::Scrape, name: &str, labels: &[(&str, &str)]) -> f64 {
    scrape
        .samples
        .iter()
        .filter(|s| s.metric == name)
        .filter(|s| labels.iter().all(|(k, v)| s.labels.get(k) == Some(*v)))
        .map(|s| match s.value {
            prometheus_parse::Value::Counter(v)
            | prometheus_parse::Value::Gauge(v)
            | prometheus_parse::Value::Untyped(v) => v,
            _ => 0.0,
        })
        .sum()
}

/// Registry error code of a response body.
pub async fn error_code(response: reqwest::Response) -> String {
    let body: serde_json::Value = response.json().await.unwrap();
    body["errors"][0]["code"]
        .as_str()
        .unwrap_or_default()
        .to_owned()
}

/// A child process killed (and reaped) when dropped.
pub struct Process(pub std::process::Child);

impl Drop for Process {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// A loopback port free at the time of asking.
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// Polls `condition` (every 10 ms at first, then every 100 ms) until it holds or `within` has
/// passed; whether it held. For waiting on what runs in the background: a file, a count, a log
/// line, a port.
pub async fn eventually(within: Duration, mut condition: impl AsyncFnMut() -> bool) -> bool {
    let deadline = std::time::Instant::now() + within;
    let mut pause = Duration::from_millis(10);
    loop {
        if condition().await {
            return true;
        }
        if std::time::Instant::now() >= deadline {
            return false;
        }
        tokio::time::sleep(pause).await;
        pause = (pause * 2).min(Duration::from_millis(100));
    }
}

/// Waits (up to 10 s) until `proxy` has no blob download and no upstream exchange under way:
/// what earlier requests started in the background has ended, stored or not.
pub async fn settled(proxy: &TestProxy) {
    let idle = eventually(Duration::from_secs(10), async || {
        let scrape = scrape(proxy).await;
        [
            "pullthrough_blob_downloads",
            "pullthrough_upstream_in_flight",
        ]
        .iter()
        .all(|name| {
            assert!(
                scrape.samples.iter().any(|s| s.metric == *name),
                "no {name}"
            );
            metric(&scrape, name, &[]) == 0.0
        })
    })
    .await;
    assert!(
        idle,
        "downloads or upstream exchanges still under way after 10 s"
    );
}

/// A test CA and a certificate it signed for `name` (a host name, or an IP address, which
/// becomes an IP SAN): PEMs of (CA, certificate, key).
pub fn ca_and_certificate(name: &str) -> (String, String, String) {
    let mut ca_params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
    ca_params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    let ca_key = rcgen::KeyPair::generate().unwrap();
    let ca = ca_params.self_signed(&ca_key).unwrap();
    let issuer = rcgen::Issuer::new(ca_params, ca_key);
    let key = rcgen::KeyPair::generate().unwrap();
    let leaf = rcgen::CertificateParams::new(vec![name.to_owned()])
        .unwrap()
        .signed_by(&key, &issuer)
        .unwrap();
    (ca.pem(), leaf.pem(), key.serialize_pem())
}

/// The whole seconds of a response's `Retry-After`.
pub fn retry_after(response: &reqwest::Response) -> u64 {
    response.headers()["retry-after"]
        .to_str()
        .unwrap()
        .parse()
        .unwrap()
}

/// Debian's `docker-registry` (distribution 2.8) on a free port with its own storage.
pub async fn reference_registry(dir: &std::path::Path) -> (Process, String) {
    reference_registry_serving(dir, None).await
}

/// Debian's `docker-registry` on a free port serving `dir`'s storage (another instance's too),
/// over TLS with the PEM `(certificate, key)` when given; its URL.
pub async fn reference_registry_serving(
    dir: &std::path::Path,
    tls: Option<(&str, &str)>,
) -> (Process, String) {
    let port = free_port();
    let mut yaml = format!(
        "version: 0.1\nlog:\n  level: warn\nstorage:\n  filesystem:\n    rootdirectory: {}\n  delete:\n    enabled: true\nhttp:\n  addr: 127.0.0.1:{port}\n",
        dir.join("storage").display()
    );
    let (scheme, config) = match tls {
        None => ("http", dir.join("registry.yml")),
        Some((cert, key)) => {
            let (cert_file, key_file) = (dir.join("tls.crt"), dir.join("tls.key"));
            std::fs::write(&cert_file, cert).unwrap();
            std::fs::write(&key_file, key).unwrap();
            yaml += &format!(
                "  tls:\n    certificate: {}\n    key: {}\n",
                cert_file.display(),
                key_file.display()
            );
            ("https", dir.join("registry-tls.yml"))
        }
    };
    std::fs::write(&config, yaml).unwrap();
    let child = std::process::Command::new("docker-registry")
        .arg("serve")
        .arg(&config)
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .expect("docker-registry is installed (apt-get install docker-registry)");
    let url = format!("{scheme}://127.0.0.1:{port}");
    // Listening is enough: a TLS registry's certificate is one this client does not trust.
    let addr = format!("127.0.0.1:{port}");
    let up = eventually(Duration::from_secs(20), async || {
        tokio::net::TcpStream::connect(&addr).await.is_ok()
    })
    .await;
    assert!(up, "{url} did not come up");
    (Process(child), url)
}
