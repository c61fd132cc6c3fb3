//! TLS on the listener: a client that trusts the test CA pulls over HTTPS, a rotated
//! certificate is served without a restart, and a bad certificate stops startup with one line.

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::too_many_lines,
    reason = "a test panics on what it did not expect, and may read as one long story"
)]

mod support;

use std::path::Path;
use std::time::Duration;
use support::binary::Pullthrough;
use support::{FakeHub, Image, TestProxy, eventually};

const NAME: &str = "pullthrough.test";

/// A CA, and a certificate for `pullthrough.test` it signed: (CA PEM, cert PEM, key PEM).
fn ca_and_leaf() -> (String, String, String) {
    support::ca_and_certificate(NAME)
}

fn client(ca: &str, proxy: &TestProxy) -> reqwest::Client {
    let addr: std::net::SocketAddr = proxy.url.trim_start_matches("http://").parse().unwrap();
    reqwest::Client::builder()
        .no_proxy()
        .tls_certs_only([reqwest::Certificate::from_pem(ca.as_bytes()).unwrap()])
        .resolve(NAME, addr)
        .pool_max_idle_per_host(0)
        .build()
        .unwrap()
}

/// Waits (up to 15 s, the check runs every 5 s) until `proxy` serves a certificate of the
/// CA `new`; then a new connection trusting only the CA `old` is refused (each client opens
/// its own connection: HTTP/2 would reuse one).
async fn rotated_to(proxy: &TestProxy, new: &str, old: &str, failure: &str) {
    let rotated = client(new, proxy);
    let served = eventually(Duration::from_secs(15), async || {
        rotated.get(https(proxy, "/v2/")).send().await.is_ok()
    })
    .await;
    assert!(served, "{failure}");
    assert!(
        client(old, proxy)
            .get(https(proxy, "/v2/"))
            .send()
            .await
            .is_err()
    );
}

fn https(proxy: &TestProxy, path: &str) -> String {
    let port = proxy.url.rsplit(':').next().unwrap();
    format!("https://{NAME}:{port}{path}")
}

fn write_pair(dir: &Path, cert: &str, key: &str) {
    // Written beside and renamed, as a rotation tool would.
    std::fs::write(dir.join("cert.tmp"), cert).unwrap();
    std::fs::write(dir.join("key.tmp"), key).unwrap();
    std::fs::rename(dir.join("key.tmp"), dir.join("key.pem")).unwrap();
    std::fs::rename(dir.join("cert.tmp"), dir.join("cert.pem")).unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pulls_over_https_and_a_rotated_certificate_needs_no_restart() {
    let log = log();
    let hub = FakeHub::start().await;
    let image = Image::single(
        "tls",
        "application/vnd.docker.distribution.manifest.v2+json",
        100,
    );
    hub.push("library/secure", "1", &image);
    let certs = tempfile::tempdir().unwrap();
    let (ca1, cert1, key1) = ca_and_leaf();
    write_pair(certs.path(), &cert1, &key1);
    let proxy = TestProxy::start_with(&hub, |c| {
        c.tls_cert = Some(certs.path().join("cert.pem"));
        c.tls_key = Some(certs.path().join("key.pem"));
    })
    .await;

    // `pullthrough healthcheck` with the same settings reaches its own TLS listener.
    let addr = proxy.url.trim_start_matches("http://").to_owned();
    let check = Pullthrough::new()
        .arg("healthcheck")
        .listen(&addr)
        .data_dir(&proxy.config.data_dir)
        .env("PULLTHROUGH_TLS_CERT", certs.path().join("cert.pem"))
        .env("PULLTHROUGH_TLS_KEY", certs.path().join("key.pem"))
        .output_within(Duration::from_secs(60))
        .await;
    assert!(
        check.status.success(),
        "{}",
        String::from_utf8_lossy(&check.stderr)
    );

    let trusting = client(&ca1, &proxy);
    let r = trusting
        .get(https(&proxy, "/v2/library/secure/manifests/1"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(r.bytes().await.unwrap(), image.bytes);
    // Plain HTTP on the TLS port gets nowhere.
    assert!(
        proxy
            .client
            .get(format!("{}/v2/", proxy.url))
            .send()
            .await
            .is_err()
    );
    // A client that does not trust the CA refuses the connection.
    let (ca2, cert2, key2) = ca_and_leaf();
    assert!(
        client(&ca2, &proxy)
            .get(https(&proxy, "/v2/"))
            .send()
            .await
            .is_err()
    );

    // Rotate to a certificate from the second CA: served within the check interval.
    write_pair(certs.path(), &cert2, &key2);
    rotated_to(&proxy, &ca2, &ca1, "the rotated certificate was not served").await;

    // A broken rotation keeps the certificate in use, once the check (every 5 s) refused it.
    let refused = [
        &*certs.path().join("cert.pem").display().to_string(),
        "did not load",
    ];
    let before = log.count(&refused);
    std::fs::write(certs.path().join("cert.pem"), "not a certificate").unwrap();
    let checked = eventually(Duration::from_secs(15), async || {
        log.count(&refused) > before
    })
    .await;
    assert!(checked, "the broken certificate was never checked");
    assert_eq!(
        client(&ca2, &proxy)
            .get(https(&proxy, "/v2/"))
            .send()
            .await
            .unwrap()
            .status(),
        200
    );
}

#[test]
fn a_bad_certificate_stops_startup_with_one_line() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("cert.pem"), "garbage").unwrap();
    std::fs::write(dir.path().join("key.pem"), "garbage").unwrap();
    let out = Pullthrough::new()
        .data_dir(dir.path().join("cache"))
        .env("PULLTHROUGH_TLS_CERT", dir.path().join("cert.pem"))
        .env("PULLTHROUGH_TLS_KEY", dir.path().join("key.pem"))
        .output();
    assert_eq!(out.status.code(), Some(2));
    let stderr = String::from_utf8(out.stderr).unwrap();
    assert_eq!(stderr.trim_end().lines().count(), 1, "{stderr}");
    assert!(stderr.contains("tls_cert"), "{stderr}");
    let only_cert = Pullthrough::new()
        .env("PULLTHROUGH_TLS_CERT", dir.path().join("cert.pem"))
        .output();
    assert_eq!(only_cert.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&only_cert.stderr).contains("tls_key"));
}

