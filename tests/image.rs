//! The container image, built from the repository's Dockerfile by a real Docker Engine and run
//! the way an operator runs it: read-only root, its own user, health-checked, pulled through
//! with skopeo from a local registry, stopped with `docker stop`.
//!
//! Nothing can be pulled from Docker Hub here, so the base images are made locally:
//! `debian:bookworm-slim` is a `debootstrap --variant=minbase bookworm` rootfs, imported, and
//! `rust:1-slim-bookworm` is that plus gcc and this machine's own Rust toolchain (rustup and
//! the sysroot `rustc --print sysroot` names) and its CA bundle (crates.io may be reached through
//! a TLS-inspecting proxy whose CA only this machine's bundle holds).
//!
//! The test's dockerd runs in a network namespace of its own (a veth pair to this machine,
//! NAT out), never on this machine's docker0: builds reach Debian's mirror and crates.io through
//! the NAT, as they would anywhere, so the Dockerfile is built as it stands. The registry,
//! skopeo and the container all live in that namespace (the container on its host network).
//!
//! The rootfs tarball and dockerd's data root (overlay2) are kept under
//! `$PULLTHROUGH_TEST_CACHE/image` (default `/var/cache/pullthrough-test/image`), so a second
//! run only rebuilds pullthrough's own crate. Needs root, debootstrap, docker.io, skopeo,
//! docker-registry, iproute2 and iptables: `.ci/run` installs them and runs this with
//! `--include-ignored`.

// A test fails by panicking: its helpers unwrap as its #[test] functions may.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use sha2::{Digest, Sha256};
use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// The network namespace, the veth pair's ends, and their /30.
const NETNS: &str = "pullthrough-image";
const VETH_HOST: &str = "ptimage-h";
const VETH_NS: &str = "ptimage-n";
const HOST_ADDR: &str = "10.79.0.1";
const NS_ADDR: &str = "10.79.0.2";
const SUBNET: &str = "10.79.0.0/30";
/// Where the registry listens inside the namespace, on every address there (the container's
/// 5000 is pullthrough's, the replicas' balancer publishes 5001), so that containers on
/// compose's bridge networks reach it at `NS_ADDR`.
const REGISTRY_PORT: u16 = 5002;
/// The replicas compose file's balancer, published on the namespace's loopback.
const BALANCER_PORT: u16 = 5001;
const PULLTHROUGH_PORT: u16 = 5000;
const CONTAINER: &str = "pullthrough-image-test";
const IMAGE: &str = "pullthrough:test";

fn cache_dir() -> PathBuf {
    let root = std::env::var_os("PULLTHROUGH_TEST_CACHE").map_or_else(
        || PathBuf::from("/var/cache/pullthrough-test"),
        PathBuf::from,
    );
    root.join("image")
}

