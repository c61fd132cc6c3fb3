//! TLS on the listener: a client that trusts the test CA pulls over HTTPS, a rotated
//! certificate is served without a restart, and a bad certificate stops startup with one line.

mod support;

use std::path::Path;
use std::time::{Duration, Instant};
use support::{FakeHub, Image, TestProxy};

const NAME: &str = "pullthrough.test";

/// A CA, and a certificate for `pullthrough.test` it signed: (CA PEM, cert PEM, key PEM).
fn ca_and_leaf() -> (String, String, String) {
    let mut ca_params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
    ca_params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    let ca_key = rcgen::KeyPair::generate().unwrap();
    let ca = ca_params.self_signed(&ca_key).unwrap();
    let issuer = rcgen::Issuer::new(ca_params, ca_key);
    let params = rcgen::CertificateParams::new(vec![NAME.to_owned()]).unwrap();
    let key = rcgen::KeyPair::generate().unwrap();
    let leaf = params.signed_by(&key, &issuer).unwrap();
    (ca.pem(), leaf.pem(), key.serialize_pem())
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
    let check = tokio::process::Command::new(env!("CARGO_BIN_EXE_pullthrough"))
        .arg("healthcheck")
        .env("PULLTHROUGH_LISTEN", &addr)
        .env("PULLTHROUGH_DATA_DIR", &proxy.config.data_dir)
        .env("PULLTHROUGH_TLS_CERT", certs.path().join("cert.pem"))
        .env("PULLTHROUGH_TLS_KEY", certs.path().join("key.pem"))
        .output()
        .await
        .unwrap();
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
    let rotated = client(&ca2, &proxy);
    let started = Instant::now();
    loop {
        if rotated.get(https(&proxy, "/v2/")).send().await.is_ok() {
            break;
        }
        assert!(
            started.elapsed() < Duration::from_secs(15),
            "the rotated certificate was not served"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert!(
        client(&ca1, &proxy)
            .get(https(&proxy, "/v2/"))
            .send()
            .await
            .is_err()
    );

    // A broken rotation keeps the certificate in use.
    std::fs::write(certs.path().join("cert.pem"), "not a certificate").unwrap();
    tokio::time::sleep(Duration::from_secs(6)).await;
    assert_eq!(
        rotated
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
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_pullthrough"))
        .env("PULLTHROUGH_LISTEN", "127.0.0.1:0")
        .env("PULLTHROUGH_DATA_DIR", dir.path().join("cache"))
        .env("PULLTHROUGH_TLS_CERT", dir.path().join("cert.pem"))
        .env("PULLTHROUGH_TLS_KEY", dir.path().join("key.pem"))
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    let stderr = String::from_utf8(out.stderr).unwrap();
    assert_eq!(stderr.trim_end().lines().count(), 1, "{stderr}");
    assert!(stderr.contains("tls_cert"), "{stderr}");
    let only_cert = std::process::Command::new(env!("CARGO_BIN_EXE_pullthrough"))
        .env("PULLTHROUGH_LISTEN", "127.0.0.1:0")
        .env("PULLTHROUGH_TLS_CERT", dir.path().join("cert.pem"))
        .output()
        .unwrap();
    assert_eq!(only_cert.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&only_cert.stderr).contains("tls_key"));
}