/// Points `link` at `target`, replacing what was there in one step (a rename), as Kubernetes
/// swaps a secret volume's `..data`.
fn swap_symlink(target: &Path, link: &Path) {
    let mut tmp = link.as_os_str().to_owned();
    tmp.push("_tmp");
    std::os::unix::fs::symlink(target, &tmp).unwrap();
    std::fs::rename(&tmp, link).unwrap();
}

/// Sets the modification time of `path` to that of `like`.
fn same_mtime(path: &Path, like: &Path) {
    let time = std::fs::metadata(like).unwrap().modified().unwrap();
    std::fs::File::options()
        .write(true)
        .open(path)
        .unwrap()
        .set_modified(time)
        .unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_symlink_swap_to_files_with_the_same_times_is_picked_up() {
    let hub = FakeHub::start().await;
    // As a Kubernetes secret volume: cert.pem -> ..data/cert.pem, ..data -> a version directory.
    let certs = tempfile::tempdir().unwrap();
    let (v1, v2) = (certs.path().join("v1"), certs.path().join("v2"));
    let (ca1, cert1, key1) = ca_and_leaf();
    let (ca2, cert2, key2) = ca_and_leaf();
    std::fs::create_dir(&v1).unwrap();
    std::fs::create_dir(&v2).unwrap();
    write_pair(&v1, &cert1, &key1);
    write_pair(&v2, &cert2, &key2);
    // The new version's files carry the old ones' modification time (unpacked from an archive,
    // copied with `cp -p`): only the files the links lead to differ.
    same_mtime(&v2.join("cert.pem"), &v1.join("cert.pem"));
    same_mtime(&v2.join("key.pem"), &v1.join("key.pem"));
    let data = certs.path().join("..data");
    swap_symlink(&v1, &data);
    for file in ["cert.pem", "key.pem"] {
        std::os::unix::fs::symlink(data.join(file), certs.path().join(file)).unwrap();
    }
    let proxy = TestProxy::start_with(&hub, |c| {
        c.tls_cert = Some(certs.path().join("cert.pem"));
        c.tls_key = Some(certs.path().join("key.pem"));
    })
    .await;
    let first = client(&ca1, &proxy);
    let r = first.get(https(&proxy, "/v2/")).send().await.unwrap();
    assert_eq!(r.status(), 200);

    swap_symlink(&v2, &data);
    rotated_to(
        &proxy,
        &ca2,
        &ca1,
        "the certificate behind the swapped symlink was not served",
    )
    .await;
}

/// Log output kept for a test to read.
#[derive(Clone, Default)]
struct Captured(std::sync::Arc<std::sync::Mutex<Vec<u8>>>);

/// What every test here logs (the subscriber is global, so the background checks' lines
/// count too): installed by the first test that asks.
fn log() -> &'static Captured {
    static LOG: std::sync::OnceLock<Captured> = std::sync::OnceLock::new();
    LOG.get_or_init(|| {
        let log = Captured::default();
        let writer = log.clone();
        tracing::subscriber::set_global_default(
            tracing_subscriber::fmt()
                .with_writer(move || writer.clone())
                .with_ansi(false)
                .finish(),
        )
        .unwrap();
        log
    })
}

