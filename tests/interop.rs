//! Interop with software nobody here wrote: Debian's reference registry (`docker-registry`) as
//! the upstream, and skopeo, containerd and Docker Engine (plain and over TLS) as clients.
//! Ignored by a plain `cargo test` (they need those programs); `.ci/run` installs them and runs
//! these with `--include-ignored`.

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::too_many_lines,
    reason = "a test panics on what it did not expect, and may read as one long story"
)]

mod support;

use flate2::Compression;
use flate2::write::GzEncoder;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;
use support::hub::sha256;
use support::{
    Process, TestProxy, eventually, free_port, reference_registry, reference_registry_serving,
};

fn write_blob(layout: &Path, bytes: &[u8]) -> (String, usize) {
    let digest = sha256(bytes);
    std::fs::write(layout.join("blobs/sha256").join(&digest[7..]), bytes).unwrap();
    (digest, bytes.len())
}

/// An OCI image layout holding a two-platform index tagged `tag`, with real tar+gzip layers.
fn oci_layout(layout: &Path, seed: &str, tag: &str) -> String {
    std::fs::create_dir_all(layout.join("blobs/sha256")).unwrap();
    std::fs::write(
        layout.join("oci-layout"),
        r#"{"imageLayoutVersion":"1.0.0"}"#,
    )
    .unwrap();
    let mut entries = Vec::new();
    for arch in ["amd64", "arm64"] {
        let mut tar = tar::Builder::new(Vec::new());
        let content = format!("hello from {seed} on {arch}\n").repeat(1000);
        let mut header = tar::Header::new_gnu();
        header.set_size(content.len() as u64);
        header.set_mode(0o644);
        header.set_cksum();
        tar.append_data(
            &mut header,
            format!("{seed}-{arch}.txt"),
            content.as_bytes(),
        )
        .unwrap();
        let raw = tar.into_inner().unwrap();
        let mut gz = GzEncoder::new(Vec::new(), Compression::default());
        std::io::Write::write_all(&mut gz, &raw).unwrap();
        let (layer, layer_size) = write_blob(layout, &gz.finish().unwrap());
        let config = format!(
            r#"{{"architecture":"{arch}","os":"linux","config":{{}},"rootfs":{{"type":"layers","diff_ids":["{}"]}}}}"#,
            sha256(&raw)
        );
        let (config, config_size) = write_blob(layout, config.as_bytes());
        let manifest = format!(
            r#"{{"schemaVersion":2,"mediaType":"application/vnd.oci.image.manifest.v1+json","config":{{"mediaType":"application/vnd.oci.image.config.v1+json","digest":"{config}","size":{config_size}}},"layers":[{{"mediaType":"application/vnd.oci.image.layer.v1.tar+gzip","digest":"{layer}","size":{layer_size}}}]}}"#
        );
        let (digest, size) = write_blob(layout, manifest.as_bytes());
        entries.push(format!(r#"{{"mediaType":"application/vnd.oci.image.manifest.v1+json","digest":"{digest}","size":{size},"platform":{{"architecture":"{arch}","os":"linux"}}}}"#));
    }
    let index = format!(
        r#"{{"schemaVersion":2,"mediaType":"application/vnd.oci.image.index.v1+json","manifests":[{}]}}"#,
        entries.join(",")
    );
    let (digest, size) = write_blob(layout, index.as_bytes());
    std::fs::write(
        layout.join("index.json"),
        format!(r#"{{"schemaVersion":2,"manifests":[{{"mediaType":"application/vnd.oci.image.index.v1+json","digest":"{digest}","size":{size},"annotations":{{"org.opencontainers.image.ref.name":"{tag}"}}}}]}}"#),
    )
    .unwrap();
    digest
}

fn run(cmd: &mut Command) -> Vec<u8> {
    let out = cmd.output().unwrap_or_else(|e| panic!("{cmd:?}: {e}"));
    assert!(
        out.status.success(),
        "{cmd:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    out.stdout
}

/// A pullthrough in front of `upstream` with the user `dev` (password `dev-pw`) and `rules`.
async fn with_access_control(
    dir: &Path,
    upstream: &str,
    rules: Vec<pullthrough::config::AccessRule>,
) -> TestProxy {
    let htpasswd = dir.join("htpasswd");
    std::fs::write(
        &htpasswd,
        format!("dev:{}\n", bcrypt::hash("dev-pw", 4).unwrap()),
    )
    .unwrap();
    let proxy_dir = std::sync::Arc::new(tempfile::tempdir().unwrap());
    let mut config = TestProxy::config(upstream, proxy_dir.path());
    config.htpasswd = Some(htpasswd);
    config.access = rules;
    TestProxy::start_config(config, Some(proxy_dir)).await
}

fn skopeo() -> Command {
    let mut c = Command::new("skopeo");
    c.env_remove("HTTP_PROXY")
        .env_remove("HTTPS_PROXY")
        .env_remove("http_proxy")
        .env_remove("https_proxy");
    c
}

/// Pushes a multi-platform image into the reference registry with skopeo; returns its digest.
fn push(dir: &Path, registry: &str, repo: &str, tag: &str) -> String {
    let layout = dir.join(format!("layout-{}", repo.replace('/', "-")));
    let digest = oci_layout(&layout, repo, tag);
    let host = registry.trim_start_matches("http://");
    run(skopeo()
        .args(["copy", "--all", "--dest-tls-verify=false"])
        .arg(format!("oci:{}:{tag}", layout.display()))
        .arg(format!("docker://{host}/{repo}:{tag}")));
    digest
}

/// Copies every platform of `image` (`host:port/repo:1`, plain HTTP) into an OCI layout at
/// `out` with skopeo, which verifies every manifest and blob digest on the way; the layout's
/// `index.json`.
fn copy_all(image: &str, out: &Path) -> String {
    run(skopeo()
        .args(["copy", "--all", "--src-tls-verify=false"])
        .arg(format!("docker://{image}"))
        .arg(format!("oci:{}:1", out.display())));
    std::fs::read_to_string(out.join("index.json")).unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
#[ignore = "needs docker-registry and skopeo (run by .ci/run)"]
async fn skopeo_through_pullthrough_gets_the_reference_registrys_exact_bytes() {
    let dir = tempfile::tempdir().unwrap();
    let (registry, upstream) = reference_registry(dir.path()).await;
    let digest = push(dir.path(), &upstream, "library/multi", "1");
    let proxy = TestProxy::start_with_upstream(&upstream).await;
    let host = proxy.url.trim_start_matches("http://").to_owned();

    let direct = run(skopeo()
        .args(["inspect", "--raw", "--tls-verify=false"])
        .arg(format!(
            "docker://{}/library/multi:1",
            upstream.trim_start_matches("http://")
        )));
    let through = run(skopeo()
        .args(["inspect", "--raw", "--tls-verify=false"])
        .arg(format!("docker://{host}/library/multi:1")));
    assert_eq!(
        through, direct,
        "skopeo inspect --raw returns the upstream's exact bytes"
    );
    assert_eq!(sha256(&through), digest);

    // A full multi-platform copy verifies every manifest and blob digest on the way.
    let copied = copy_all(
        &format!("{host}/library/multi:1"),
        &dir.path().join("copied"),
    );
    assert!(copied.contains(&digest));

    // Everything is now cached: with the upstream gone, the same copy still succeeds.
    drop(registry);
    copy_all(
        &format!("{host}/library/multi:1"),
        &dir.path().join("again"),
    );
    let by_digest = run(skopeo()
        .args(["inspect", "--raw", "--tls-verify=false"])
        .arg(format!("docker://{host}/library/multi@{digest}")));
    assert_eq!(by_digest, direct);
}

/// containerd with its own root, state and socket under `dir`.
async fn containerd(dir: &Path) -> (Process, PathBuf) {
    std::fs::create_dir_all(dir).unwrap();
    let socket = dir.join("containerd.sock");
    let config = dir.join("containerd.toml");
    std::fs::write(
        &config,
        format!(
            "version = 2\nroot = \"{root}\"\nstate = \"{state}\"\ndisabled_plugins = [\"io.containerd.grpc.v1.cri\"]\n[grpc]\n  address = \"{sock}\"\n[ttrpc]\n  address = \"{sock}.ttrpc\"\n",
            root = dir.join("root").display(),
            state = dir.join("state").display(),
            sock = socket.display()
        ),
    )
    .unwrap();
    let log = std::fs::File::create(dir.join("containerd.log")).unwrap();
    let child = Command::new("containerd")
        .arg("--config")
        .arg(&config)
        .stdout(Stdio::null())
        .stderr(log)
        .spawn()
        .expect("containerd is installed (apt-get install containerd)");
    let started = eventually(Duration::from_secs(20), async || socket.exists()).await;
    assert!(
        started,
        "containerd did not start: {}",
        std::fs::read_to_string(dir.join("containerd.log")).unwrap_or_default()
    );
    (Process(child), socket)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
#[ignore = "needs docker-registry, skopeo and containerd (run by .ci/run)"]
async fn containerd_pulls_and_unpacks_through_pullthrough_as_the_docker_io_mirror() {
    let dir = tempfile::tempdir().unwrap();
    let (registry, upstream) = reference_registry(dir.path()).await;
    push(dir.path(), &upstream, "library/ctrtest", "1");
    let proxy = TestProxy::start_with_upstream(&upstream).await;

    // hosts.toml: pullthrough is the docker.io mirror; the fallback server is a dead port, so
    // the pull can only succeed through pullthrough.
    let hosts = dir.path().join("certs.d/docker.io");
    std::fs::create_dir_all(&hosts).unwrap();
    std::fs::write(hosts.join("hosts.toml"), format!("server = \"http://127.0.0.1:{}\"\n\n[host.\"{}\"]\n  capabilities = [\"pull\", \"resolve\"]\n", free_port(), proxy.url)).unwrap();
    let hosts_dir = dir.path().join("certs.d");
    let pull = |socket: &Path| {
        run(Command::new("ctr").arg("--address").arg(socket).args([
            "images",
            "pull",
            "--hosts-dir",
            hosts_dir.to_str().unwrap(),
            "--snapshotter",
            "native",
            "--platform",
            "linux/amd64",
            "docker.io/library/ctrtest:1",
        ]))
    };
    let ctr = |socket: &Path, args: &[&str]| {
        String::from_utf8(run(Command::new("ctr")
            .arg("--address")
            .arg(socket)
            .args(args)))
        .unwrap()
    };
    let (first, socket) = containerd(&dir.path().join("ctr")).await;
    pull(&socket);
    let listed = ctr(&socket, &["images", "ls", "-q"]);
    assert!(listed.contains("docker.io/library/ctrtest:1"), "{listed}");
    let snapshots = ctr(&socket, &["snapshots", "--snapshotter", "native", "ls"]);
    assert!(
        snapshots.lines().count() > 1,
        "the image was unpacked: {snapshots}"
    );
    drop(first);

    // A fresh containerd pulls again with the upstream gone: every manifest and blob comes
    // from pullthrough's cache.
    drop(registry);
    let (_second, socket) = containerd(&dir.path().join("ctr2")).await;
    pull(&socket);
    let listed = ctr(&socket, &["images", "ls", "-q"]);
    assert!(listed.contains("docker.io/library/ctrtest:1"), "{listed}");
}

/// A test's dockerd: stopped when dropped, and then the network namespace it was given of its
/// own (with the relay to its mirror) is deleted.
struct Dockerd {
    _process: Process,
    _relay: Option<Relay>,
    _netns: Option<Netns>,
}

/// Accepts connections inside a network namespace and carries each to an address outside it.
struct Relay(tokio::task::JoinHandle<()>);

impl Relay {
    /// Listens on `addr` inside `netns` and forwards to the same `addr` outside.
    async fn start(netns: &Netns, addr: std::net::SocketAddr) -> Relay {
        let listener = netns
            .enter(|| std::net::TcpListener::bind(addr))
            .and_then(|listener| {
                listener.set_nonblocking(true)?;
                tokio::net::TcpListener::from_std(listener)
            })
            .unwrap_or_else(|e| panic!("a relay on {addr} inside {}: {e}", netns.name));
        Relay(tokio::spawn(async move {
            while let Ok((mut inside, _)) = listener.accept().await {
                tokio::spawn(async move {
                    if let Ok(mut outside) = tokio::net::TcpStream::connect(addr).await {
                        let _ = tokio::io::copy_bidirectional(&mut inside, &mut outside).await;
                    }
                });
            }
        }))
    }
}

impl Drop for Relay {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// The host's `docker0`, by interface index, if it has one.
fn host_docker0() -> Option<String> {
    std::fs::read_to_string("/sys/class/net/docker0/ifindex").ok()
}

/// dockerd (Debian's `docker.io`) with its own data root, exec root and socket under `dir`, vfs
/// storage, no network set-up, and `mirror` as its `registry-mirrors`; inside `netns` if given,
/// else inside a network namespace of its own. Never in the host's: with `--bridge=none` dockerd
/// deletes any `docker0` it sees, which would take a developer's running Docker's bridge away.
/// In a namespace of its own, a loopback `mirror` (`http://127.0.0.1:<port>`) is the same
/// address inside, relayed to the pullthrough listening there on the host's loopback.
async fn dockerd(dir: &Path, mirror: &str, netns: Option<&Netns>) -> (Dockerd, PathBuf) {
    let (own, relay) = match netns {
        Some(_) => (None, None),
        None => {
            let addr = mirror
                .strip_prefix("http://")
                .and_then(|a| a.trim_end_matches('/').parse::<std::net::SocketAddr>().ok())
                .filter(|a| a.ip().is_loopback())
                .unwrap_or_else(|| panic!("a loopback mirror, http://127.0.0.1:<port>: {mirror}"));
            let own = Netns::loopback();
            let relay = Relay::start(&own, addr).await;
            (Some(own), Some(relay))
        }
    };
    let docker0 = host_docker0();
    let Some(inside) = netns.or(own.as_ref()) else {
        unreachable!("a namespace was given or made")
    };
    let (process, socket) = dockerd_in(dir, mirror, inside).await;
    // dockerd deletes the default bridge while it starts, before its API answers.
    assert_eq!(host_docker0(), docker0, "the host's docker0 was left alone");
    let engine = Dockerd {
        _process: process,
        _relay: relay,
        _netns: own,
    };
    (engine, socket)
}

/// [`dockerd`] inside `netns`.
async fn dockerd_in(dir: &Path, mirror: &str, netns: &Netns) -> (Process, PathBuf) {
    std::fs::create_dir_all(dir).unwrap();
    let socket = dir.join("docker.sock");
    let log = std::fs::File::create(dir.join("dockerd.log")).unwrap();
    let mut command = netns.command("dockerd");
    let child = command
        .arg("--data-root")
        .arg(dir.join("root"))
        .arg("--exec-root")
        .arg(dir.join("exec"))
        .arg("--pidfile")
        .arg(dir.join("dockerd.pid"))
        .arg("--host")
        .arg(format!("unix://{}", socket.display()))
        .args([
            "--storage-driver",
            "vfs",
            "--iptables=false",
            "--ip-masq=false",
            "--bridge=none",
            "--registry-mirror",
            mirror,
        ])
        .stdout(Stdio::null())
        .stderr(log)
        .spawn()
        .expect("dockerd is installed (apt-get install docker.io)");
    // Killed even if it never comes up.
    let child = Process(child);
    let up = eventually(Duration::from_secs(60), async || {
        Command::new("docker")
            .arg("--host")
            .arg(format!("unix://{}", socket.display()))
            .arg("version")
            .env("DOCKER_CONFIG", dir)
            .output()
            .is_ok_and(|o| o.status.success())
    })
    .await;
    assert!(
        up,
        "dockerd did not start: {}",
        std::fs::read_to_string(dir.join("dockerd.log")).unwrap_or_default()
    );
    (child, socket)
}

fn docker(dir: &Path, socket: &Path, args: &[&str]) -> String {
    String::from_utf8(run(Command::new("docker")
        .arg("--host")
        .arg(format!("unix://{}", socket.display()))
        .env("DOCKER_CONFIG", dir)
        .args(args)))
    .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
#[ignore = "needs docker-registry, skopeo and docker.io (run by .ci/run)"]
async fn docker_engine_pulls_through_pullthrough_as_its_registry_mirror() {
    let dir = tempfile::tempdir().unwrap();
    let (registry, upstream) = reference_registry(dir.path()).await;
    push(dir.path(), &upstream, "library/dockertest", "1");
    let proxy = TestProxy::start_with_upstream(&upstream).await;

    // The mirror is pullthrough; Docker Hub itself is unreachable here, so the pull can only
    // succeed through it.
    let first_dir = dir.path().join("dockerd1");
    let (first, socket) = dockerd(&first_dir, &proxy.url, None).await;
    docker(&first_dir, &socket, &["pull", "dockertest:1"]);
    let inspected = docker(
        &first_dir,
        &socket,
        &[
            "image",
            "inspect",
            "--format",
            "{{.Os}}/{{.Architecture}} {{len .RootFS.Layers}}",
            "dockertest:1",
        ],
    );
    assert_eq!(inspected.trim(), "linux/amd64 1", "the image was unpacked");
    let first_id = docker(
        &first_dir,
        &socket,
        &["image", "inspect", "--format", "{{.Id}}", "dockertest:1"],
    );
    let listing: serde_json::Value = proxy
        .get("/_pullthrough/cache/library/dockertest/manifests/1")
        .await
        .json()
        .await
        .unwrap();
    assert_eq!(
        listing["tag"]["hits"], 1,
        "dockerd asked pullthrough for the tag"
    );
    drop(first);

    // A fresh Docker Engine pulls again with the upstream gone: all from pullthrough's cache.
    drop(registry);
    let second_dir = dir.path().join("dockerd2");
    let (_second, socket) = dockerd(&second_dir, &proxy.url, None).await;
    docker(&second_dir, &socket, &["pull", "dockertest:1"]);
    let inspected = docker(
        &second_dir,
        &socket,
        &["image", "inspect", "--format", "{{.Id}}", "dockertest:1"],
    );
    assert_eq!(
        inspected.trim(),
        first_id.trim(),
        "the same image, from the cache"
    );
}

/// A network namespace of its own, with `lo` up and `addr` on it besides 127.0.0.1: an address
/// that is not loopback by number yet reachable only inside the namespace. Docker Engine counts
/// 127.0.0.0/8 mirrors as insecure and skips certificate checks for them, so a test of the TLS
/// listener with Docker Engine needs such an address. Deleted when dropped.
struct Netns {
    name: String,
}

impl Netns {
    fn new(addr: &str) -> Netns {
        let netns = Netns::loopback();
        run(Command::new("ip").args(["-n", &netns.name, "addr", "add", addr, "dev", "lo"]));
        netns
    }

    /// A network namespace with only `lo` (127.0.0.1), up. Deleted when dropped.
    fn loopback() -> Netns {
        static NEXT: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
        let name = format!(
            "pullthrough-test-{}-{}",
            std::process::id(),
            NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed)
        );
        run(Command::new("ip").args(["netns", "add", &name]));
        let netns = Netns { name };
        run(Command::new("ip").args(["-n", &netns.name, "link", "set", "lo", "up"]));
        netns
    }

    /// `program`, to be run inside the namespace (nsenter switches the network namespace only;
    /// `ip netns exec` would also remount /sys, hiding the cgroups dockerd needs).
    fn command(&self, program: &str) -> Command {
        let mut command = Command::new("nsenter");
        command
            .arg(format!("--net=/run/netns/{}", self.name))
            .arg(program);
        command
    }

    /// Runs `f` on a thread inside the namespace: sockets it opens (listeners included, which
    /// keep their namespace when handed to another thread) belong to the namespace.
    fn enter<T: Send>(&self, f: impl FnOnce() -> T + Send) -> T {
        use rustix::thread::{LinkNameSpaceType, move_into_link_name_space};
        use std::os::fd::AsFd;
        let handle = std::fs::File::open(format!("/run/netns/{}", self.name)).unwrap();
        std::thread::scope(|scope| {
            scope
                .spawn(|| {
                    move_into_link_name_space(handle.as_fd(), Some(LinkNameSpaceType::Network))
                        .expect("setns into the test's network namespace");
                    f()
                })
                .join()
                .unwrap()
        })
    }

    /// `GET url` from inside the namespace, trusting only `ca`: (status, body).
    fn get(&self, ca: &str, url: &str) -> Result<(u16, String), String> {
        self.enter(|| {
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap();
            runtime.block_on(async {
                let client = reqwest::Client::builder()
                    .no_proxy()
                    .tls_certs_only([reqwest::Certificate::from_pem(ca.as_bytes()).unwrap()])
                    .build()
                    .unwrap();
                let response = client.get(url).send().await.map_err(|e| format!("{e:?}"))?;
                let status = response.status().as_u16();
                Ok((status, response.text().await.map_err(|e| e.to_string())?))
            })
        })
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        let _ = Command::new("ip")
            .args(["netns", "del", &self.name])
            .status();
    }
}

/// A CA and a certificate it signed for the IP address `ip`: (CA PEM, cert PEM, key PEM).
fn ca_and_ip_certificate(ip: std::net::IpAddr) -> (String, String, String) {
    support::ca_and_certificate(&ip.to_string())
}

/// Removes a directory when dropped.
struct RemoveDir(PathBuf);

impl Drop for RemoveDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
#[ignore = "needs docker-registry, skopeo, docker.io and root for a network namespace (run by .ci/run)"]
async fn docker_engine_pulls_through_the_tls_listener_trusting_the_test_ca() {
    const IP: &str = "10.77.0.1";
    let dir = tempfile::tempdir().unwrap();
    let (_registry, upstream) = reference_registry(dir.path()).await;
    push(dir.path(), &upstream, "library/tlstest", "1");

    // pullthrough listens with TLS on an address only the namespace reaches; it fetches from
    // the reference registry outside it.
    let netns = Netns::new(&format!("{IP}/32"));
    let listener = netns.enter(|| std::net::TcpListener::bind((IP, 0)).unwrap());
    listener.set_nonblocking(true).unwrap();
    let port = listener.local_addr().unwrap().port();
    let (ca, cert, key) = ca_and_ip_certificate(IP.parse().unwrap());
    let certs = tempfile::tempdir().unwrap();
    std::fs::write(certs.path().join("cert.pem"), &cert).unwrap();
    std::fs::write(certs.path().join("key.pem"), &key).unwrap();
    let data = tempfile::tempdir().unwrap();
    let mut config = TestProxy::config(&upstream, data.path());
    config.tls_cert = Some(certs.path().join("cert.pem"));
    config.tls_key = Some(certs.path().join("key.pem"));
    let listener = tokio::net::TcpListener::from_std(listener).unwrap();
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let server = tokio::spawn(pullthrough::run(config, listener, async {
        let _ = stopped.await;
    }));
    let mirror = format!("https://{IP}:{port}");
    let (status, body) = netns.get(&ca, &format!("{mirror}/v2/")).unwrap();
    assert_eq!((status, body.as_str()), (200, "{}"));

    // Docker Engine checks the mirror's certificate: without the CA the pull fails (and with
    // Docker Hub unreachable there is nowhere else to go) ...
    let engine_dir = dir.path().join("dockerd");
    let (_engine, socket) = dockerd(&engine_dir, &mirror, Some(&netns)).await;
    let untrusted = Command::new("docker")
        .arg("--host")
        .arg(format!("unix://{}", socket.display()))
        .env("DOCKER_CONFIG", &engine_dir)
        .args(["pull", "tlstest:1"])
        .output()
        .unwrap();
    assert!(
        !untrusted.status.success(),
        "pulled without trusting the CA"
    );
    let (_, cached) = netns
        .get(
            &ca,
            &format!("{mirror}/_pullthrough/cache/library/tlstest/manifests/1"),
        )
        .unwrap();
    assert!(
        !cached.contains("\"hits\""),
        "the untrusted pull reached pullthrough: {cached}"
    );

    // ... and with the CA where Docker looks for a registry's CAs, it pulls through pullthrough.
    let ca_dir = PathBuf::from(format!("/etc/docker/certs.d/{IP}:{port}"));
    let _remove = RemoveDir(ca_dir.clone());
    std::fs::create_dir_all(&ca_dir).unwrap();
    std::fs::write(ca_dir.join("ca.crt"), &ca).unwrap();
    docker(&engine_dir, &socket, &["pull", "tlstest:1"]);
    let inspected = docker(
        &engine_dir,
        &socket,
        &[
            "image",
            "inspect",
            "--format",
            "{{.Os}}/{{.Architecture}} {{len .RootFS.Layers}}",
            "tlstest:1",
        ],
    );
    assert_eq!(inspected.trim(), "linux/amd64 1", "the image was unpacked");
    let (status, cached) = netns
        .get(
            &ca,
            &format!("{mirror}/_pullthrough/cache/library/tlstest/manifests/1"),
        )
        .unwrap();
    assert_eq!(status, 200, "{cached}");
    let cached: serde_json::Value = serde_json::from_str(&cached).unwrap();
    assert_eq!(
        cached["tag"]["hits"], 1,
        "dockerd asked pullthrough for the tag"
    );

    let _ = stop.send(());
    let _ = tokio::time::timeout(Duration::from_secs(5), server).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
#[ignore = "needs docker-registry, skopeo and containerd (run by .ci/run)"]
async fn containerd_pulls_two_registries_through_one_pullthrough_by_ns() {
    let dir = tempfile::tempdir().unwrap();
    for sub in ["hub", "ghcr"] {
        std::fs::create_dir_all(dir.path().join(sub)).unwrap();
    }
    let (_hub_registry, hub_url) = reference_registry(&dir.path().join("hub")).await;
    let (_ghcr_registry, ghcr_url) = reference_registry(&dir.path().join("ghcr")).await;
    push(dir.path(), &hub_url, "library/fromhub", "1");
    push(dir.path(), &ghcr_url, "org/fromghcr", "1");
    let proxy_dir = std::sync::Arc::new(tempfile::tempdir().unwrap());
    let mut config = TestProxy::config(&hub_url, proxy_dir.path());
    config.upstreams = vec![pullthrough::config::UpstreamConfig::new(
        "ghcr.io",
        ghcr_url.parse().unwrap(),
    )];
    let proxy = TestProxy::start_config(config, Some(proxy_dir)).await;

    // One hosts.toml per registry, both naming pullthrough; containerd adds ?ns=<registry>.
    let hosts_dir = dir.path().join("certs.d");
    for registry in ["docker.io", "ghcr.io"] {
        let hosts = hosts_dir.join(registry);
        std::fs::create_dir_all(&hosts).unwrap();
        std::fs::write(
            hosts.join("hosts.toml"),
            format!(
                "server = \"http://127.0.0.1:{}\"\n\n[host.\"{}\"]\n  capabilities = [\"pull\", \"resolve\"]\n",
                free_port(),
                proxy.url
            ),
        )
        .unwrap();
    }
    let (_containerd, socket) = containerd(&dir.path().join("ctr")).await;
    for image in ["docker.io/library/fromhub:1", "ghcr.io/org/fromghcr:1"] {
        run(Command::new("ctr").arg("--address").arg(&socket).args([
            "images",
            "pull",
            "--hosts-dir",
            hosts_dir.to_str().unwrap(),
            "--snapshotter",
            "native",
            "--platform",
            "linux/amd64",
            image,
        ]));
    }
    let listed = String::from_utf8(run(Command::new("ctr")
        .arg("--address")
        .arg(&socket)
        .args(["images", "ls", "-q"])))
    .unwrap();
    assert!(listed.contains("docker.io/library/fromhub:1"), "{listed}");
    assert!(listed.contains("ghcr.io/org/fromghcr:1"), "{listed}");
    let cache: serde_json::Value = proxy.get("/_pullthrough/cache").await.json().await.unwrap();
    let keys: Vec<String> = cache["entries"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| {
            format!(
                "{} {}",
                e["upstream"].as_str().unwrap(),
                e["repository"].as_str().unwrap()
            )
        })
        .collect();
    assert!(keys.iter().any(|k| k == "ghcr.io org/fromghcr"), "{keys:?}");
    assert!(
        keys.iter().any(|k| k.ends_with(" library/fromhub")),
        "{keys:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
#[ignore = "needs docker-registry and skopeo (run by .ci/run)"]
async fn skopeo_with_creds_pulls_through_access_control() {
    let dir = tempfile::tempdir().unwrap();
    let (_registry, upstream) = reference_registry(dir.path()).await;
    let digest = push(dir.path(), &upstream, "team/app", "1");
    let proxy = with_access_control(dir.path(), &upstream, vec![]).await;
    let host = proxy.url.trim_start_matches("http://").to_owned();
    let image = format!("docker://{host}/team/app:1");

    let refused = skopeo()
        .args(["inspect", "--raw", "--tls-verify=false", &image])
        .output()
        .unwrap();
    assert!(!refused.status.success(), "anonymous skopeo was let in");
    let stderr = String::from_utf8_lossy(&refused.stderr).to_lowercase();
    assert!(
        stderr.contains("unauthorized") || stderr.contains("authentication required"),
        "{stderr}"
    );
    let raw = run(skopeo().args([
        "inspect",
        "--raw",
        "--tls-verify=false",
        "--creds",
        "dev:dev-pw",
        &image,
    ]));
    assert_eq!(sha256(&raw), digest);
    let out = dir.path().join("copied");
    run(skopeo()
        .args([
            "copy",
            "--all",
            "--src-tls-verify=false",
            "--src-creds",
            "dev:dev-pw",
            &image,
        ])
        .arg(format!("oci:{}:1", out.display())));
}

/// podman with storage of its own under `dir` (vfs, no systemd, no journald).
fn podman(dir: &Path) -> Command {
    let mut c = Command::new("podman");
    c.env_remove("HTTP_PROXY")
        .env_remove("HTTPS_PROXY")
        .env_remove("http_proxy")
        .env_remove("https_proxy")
        .args(["--root"])
        .arg(dir.join("root"))
        .arg("--runroot")
        .arg(dir.join("run"))
        .args([
            "--storage-driver",
            "vfs",
            "--cgroup-manager",
            "cgroupfs",
            "--events-backend",
            "file",
        ]);
    c
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
#[ignore = "needs docker-registry, skopeo and podman (run by .ci/run)"]
async fn skopeo_and_podman_without_a_login_pull_what_anonymous_rules_allow() {
    let dir = tempfile::tempdir().unwrap();
    let (_registry, upstream) = reference_registry(dir.path()).await;
    let open = push(dir.path(), &upstream, "library/app", "1");
    let team = push(dir.path(), &upstream, "team/app", "1");
    let rule = pullthrough::config::AccessRule {
        upstream: "docker.io".into(),
        prefix: "library/".into(),
        users: vec![],
        anonymous: true,
    };
    let proxy = with_access_control(dir.path(), &upstream, vec![rule]).await;
    let host = proxy.url.trim_start_matches("http://").to_owned();

    // skopeo answers the Basic challenge with empty credentials: anonymous, and let in.
    let raw = run(skopeo().args([
        "inspect",
        "--raw",
        "--tls-verify=false",
        &format!("docker://{host}/library/app:1"),
    ]));
    assert_eq!(sha256(&raw), open);
    run(skopeo()
        .args([
            "copy",
            "--all",
            "--src-tls-verify=false",
            &format!("docker://{host}/library/app:1"),
        ])
        .arg(format!("oci:{}:1", dir.path().join("copied").display())));
    // And still refused where no rule lets anonymous clients in.
    let refused = skopeo()
        .args([
            "inspect",
            "--raw",
            "--tls-verify=false",
            &format!("docker://{host}/team/app:1"),
        ])
        .output()
        .unwrap();
    assert!(!refused.status.success(), "anonymous skopeo read team/app");

    // podman pulls (and unpacks) the open image without a login.
    let storage = dir.path().join("podman");
    run(podman(&storage).args([
        "pull",
        "--tls-verify=false",
        "--platform",
        "linux/amd64",
        &format!("{host}/library/app:1"),
    ]));
    let images = run(podman(&storage).args(["images", "--format", "{{.Repository}}:{{.Tag}}"]));
    assert!(
        String::from_utf8_lossy(&images).contains(&format!("{host}/library/app:1")),
        "{}",
        String::from_utf8_lossy(&images)
    );
    let refused = podman(&storage)
        .args(["pull", "--tls-verify=false", &format!("{host}/team/app:1")])
        .output()
        .unwrap();
    assert!(
        !refused.status.success(),
        "anonymous podman pulled team/app"
    );

    // After `podman login` (credentials in its own auth file, sent as Basic on the challenge),
    // the image no rule opens to anonymous clients pulls, and its manifest is the upstream's.
    let auth_file = dir.path().join("auth.json");
    run(podman(&storage)
        .args(["login", "--tls-verify=false", "-u", "dev", "-p", "dev-pw"])
        .arg("--authfile")
        .arg(&auth_file)
        .arg(&host));
    run(podman(&storage)
        .args(["pull", "--tls-verify=false", "--platform", "linux/amd64"])
        .arg("--authfile")
        .arg(&auth_file)
        .arg(format!("{host}/team/app:1")));
    let raw = run(skopeo()
        .args(["inspect", "--raw", "--tls-verify=false"])
        .arg("--authfile")
        .arg(&auth_file)
        .arg(format!("docker://{host}/team/app:1")));
    assert_eq!(sha256(&raw), team);
}

/// Every upstream client shares one TLS configuration made by pullthrough (the system's roots,
/// `SSL_CERT_FILE` included, as reqwest's own): an HTTPS upstream signed by a CA the system
/// trusts serves a whole multi-platform copy, manifests and blobs, on every worker's clients;
/// one signed by a CA it does not trust gets no request through.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
#[ignore = "needs docker-registry and skopeo (run by .ci/run)"]
async fn an_https_upstream_is_trusted_through_the_systems_roots_and_only_through_them() {
    let dir = tempfile::tempdir().unwrap();
    let (_plain, plain) = reference_registry(dir.path()).await;
    let digest = push(dir.path(), &plain, "library/secure", "1");
    let (ca, cert, key) = support::ca_and_certificate("127.0.0.1");
    let (_tls, upstream) = reference_registry_serving(dir.path(), Some((&cert, &key))).await;
    // A pullthrough in front of the HTTPS upstream whose system roots are `ca` alone.
    let trusting = async |name: &str, ca: &str| {
        let file = dir.path().join(name);
        std::fs::write(&file, ca).unwrap();
        support::binary::Pullthrough::new()
            .upstream(&upstream)
            .env("SSL_CERT_FILE", &file)
            .start()
            .await
    };

    let trusted = trusting("ca.pem", &ca).await;
    let copied = copy_all(
        &format!("{}/library/secure:1", trusted.addr),
        &dir.path().join("copied"),
    );
    assert!(
        copied.contains(&digest),
        "the copy through the HTTPS upstream holds the index"
    );

    // Another CA in SSL_CERT_FILE: the upstream's certificate is not trusted.
    let (other_ca, _, _) = support::ca_and_certificate("127.0.0.1");
    let untrusted = trusting("other-ca.pem", &other_ca).await;
    let answer = reqwest::get(format!("{}/v2/library/secure/manifests/1", untrusted.url))
        .await
        .unwrap();
    let status = answer.status().as_u16();
    let body = answer.text().await.unwrap();
    assert!(
        (500..600).contains(&status) && body.contains("\"errors\""),
        "an untrusted upstream certificate is a registry error, not content: {status} {body}"
    );
}