fn run(cmd: &mut Command) -> String {
    let out = cmd.output().unwrap_or_else(|e| panic!("{cmd:?}: {e}"));
    assert!(
        out.status.success(),
        "{cmd:?} failed: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Runs `cmd` and says only whether it succeeded (for clean-ups and probes).
fn quietly(cmd: &mut Command) -> bool {
    cmd.stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

fn log(start: Instant, what: &str) {
    eprintln!("[image {:>6.1}s] {what}", start.elapsed().as_secs_f64());
}

/// Holds the cache's lock: one run at a time uses the namespace, the NAT rule and the data root.
struct Lock {
    _file: std::fs::File,
}

impl Lock {
    fn take(dir: &Path) -> Lock {
        std::fs::create_dir_all(dir).unwrap();
        let file = std::fs::File::create(dir.join("lock")).unwrap();
        rustix::fs::flock(&file, rustix::fs::FlockOperation::LockExclusive).unwrap();
        Lock { _file: file }
    }
}

/// The namespace, the veth pair into it, and the NAT that lets it out; removed when dropped
/// (and first removed if a killed run left them).
struct Network {
    forward_was_off: bool,
}

fn iptables_rules() -> [Vec<&'static str>; 3] {
    [
        vec![
            "-t",
            "nat",
            "POSTROUTING",
            "-s",
            SUBNET,
            "!",
            "-d",
            SUBNET,
            "-j",
            "MASQUERADE",
        ],
        vec!["-t", "filter", "FORWARD", "-i", VETH_HOST, "-j", "ACCEPT"],
        vec!["-t", "filter", "FORWARD", "-o", VETH_HOST, "-j", "ACCEPT"],
    ]
}

/// `iptables -t TABLE <op> CHAIN rest...`
fn iptables(op: &str, rule: &[&str]) -> Command {
    let mut command = Command::new("iptables");
    command.args(&rule[..2]).arg(op).args(&rule[2..]).arg("-w");
    command
}

impl Network {
    fn up() -> Network {
        Network::remove();
        run(Command::new("ip").args(["netns", "add", NETNS]));
        let ip = |args: &[&str]| run(Command::new("ip").args(args));
        ip(&[
            "link", "add", VETH_HOST, "type", "veth", "peer", "name", VETH_NS,
        ]);
        ip(&["link", "set", VETH_NS, "netns", NETNS]);
        ip(&["addr", "add", &format!("{HOST_ADDR}/30"), "dev", VETH_HOST]);
        ip(&["link", "set", VETH_HOST, "up"]);
        ip(&["-n", NETNS, "link", "set", "lo", "up"]);
        ip(&[
            "-n",
            NETNS,
            "addr",
            "add",
            &format!("{NS_ADDR}/30"),
            "dev",
            VETH_NS,
        ]);
        ip(&["-n", NETNS, "link", "set", VETH_NS, "up"]);
        ip(&["-n", NETNS, "route", "add", "default", "via", HOST_ADDR]);
        // A host where Docker once ran has FORWARD's policy at DROP: these two rules and the
        // MASQUERADE one are the only changes to this machine's firewall, and go in Drop.
        for rule in iptables_rules() {
            run(&mut iptables("-I", &rule));
        }
        let forward = "/proc/sys/net/ipv4/ip_forward";
        let forward_was_off = std::fs::read_to_string(forward).unwrap().trim() == "0";
        if forward_was_off {
            std::fs::write(forward, "1").unwrap();
        }
        Network { forward_was_off }
    }

    fn remove() {
        for rule in iptables_rules() {
            while quietly(&mut iptables("-D", &rule)) {}
        }
        quietly(Command::new("ip").args(["link", "del", VETH_HOST]));
        quietly(Command::new("ip").args(["netns", "del", NETNS]));
    }

    /// `program`, run inside the namespace (nsenter switches the network namespace only;
    /// `ip netns exec` would also remount /sys, hiding the cgroups dockerd needs).
    fn command(program: &str) -> Command {
        let mut command = Command::new("nsenter");
        command
            .arg(format!("--net=/run/netns/{NETNS}"))
            .arg(program);
        command
    }

    /// An HTTP/1.0 GET of `path` on the namespace's loopback `port`: (status line, headers in
    /// lower case, body).
    fn get(port: u16, path: &str, accept: &str) -> std::io::Result<(String, String, Vec<u8>)> {
        use rustix::thread::{LinkNameSpaceType, move_into_link_name_space};
        use std::os::fd::AsFd;
        let handle = std::fs::File::open(format!("/run/netns/{NETNS}"))?;
        let path = path.to_owned();
        let accept = accept.to_owned();
        std::thread::spawn(move || {
            move_into_link_name_space(handle.as_fd(), Some(LinkNameSpaceType::Network))?;
            let mut stream = std::net::TcpStream::connect(("127.0.0.1", port))?;
            stream.set_read_timeout(Some(Duration::from_secs(10)))?;
            write!(
                stream,
                "GET {path} HTTP/1.0\r\nHost: 127.0.0.1:{port}\r\nAccept: {accept}\r\n\r\n"
            )?;
            let mut answer = Vec::new();
            stream.read_to_end(&mut answer)?;
            let split = answer
                .windows(4)
                .position(|w| w == b"\r\n\r\n")
                .ok_or_else(|| std::io::Error::other("no end of headers"))?;
            let head = String::from_utf8_lossy(&answer[..split]).into_owned();
            let (status, headers) = head.split_once("\r\n").unwrap_or((&head, ""));
            Ok((
                status.to_owned(),
                headers.to_lowercase(),
                answer[split + 4..].to_vec(),
            ))
        })
        .join()
        .unwrap()
    }
}

impl Drop for Network {
    fn drop(&mut self) {
        Network::remove();
        if self.forward_was_off {
            let _ = std::fs::write("/proc/sys/net/ipv4/ip_forward", "0");
        }
    }
}

/// A child process ended on drop: SIGTERM first, so dockerd closes its data root cleanly.
struct Daemon(Child);

impl Daemon {
    fn stop(&mut self) {
        if matches!(self.0.try_wait(), Ok(Some(_))) {
            return;
        }
        quietly(Command::new("kill").arg(self.0.id().to_string()));
        let deadline = Instant::now() + Duration::from_secs(30);
        while Instant::now() < deadline {
            if matches!(self.0.try_wait(), Ok(Some(_))) {
                return;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        self.stop();
    }
}

/// The test's Docker Engine: dockerd in the namespace, overlay2 on the cached data root.
struct Docker {
    client: PathBuf,
    config: tempfile::TempDir,
    socket: PathBuf,
    _daemon: Daemon,
}

impl Docker {
    fn start(cache: &Path, run_dir: &Path) -> Docker {
        let pidfile = cache.join("dockerd.pid");
        stop_stale_dockerd(&pidfile);
        let socket = run_dir.join("docker.sock");
        let log = std::fs::File::create(cache.join("dockerd.log")).unwrap();
        let child = Network::command("dockerd")
            .arg("--data-root")
            .arg(cache.join("docker"))
            .arg("--exec-root")
            .arg(run_dir.join("exec"))
            .arg("--pidfile")
            .arg(&pidfile)
            .arg("--host")
            .arg(format!("unix://{}", socket.display()))
            .args([
                "--storage-driver",
                "overlay2",
                "--bridge=none",
                "--iptables=false",
                "--ip-masq=false",
            ])
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("dockerd is installed (apt-get install docker.io)");
        // Debian's client, the daemon's own version, when there; any `docker` otherwise.
        let client = ["/usr/bin/docker", "docker"]
            .iter()
            .map(PathBuf::from)
            .find(|p| p.is_absolute() && p.exists())
            .unwrap_or_else(|| PathBuf::from("docker"));
        let docker = Docker {
            client,
            config: tempfile::tempdir().unwrap(),
            socket,
            _daemon: Daemon(child),
        };
        let deadline = Instant::now() + Duration::from_secs(60);
        while !quietly(&mut docker.command(&["version"])) {
            assert!(
                Instant::now() < deadline,
                "dockerd did not start: {}",
                std::fs::read_to_string(cache.join("dockerd.log")).unwrap_or_default()
            );
            std::thread::sleep(Duration::from_millis(200));
        }
        docker
    }

    fn command(&self, args: &[&str]) -> Command {
        let mut command = Command::new(&self.client);
        command
            .arg("--host")
            .arg(format!("unix://{}", self.socket.display()))
            .env("DOCKER_CONFIG", self.config.path())
            .env("DOCKER_BUILDKIT", "0")
            .args(args);
        command
    }

    fn run(&self, args: &[&str]) -> String {
        run(&mut self.command(args))
    }

    fn has_image(&self, name: &str) -> bool {
        quietly(&mut self.command(&["image", "inspect", name]))
    }

    fn label(&self, image: &str, label: &str) -> Option<String> {
        let format = format!("{{{{index .Config.Labels \"{label}\"}}}}");
        let out = self
            .command(&["image", "inspect", "--format", &format, image])
            .output()
            .ok()?;
        out.status
            .success()
            .then(|| String::from_utf8_lossy(&out.stdout).trim().to_owned())
    }

    fn inspect(&self, what: &str, format: &str) -> String {
        self.run(&["inspect", "--format", format, what])
            .trim()
            .to_owned()
    }
}

/// A dockerd a killed run left on the cached data root (its pid file names it) is stopped.
fn stop_stale_dockerd(pidfile: &Path) {
    let Some(pid) = std::fs::read_to_string(pidfile)
        .ok()
        .and_then(|p| p.trim().parse::<u32>().ok())
    else {
        return;
    };
    let comm = std::fs::read_to_string(format!("/proc/{pid}/comm")).unwrap_or_default();
    if comm.trim() != "dockerd" {
        return;
    }
    quietly(Command::new("kill").arg(pid.to_string()));
    let deadline = Instant::now() + Duration::from_secs(30);
    while Path::new(&format!("/proc/{pid}")).exists() && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// `debian:bookworm-slim`: a minbase debootstrap of bookworm, without apt's lists and caches,
/// docs and translations, imported. The rootfs tarball is kept in the cache.
fn base_image(docker: &Docker, cache: &Path) {
    if docker.has_image("debian:bookworm-slim") {
        return;
    }
    let tarball = cache.join("bookworm-minbase.tar");
    if !tarball.exists() {
        let rootfs = cache.join("rootfs.partial");
        if rootfs.exists() {
            std::fs::remove_dir_all(&rootfs).unwrap();
        }
        run(Command::new("debootstrap")
            .args(["--variant=minbase", "bookworm"])
            .arg(&rootfs)
            .arg("http://deb.debian.org/debian"));
        run(Command::new("sh").current_dir(&rootfs).args([
            "-c",
            "rm -rf var/cache/apt/archives/*.deb var/lib/apt/lists/* usr/share/doc/* \
             usr/share/man/* usr/share/info/* \
             && find usr/share/locale -mindepth 1 -maxdepth 1 ! -name locale.alias -exec rm -rf {} +",
        ]));
        let partial = cache.join("bookworm-minbase.tar.partial");
        run(Command::new("tar")
            .arg("-C")
            .arg(&rootfs)
            .args(["--numeric-owner", "-cf"])
            .arg(&partial)
            .arg("."));
        std::fs::rename(&partial, &tarball).unwrap();
        std::fs::remove_dir_all(&rootfs).unwrap();
    }
    docker.run(&[
        "import",
        "--change",
        "CMD [\"bash\"]",
        tarball.to_str().unwrap(),
        "debian:bookworm-slim",
    ]);
}

fn sha256_hex(bytes: &[u8]) -> String {
    hex::encode(Sha256::digest(bytes))
}

/// `rust:1-slim-bookworm` as the official image lays it out (rustup in /usr/local/cargo/bin,
/// the toolchain under /usr/local/rustup), from this machine's toolchain and CA bundle. Rebuilt
/// only when either changes (a label records both).
fn build_image(docker: &Docker, start: Instant) {
    let sysroot = PathBuf::from(run(Command::new("rustc").args(["--print", "sysroot"])).trim());
    let verbose = run(Command::new("rustc").arg("-vV"));
    let version = run(Command::new("rustc").arg("--version"));
    let version = version.split_whitespace().nth(1).unwrap().to_owned();
    let ca = std::fs::read("/etc/ssl/certs/ca-certificates.crt").unwrap();
    let key = sha256_hex(format!("{verbose}{}", sha256_hex(&ca)).as_bytes());
    if docker
        .label("rust:1-slim-bookworm", "pullthrough.test.key")
        .is_some_and(|k| k == key)
    {
        return;
    }
    log(
        start,
        "building rust:1-slim-bookworm from this machine's toolchain",
    );
    let context = tempfile::tempdir().unwrap();
    let toolchain = format!("{version}-x86_64-unknown-linux-gnu");
    let toolchains = context.path().join("rustup/toolchains");
    std::fs::create_dir_all(&toolchains).unwrap();
    // Hard links when on the same file system (no copy of ~1 GB), a copy otherwise.
    let target = toolchains.join(&toolchain);
    if !quietly(Command::new("cp").arg("-al").arg(&sysroot).arg(&target)) {
        let _ = std::fs::remove_dir_all(&target);
        run(Command::new("cp").arg("-a").arg(&sysroot).arg(&target));
    }
    let _ = std::fs::remove_dir_all(target.join("share/doc"));
    std::fs::write(
        context.path().join("rustup/settings.toml"),
        format!("version = \"12\"\ndefault_toolchain = \"{toolchain}\"\nprofile = \"minimal\"\nauto_self_update = \"disable\"\n"),
    )
    .unwrap();
    let bin = context.path().join("cargo/bin");
    std::fs::create_dir_all(&bin).unwrap();
    let rustup = run(Command::new("sh").args(["-c", "command -v rustup"]));
    std::fs::copy(rustup.trim(), bin.join("rustup")).unwrap();
    for proxy in [
        "cargo",
        "rustc",
        "rustdoc",
        "cargo-clippy",
        "clippy-driver",
        "cargo-fmt",
        "rustfmt",
    ] {
        std::os::unix::fs::symlink("rustup", bin.join(proxy)).unwrap();
    }
    std::fs::write(context.path().join("ca-certificates.crt"), &ca).unwrap();
    std::fs::write(
        context.path().join("Dockerfile"),
        format!(
            "FROM debian:bookworm-slim\n\
             RUN apt-get update && apt-get install -y --no-install-recommends ca-certificates gcc libc6-dev \\\n\
             \x20   && rm -rf /var/lib/apt/lists/*\n\
             COPY ca-certificates.crt /etc/ssl/certs/ca-certificates.crt\n\
             COPY rustup /usr/local/rustup\n\
             COPY cargo /usr/local/cargo\n\
             ENV RUSTUP_HOME=/usr/local/rustup CARGO_HOME=/usr/local/cargo RUST_VERSION={version} \\\n\
             \x20   PATH=/usr/local/cargo/bin:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin\n"
        ),
    )
    .unwrap();
    docker.run(&[
        "build",
        "--network",
        "host",
        "--label",
        &format!("pullthrough.test.key={key}"),
        "--tag",
        "rust:1-slim-bookworm",
        context.path().to_str().unwrap(),
    ]);
}

/// The repository's image, by the repository's Dockerfile. The build stage is tagged too, so
/// pruning what older runs left keeps the dependency layer this build reused.
fn pullthrough_image(docker: &Docker) -> Duration {
    let started = Instant::now();
    let repo = env!("CARGO_MANIFEST_DIR");
    for (target, tag) in [(Some("build"), "pullthrough:test-build"), (None, IMAGE)] {
        let mut args = vec!["build", "--network", "host", "--tag", tag];
        if let Some(target) = target {
            args.extend(["--target", target]);
        }
        args.push(repo);
        docker.run(&args);
    }
    started.elapsed()
}

/// Debian's `docker-registry` inside the namespace, storing under `dir`; its access log (one
/// line per request, combined format) goes to `dir/access.log`.
fn registry(dir: &Path) -> Daemon {
    let config = dir.join("registry.yml");
    std::fs::write(
        &config,
        format!(
            "version: 0.1\nlog:\n  level: warn\n  accesslog:\n    disabled: false\nstorage:\n  filesystem:\n    rootdirectory: {}\nhttp:\n  addr: 0.0.0.0:{REGISTRY_PORT}\n",
            dir.join("storage").display()
        ),
    )
    .unwrap();
    let access_log = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(dir.join("access.log"))
        .unwrap();
    let child = Network::command("docker-registry")
        .arg("serve")
        .arg(&config)
        .stdout(access_log)
        .stderr(Stdio::null())
        .spawn()
        .expect("docker-registry is installed (apt-get install docker-registry)");
    let daemon = Daemon(child);
    wait_for(REGISTRY_PORT, "/v2/");
    daemon
}

fn wait_for(port: u16, path: &str) {
    let deadline = Instant::now() + Duration::from_secs(30);
    while Network::get(port, path, "*/*").is_err() {
        assert!(
            Instant::now() < deadline,
            "nothing answers {path} on {port}"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

fn write_blob(layout: &Path, bytes: &[u8]) -> (String, usize) {
    let digest = format!("sha256:{}", sha256_hex(bytes));
    std::fs::write(layout.join("blobs/sha256").join(&digest[7..]), bytes).unwrap();
    (digest, bytes.len())
}

/// An OCI layout holding one small linux/amd64 image tagged `tag`: (manifest digest, layer
/// digest).
fn oci_layout(layout: &Path, tag: &str) -> (String, String) {
    std::fs::create_dir_all(layout.join("blobs/sha256")).unwrap();
    std::fs::write(
        layout.join("oci-layout"),
        r#"{"imageLayoutVersion":"1.0.0"}"#,
    )
    .unwrap();
    let content = "hello from the pullthrough image test\n".repeat(1000);
    let mut tar = tar::Builder::new(Vec::new());
    let mut header = tar::Header::new_gnu();
    header.set_size(content.len() as u64);
    header.set_mode(0o644);
    header.set_cksum();
    tar.append_data(&mut header, "hello.txt", content.as_bytes())
        .unwrap();
    let raw = tar.into_inner().unwrap();
    let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
    gz.write_all(&raw).unwrap();
    let (layer, layer_size) = write_blob(layout, &gz.finish().unwrap());
    let config = format!(
        r#"{{"architecture":"amd64","os":"linux","config":{{}},"rootfs":{{"type":"layers","diff_ids":["sha256:{}"]}}}}"#,
        sha256_hex(&raw)
    );
    let (config, config_size) = write_blob(layout, config.as_bytes());
    let manifest = format!(
        r#"{{"schemaVersion":2,"mediaType":"application/vnd.oci.image.manifest.v1+json","config":{{"mediaType":"application/vnd.oci.image.config.v1+json","digest":"{config}","size":{config_size}}},"layers":[{{"mediaType":"application/vnd.oci.image.layer.v1.tar+gzip","digest":"{layer}","size":{layer_size}}}]}}"#
    );
    let (digest, size) = write_blob(layout, manifest.as_bytes());
    std::fs::write(
        layout.join("index.json"),
        format!(
            r#"{{"schemaVersion":2,"manifests":[{{"mediaType":"application/vnd.oci.image.manifest.v1+json","digest":"{digest}","size":{size},"annotations":{{"org.opencontainers.image.ref.name":"{tag}"}}}}]}}"#
        ),
    )
    .unwrap();
    (digest, layer)
}

/// skopeo inside the namespace, with no proxy variables.
fn skopeo(args: &[&str]) -> String {
    let mut command = Network::command("skopeo");
    for var in ["HTTP_PROXY", "HTTPS_PROXY", "http_proxy", "https_proxy"] {
        command.env_remove(var);
    }
    run(command.args(args))
}

/// Pulls `repo:tag` from pullthrough into an OCI layout under `dir`: the manifest's digest.
fn pull(dir: &Path, name: &str, repo: &str, tag: &str) -> String {
    pull_from(
        &format!("127.0.0.1:{PULLTHROUGH_PORT}"),
        dir,
        name,
        repo,
        tag,
    )
}

/// Pulls `repo:tag` from the mirror at `address` into an OCI layout under `dir`: the
/// manifest's digest.
fn pull_from(address: &str, dir: &Path, name: &str, repo: &str, tag: &str) -> String {
    let layout = dir.join(name);
    skopeo(&[
        "copy",
        "--src-tls-verify=false",
        &format!("docker://{address}/{repo}:{tag}"),
        &format!("oci:{}:{tag}", layout.display()),
    ]);
    let index: serde_json::Value =
        serde_json::from_slice(&std::fs::read(layout.join("index.json")).unwrap()).unwrap();
    index["manifests"][0]["digest"].as_str().unwrap().to_owned()
}

/// The container removed (with its anonymous volume) when dropped, even after a failure.
struct Container<'a>(&'a Docker);

impl Drop for Container<'_> {
    fn drop(&mut self) {
        quietly(&mut self.0.command(&["rm", "--force", "--volumes", CONTAINER]));
    }
}

/// Waits for the health status `healthy`: how long it took.
fn wait_healthy(docker: &Docker) -> Duration {
    wait_container_healthy(docker, CONTAINER)
}

/// Waits for `container`'s health status `healthy`: how long it took.
fn wait_container_healthy(docker: &Docker, container: &str) -> Duration {
    let started = Instant::now();
    loop {
        let status = docker.inspect(container, "{{.State.Health.Status}}");
        if status == "healthy" {
            return started.elapsed();
        }
        assert!(
            started.elapsed() < Duration::from_secs(60) && status != "unhealthy",
            "health status {status}; logs: {}",
            docker.run(&["logs", container])
        );
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// A file of the container, read with `docker cp` (there is no shell in the image).
fn container_file(docker: &Docker, file: &str) -> String {
    let tarred = docker
        .command(&["cp", &format!("{CONTAINER}:{file}"), "-"])
        .output()
        .unwrap()
        .stdout;
    let mut archive = tar::Archive::new(&tarred[..]);
    let mut text = String::new();
    archive
        .entries()
        .unwrap()
        .next()
        .unwrap_or_else(|| panic!("no {file} in the container"))
        .unwrap()
        .read_to_string(&mut text)
        .unwrap();
    text
}

/// The process runs as 10001:10001, and the image names both (`/etc/passwd`, `/etc/group`)
/// and has root certificates for rustls.
fn check_user(docker: &Docker) {
    let pid = docker.inspect(CONTAINER, "{{.State.Pid}}");
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    for field in ["Uid:", "Gid:"] {
        let line = status.lines().find(|l| l.starts_with(field)).unwrap();
        let ids: Vec<&str> = line.split_whitespace().skip(1).collect();
        assert_eq!(ids, ["10001"; 4], "{line}");
    }
    for (file, entry) in [
        ("/etc/passwd", "pullthrough:x:10001:10001:"),
        ("/etc/group", "pullthrough:x:10001:"),
    ] {
        let text = container_file(docker, file);
        assert!(text.lines().any(|l| l.starts_with(entry)), "{file}: {text}");
    }
    let certificates = container_file(docker, "/etc/ssl/certs/ca-certificates.crt");
    assert!(certificates.matches("BEGIN CERTIFICATE").count() > 50);
}

/// What is served from the cache says so: the tag's manifest and the layer both `X-Cache: HIT`.
fn check_hits(repo: &str, tag: &str, layer: &str) {
    for path in [
        format!("/v2/{repo}/manifests/{tag}"),
        format!("/v2/{repo}/blobs/{layer}"),
    ] {
        let (status, headers, body) = Network::get(
            PULLTHROUGH_PORT,
            &path,
            "application/vnd.oci.image.manifest.v1+json",
        )
        .unwrap();
        assert!(status.contains(" 200 "), "{path}: {status}");
        assert!(
            headers.lines().any(|l| l.trim() == "x-cache: hit"),
            "{path}: {headers}"
        );
        if path.contains("/blobs/") {
            // The cached layer's bytes, whole.
            assert_eq!(format!("sha256:{}", sha256_hex(&body)), layer, "{path}");
        }
    }
}

/// The logs are plain text for a log collector: no colour codes, no JSON lines.
fn check_logs(docker: &Docker) {
    let out = docker.command(&["logs", CONTAINER]).output().unwrap();
    let logs = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(logs.contains("listening"), "{logs}");
    assert!(
        !logs.contains('\u{1b}'),
        "ANSI escapes in the logs: {logs:?}"
    );
    assert!(
        !logs.lines().any(|l| l.trim_start().starts_with('{')),
        "JSON in the logs: {logs}"
    );
}

/// `docker stop` (SIGTERM, 10 s grace) ends it by itself: exit code 0, not SIGKILL's 137.
fn check_stop(docker: &Docker) -> Duration {
    let started = Instant::now();
    docker.run(&["stop", CONTAINER]);
    let took = started.elapsed();
    assert!(took < Duration::from_secs(10), "docker stop took {took:?}");
    assert_eq!(docker.inspect(CONTAINER, "{{.State.ExitCode}}"), "0");
    took
}

/// Old images the tags no longer name (the last run's build), stopped containers and unused
/// volumes go, so the cached data root does not grow run after run.
fn prune(docker: &Docker) {
    quietly(&mut docker.command(&["container", "prune", "--force"]));
    quietly(&mut docker.command(&["image", "prune", "--force"]));
    quietly(&mut docker.command(&["volume", "prune", "--force"]));
}

/// The compose files' images that cannot be pulled here (nginx, Redis, MinIO and its client),
/// replaced by one local image: Debian's nginx and Redis, and moto's S3 server for MinIO.
const SERVICES_IMAGE: &str = "pullthrough-test/services:1";

fn services_image(docker: &Docker) {
    let context = tempfile::tempdir().unwrap();
    // pip reaches PyPI through TLS that may be inspected: it trusts this machine's bundle.
    std::fs::copy(
        "/etc/ssl/certs/ca-certificates.crt",
        context.path().join("ca-certificates.crt"),
    )
    .unwrap();
    std::fs::write(
        context.path().join("Dockerfile"),
        "FROM debian:bookworm-slim\n\
         RUN apt-get update && apt-get install -y --no-install-recommends nginx redis-server curl \\\n\
         \x20   python3 python3-venv ca-certificates && rm -rf /var/lib/apt/lists/* \\\n\
         \x20   && rm /etc/nginx/sites-enabled/default\n\
         COPY ca-certificates.crt /usr/local/share/host-ca-certificates.crt\n\
         RUN python3 -m venv /opt/moto && PIP_CERT=/usr/local/share/host-ca-certificates.crt \\\n\
         \x20   /opt/moto/bin/pip install -q 'moto[server]>=5,<6'\n",
    )
    .unwrap();
    docker.run(&[
        "build",
        "--network",
        "host",
        "--tag",
        SERVICES_IMAGE,
        context.path().to_str().unwrap(),
    ]);
}

/// A compose project brought up with Debian's docker-compose (1.29) on the test's dockerd, and
/// taken down with its volumes when dropped.
struct Compose<'a> {
    docker: &'a Docker,
    project: &'static str,
    files: Vec<PathBuf>,
}

impl Compose<'_> {
    fn command(&self, args: &[&str]) -> Command {
        let mut command = Command::new("docker-compose");
        command
            .env(
                "DOCKER_HOST",
                format!("unix://{}", self.docker.socket.display()),
            )
            .env("DOCKER_CONFIG", self.docker.config.path())
            .env(
                "PULLTHROUGH_CLUSTER_SECRET",
                "compose-test-secret-0123456789",
            )
            .args(["--ansi", "never"])
            .arg("--project-directory")
            .arg(env!("CARGO_MANIFEST_DIR"))
            .arg("--project-name")
            .arg(self.project);
        for file in &self.files {
            command.arg("--file").arg(file);
        }
        command.args(args);
        command
    }

    fn run(&self, args: &[&str]) -> String {
        run(&mut self.command(args))
    }

    /// The container of `service`.
    fn container(&self, service: &str) -> String {
        let id = self.run(&["ps", "-q", service]).trim().to_owned();
        assert!(!id.is_empty(), "no container for {service}");
        id
    }

    /// The address of `service`'s container on the project's network.
    fn address(&self, service: &str) -> String {
        self.docker.inspect(
            &self.container(service),
            "{{range .NetworkSettings.Networks}}{{.IPAddress}}{{end}}",
        )
    }
}

impl Drop for Compose<'_> {
    fn drop(&mut self) {
        quietly(&mut self.command(&["down", "--volumes", "--remove-orphans", "--timeout", "10"]));
    }
}

/// The replicas file for Compose v1, which does not read the top-level `name:` (Compose v2
/// does); the project name is given with `--project-name` instead.
fn replicas_file_for_compose_v1(dir: &Path) -> PathBuf {
    let repo = Path::new(env!("CARGO_MANIFEST_DIR"));
    let text = std::fs::read_to_string(repo.join("docker-compose.replicas.yml")).unwrap();
    assert!(
        text.lines().any(|l| l == "name: pullthrough-replicas"),
        "the replicas file names its own project"
    );
    let v1: String = text
        .lines()
        .filter(|l| !l.starts_with("name:"))
        .map(|l| format!("{l}\n"))
        .collect();
    let file = dir.join("docker-compose.replicas.v1.yml");
    std::fs::write(&file, v1).unwrap();
    file
}

/// The test-only override: the upstream is the namespace's registry, and the unpullable images
/// are the local services image.
fn compose_override(dir: &Path) -> (PathBuf, PathBuf) {
    let upstream = format!("http://{NS_ADDR}:{REGISTRY_PORT}");
    let single = dir.join("single.override.yml");
    std::fs::write(
        &single,
        format!(
            "services:\n  pullthrough:\n    environment:\n      PULLTHROUGH_UPSTREAM: {upstream}\n"
        ),
    )
    .unwrap();
    let replicas = dir.join("replicas.override.yml");
    std::fs::write(
        &replicas,
        format!(
            r#"services:
  pullthrough-a:
    environment:
      PULLTHROUGH_UPSTREAM: {upstream}
  pullthrough-b:
    environment:
      PULLTHROUGH_UPSTREAM: {upstream}
  balancer:
    image: {SERVICES_IMAGE}
    command: ["nginx", "-g", "daemon off;"]
  redis:
    image: {SERVICES_IMAGE}
    command: ["redis-server", "--protected-mode", "no", "--save", "", "--appendonly", "no"]
  minio:
    image: {SERVICES_IMAGE}
    command: ["/opt/moto/bin/moto_server", "-H", "0.0.0.0", "-p", "9000"]
  bucket:
    image: {SERVICES_IMAGE}
    entrypoint: ["sh", "-c", "until curl -fsS -X PUT http://minio:9000/pullthrough; do sleep 1; done"]
"#
        ),
    )
    .unwrap();
    (single, replicas)
}

/// Upstream GETs of the tag and of each blob, from the registry's access log.
fn upstream_gets(registry_dir: &Path, blobs: &[&str]) -> Vec<usize> {
    let log = std::fs::read_to_string(registry_dir.join("access.log")).unwrap_or_default();
    let paths = std::iter::once("/v2/library/hello/manifests/1".to_owned())
        .chain(blobs.iter().map(|b| format!("/v2/library/hello/blobs/{b}")));
    paths
        .map(|path| {
            let needle = format!("\"GET {path} HTTP/");
            log.lines().filter(|l| l.contains(&needle)).count()
        })
        .collect()
}

/// Both compose files pass `docker-compose config`; docker-compose.yml comes up healthy and
/// serves pulls; the replicas file comes up (the balancer after both replicas are healthy), and
/// pulls through the balancer and through each replica cost one upstream GET per object.
fn check_compose_files(docker: &Docker, dir: &Path, image: (&str, &str), start: Instant) {
    let (digest, layer) = image;
    let repo = Path::new(env!("CARGO_MANIFEST_DIR"));
    let manifest: serde_json::Value = serde_json::from_slice(
        &std::fs::read(dir.join("layout/blobs/sha256").join(&digest[7..])).unwrap(),
    )
    .unwrap();
    let config = manifest["config"]["digest"].as_str().unwrap();
    docker.run(&["tag", IMAGE, "pullthrough:latest"]);
    services_image(docker);
    log(start, "services image ready");
    let (single_override, replicas_override) = compose_override(dir);
    let registry_dir = dir.join("compose-registry");
    std::fs::create_dir_all(&registry_dir).unwrap();
    let _registry = registry(&registry_dir);
    skopeo(&[
        "copy",
        "--dest-tls-verify=false",
        &format!("oci:{}:1", dir.join("layout").display()),
        &format!("docker://127.0.0.1:{REGISTRY_PORT}/library/hello:1"),
    ]);
    let gets = || upstream_gets(&registry_dir, &[config, layer]);
    assert_eq!(gets(), [0, 0, 0]);

    let single = Compose {
        docker,
        project: "pullthrough",
        files: vec![repo.join("docker-compose.yml"), single_override],
    };
    run(single
        .command(&["config", "--quiet"])
        .env_remove("PULLTHROUGH_CLUSTER_SECRET"));
    single.run(&["up", "--detach", "--no-build", "pullthrough"]);
    let healthy = wait_container_healthy(docker, &single.container("pullthrough"));
    log(
        start,
        &format!("compose: the mirror healthy after {healthy:?}"),
    );
    assert_eq!(pull(dir, "compose-first", "library/hello", "1"), digest);
    assert_eq!(pull(dir, "compose-second", "library/hello", "1"), digest);
    check_hits("library/hello", "1", layer);
    assert_eq!(
        gets(),
        [1, 1, 1],
        "one upstream GET per object for two pulls"
    );
    drop(single);

    let replicas = Compose {
        docker,
        project: "pullthrough-replicas",
        files: vec![replicas_file_for_compose_v1(dir), replicas_override],
    };
    replicas.run(&["config", "--quiet"]);
    replicas.run(&["up", "--detach", "--no-build"]);
    for service in ["pullthrough-a", "pullthrough-b"] {
        wait_container_healthy(docker, &replicas.container(service));
    }
    wait_for(BALANCER_PORT, "/v2/");
    log(start, "compose: replicas healthy, balancer answering");
    let mirrors = [
        format!("127.0.0.1:{BALANCER_PORT}"),
        format!("{}:5000", replicas.address("pullthrough-a")),
        format!("{}:5000", replicas.address("pullthrough-b")),
    ];
    for (n, mirror) in mirrors.iter().enumerate() {
        let got = pull_from(mirror, dir, &format!("replicas-{n}"), "library/hello", "1");
        assert_eq!(got, digest, "through {mirror}");
    }
    assert_eq!(
        gets(),
        [2, 2, 2],
        "one more upstream GET per object for pulls through the balancer and each replica"
    );
    log(
        start,
        "compose: replicas pulled through with one upstream GET per object",
    );
}

#[test]
#[ignore = "needs root, debootstrap, docker.io, skopeo, docker-registry, iproute2 and iptables (run by .ci/run)"]
fn the_image_builds_runs_read_only_as_its_user_and_serves_pulls_from_its_cache() {
    let start = Instant::now();
    let cache = cache_dir();
    let _lock = Lock::take(&cache);
    let dir = tempfile::tempdir().unwrap();
    let _network = Network::up();
    let docker = Docker::start(&cache, dir.path());
    log(start, "dockerd up");
    base_image(&docker, &cache);
    build_image(&docker, start);
    log(start, "base images ready");
    let build = pullthrough_image(&docker);
    log(start, &format!("pullthrough image built in {build:?}"));
    prune(&docker);
    let size: u64 = docker
        .run(&["image", "inspect", "--format", "{{.Size}}", IMAGE])
        .trim()
        .parse()
        .unwrap();
    eprintln!("[image] {IMAGE} is {:.1} MB", size as f64 / 1e6);
    assert!(size < 30_000_000, "the image is {size} bytes");

    let registry_dir = dir.path().join("registry");
    std::fs::create_dir_all(&registry_dir).unwrap();
    let mut registry = registry(&registry_dir);
    let (digest, layer) = oci_layout(&dir.path().join("layout"), "1");
    skopeo(&[
        "copy",
        "--dest-tls-verify=false",
        &format!("oci:{}:1", dir.path().join("layout").display()),
        &format!("docker://127.0.0.1:{REGISTRY_PORT}/library/hello:1"),
    ]);

    let container = Container(&docker);
    quietly(&mut docker.command(&["rm", "--force", "--volumes", CONTAINER]));
    docker.run(&[
        "run",
        "--detach",
        "--name",
        CONTAINER,
        "--network",
        "host",
        "--read-only",
        "--env",
        // By name: the static binary's resolver (musl's) reads the /etc/hosts Docker provides.
        &format!("PULLTHROUGH_UPSTREAM=http://localhost:{REGISTRY_PORT}"),
        IMAGE,
    ]);
    let healthy = wait_healthy(&docker);
    log(start, &format!("healthy after {healthy:?}"));
    check_user(&docker);

    // The first pull goes upstream; the second, with the upstream gone, can only be the cache.
    assert_eq!(pull(dir.path(), "first", "library/hello", "1"), digest);
    registry.stop();
    assert_eq!(pull(dir.path(), "second", "library/hello", "1"), digest);
    check_hits("library/hello", "1", &layer);
    log(start, "pulled twice, the second from the cache");

    let diff = docker.run(&["diff", CONTAINER]);
    assert_eq!(diff.trim(), "", "the container wrote outside its volume");
    check_logs(&docker);
    let stop = check_stop(&docker);
    log(start, &format!("stopped in {stop:?}, exit code 0"));
    drop(container);

    check_compose_files(&docker, dir.path(), (&digest, &layer), start);
    prune(&docker);
}