impl std::io::Write for Captured {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(buf);
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl Captured {
    /// Log lines that contain every one of `needles`.
    fn count(&self, needles: &[&str]) -> usize {
        let text = String::from_utf8_lossy(&self.0.lock().unwrap()).into_owned();
        text.lines()
            .filter(|l| needles.iter().all(|n| l.contains(n)))
            .count()
    }
}

/// Whether a TLS client that trusts only `ca` (PEM) completes a handshake with `acceptor`.
async fn trusted(acceptor: &tokio_rustls::TlsAcceptor, ca: &str) -> bool {
    use rustls::pki_types::pem::PemObject;
    let (client_io, server_io) = tokio::io::duplex(64 * 1024);
    let acceptor = acceptor.clone();
    let server = tokio::spawn(async move { acceptor.accept(server_io).await.is_ok() });
    let mut roots = rustls::RootCertStore::empty();
    roots
        .add(rustls::pki_types::CertificateDer::from_pem_slice(ca.as_bytes()).unwrap())
        .unwrap();
    let provider = std::sync::Arc::new(rustls::crypto::aws_lc_rs::default_provider());
    let config = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots)
        .with_no_client_auth();
    // The client's end stays open until the server has read its last handshake message.
    let connected = tokio_rustls::TlsConnector::from(std::sync::Arc::new(config))
        .connect(NAME.try_into().unwrap(), client_io)
        .await;
    let accepted = server.await.unwrap();
    connected.is_ok() && accepted
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_oversized_certificate_file_is_refused_once_and_not_read_again_until_it_changes() {
    let log = log();
    let dir = tempfile::tempdir().unwrap();
    let (ca1, cert1, key1) = ca_and_leaf();
    let (ca2, cert2, key2) = ca_and_leaf();
    write_pair(dir.path(), &cert1, &key1);
    let (acceptor, certificates) =
        pullthrough::http::tls::acceptor(&dir.path().join("cert.pem"), &dir.path().join("key.pem"))
            .unwrap();
    assert!(trusted(&acceptor, &ca1).await);

    // The new pair, the certificate followed by 2 MiB of text outside any PEM block: it would
    // load if it were read whole.
    let padded = |fill: char| format!("{cert2}{}\n", String::from(fill).repeat(2 << 20));
    write_pair(dir.path(), &padded('x'), &key2);
    let path = dir.path().join("cert.pem").display().to_string();
    let refused = [path.as_str(), "did not load", "larger than"];
    // Several checks (the background one runs every 5 s as well): one error, and the
    // certificate in use stays.
    for _ in 0..3 {
        certificates.reload(false);
    }
    assert_eq!(log.count(&refused), 1);
    assert!(trusted(&acceptor, &ca1).await);
    assert!(!trusted(&acceptor, &ca2).await);

    // Changed again, still too big: refused once more.
    write_pair(dir.path(), &padded('y'), &key2);
    for _ in 0..3 {
        certificates.reload(false);
    }
    assert_eq!(log.count(&refused), 2);

    // A good file at last: served.
    write_pair(dir.path(), &cert2, &key2);
    certificates.reload(false);
    assert!(trusted(&acceptor, &ca2).await);
    assert_eq!(log.count(&refused), 2);
}
