//! Slow and idle clients, against the settings `client_header_timeout`, `client_idle_timeout`
//! and `max_client_connections`, and against the process's file-descriptor limit. Raw TCP
//! connections stand in for slowloris clients.

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::too_many_lines,
    reason = "a test panics on what it did not expect, and may read as one long story"
)]

mod support;

use std::time::{Duration, Instant};
use support::binary::Pullthrough;
use support::{FakeHub, TestProxy, eventually};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

const LONG: Duration = Duration::from_secs(30);

fn addr(proxy: &TestProxy) -> &str {
    proxy.url.trim_start_matches("http://")
}

/// Reads until the server closes the connection (EOF or reset); what arrived, or `None` if it
/// is still open after `limit`.
async fn read_until_closed(stream: &mut TcpStream, limit: Duration) -> Option<Vec<u8>> {
    let mut got = Vec::new();
    let read = async {
        let mut buf = [0u8; 4096];
        loop {
            match stream.read(&mut buf).await {
                Ok(0) | Err(_) => return,
                Ok(n) => got.extend_from_slice(&buf[..n]),
            }
        }
    };
    tokio::time::timeout(limit, read).await.ok().map(|()| got)
}

/// Sends a complete `GET /v2/` and reads its answer (200, `{}`), leaving the connection open.
async fn one_request(stream: &mut TcpStream) {
    stream
        .write_all(b"GET /v2/ HTTP/1.1\r\nHost: x\r\n\r\n")
        .await
        .unwrap();
    let mut got = Vec::new();
    let mut buf = [0u8; 4096];
    while !(got.starts_with(b"HTTP/1.1 200") && got.ends_with(b"\r\n\r\n{}")) {
        let n = tokio::time::timeout(Duration::from_secs(5), stream.read(&mut buf))
            .await
            .expect("the request was answered")
            .unwrap();
        assert!(
            n > 0,
            "closed before answering: {:?}",
            String::from_utf8_lossy(&got)
        );
        got.extend_from_slice(&buf[..n]);
    }
}

#[tokio::test]
async fn a_client_that_never_finishes_its_request_head_is_disconnected() {
    let hub = FakeHub::start().await;
    let proxy = TestProxy::start_with(&hub, |c| {
        c.client_header_timeout = Duration::from_secs(1);
        c.client_idle_timeout = LONG;
    })
    .await;
    let mut stream = TcpStream::connect(addr(&proxy)).await.unwrap();
    stream
        .write_all(b"GET /v2/ HTTP/1.1\r\nHost: x\r\n")
        .await
        .unwrap();
    let started = Instant::now();
    let got = read_until_closed(&mut stream, Duration::from_secs(5))
        .await
        .expect("the connection was still open 5 s after a 1 s header timeout");
    assert!(
        got.is_empty() || got.starts_with(b"HTTP/1.1 408"),
        "after {:?}: {:?}",
        started.elapsed(),
        String::from_utf8_lossy(&got)
    );
}

#[tokio::test]
async fn an_idle_keep_alive_connection_is_closed() {
    let hub = FakeHub::start().await;
    let proxy = TestProxy::start_with(&hub, |c| {
        c.client_header_timeout = LONG;
        c.client_idle_timeout = Duration::from_secs(1);
    })
    .await;
    let mut stream = TcpStream::connect(addr(&proxy)).await.unwrap();
    one_request(&mut stream).await;
    let got = read_until_closed(&mut stream, Duration::from_secs(5))
        .await
        .expect("the idle connection was still open 5 s after a 1 s idle timeout");
    assert!(got.is_empty(), "{:?}", String::from_utf8_lossy(&got));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_connections_over_the_limit_do_not_lock_out_a_new_client() {
    tokio::time::timeout(Duration::from_secs(60), async {
        let hub = FakeHub::start().await;
        // Long timeouts: only the connection limit's handling can make room in time.
        let proxy = TestProxy::start_with(&hub, |c| {
            c.client_header_timeout = LONG;
            c.client_idle_timeout = LONG;
            c.max_client_connections = 20;
        })
        .await;
        let mut idle = Vec::new();
        for _ in 0..20 {
            let mut stream = TcpStream::connect(addr(&proxy)).await.unwrap();
            one_request(&mut stream).await;
            idle.push(stream);
        }
        for _ in 0..20 {
            idle.push(TcpStream::connect(addr(&proxy)).await.unwrap());
        }
        // No wait: the new client's connection queues behind the idle ones, so the server
        // reaches it only after handling all 40.

        let started = Instant::now();
        let r = tokio::time::timeout(
            Duration::from_secs(6),
            support::client().get(format!("{}/v2/", proxy.url)).send(),
        )
        .await
        .expect("a new client waited over 3 s behind 40 idle connections")
        .unwrap();
        assert_eq!(r.status(), 200, "after {:?}", started.elapsed());
        assert_eq!(r.bytes().await.unwrap(), "{}");
        drop(idle);
    })
    .await
    .expect("test hung");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn at_the_file_descriptor_limit_new_clients_are_still_answered() {
    // The binary under a 64-descriptor limit, with the connection cap far above it.
    let dir = tempfile::tempdir().unwrap();
    let running = Pullthrough::new()
        .fd_limit(64)
        .data_dir(dir.path().join("cache"))
        .env("PULLTHROUGH_CLIENT_HEADER_TIMEOUT", "30s")
        .env("PULLTHROUGH_CLIENT_IDLE_TIMEOUT", "30s")
        .start()
        .await;
    let addr = &running.addr;
    let outcome = tokio::time::timeout(LONG, async {
        // 100 idle connections: more than the process has descriptors for.
        let mut idle = Vec::new();
        for _ in 0..100 {
            idle.push(TcpStream::connect(addr).await.unwrap());
        }
        // No wait: the new client's connection queues behind the idle ones, so the process
        // reaches it only after running out of descriptors for them.
        let started = Instant::now();
        let r = support::client()
            .get(format!("http://{addr}/v2/"))
            .timeout(Duration::from_secs(6))
            .send()
            .await;
        let r = r.unwrap_or_else(|e| panic!("no answer after {:?}: {e}", started.elapsed()));
        assert_eq!(r.status(), 200);
        assert_eq!(r.text().await.unwrap(), "{}");
        drop(idle);
    })
    .await;
    drop(running);
    outcome.expect("test hung");
}

/// The open-file limits of process `pid`: soft, hard (`None`: unlimited).
fn open_file_limits(pid: u32) -> (Option<u64>, Option<u64>) {
    let limits = std::fs::read_to_string(format!("/proc/{pid}/limits")).unwrap();
    let line = limits
        .lines()
        .find(|l| l.starts_with("Max open files"))
        .unwrap();
    let fields: Vec<&str> = line.split_whitespace().collect();
    (fields[3].parse().ok(), fields[4].parse().ok())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_soft_open_file_limit_is_raised_to_the_hard_one() {
    // As systemd and containerd start a service: a low soft limit under a higher hard one.
    let running = Pullthrough::new().soft_fd_limit(256).start().await;
    let (soft, hard) = open_file_limits(running.pid());
    let wanted = hard.map_or(1 << 20, |h| h.min(1 << 20));
    assert!(
        wanted > 256,
        "the hard limit here is {hard:?}: nothing to raise"
    );
    assert_eq!(soft, Some(wanted), "soft limit raised to the hard one");
    let quiet = running.quiet_log(Duration::from_millis(300)).await;
    assert!(!quiet.contains("open-file limit"), "{quiet}");
    drop(running);

    // A hard limit below max_client_connections: one warning naming both.
    let mut running = Pullthrough::new().fd_limit(512).start().await;
    let line = running.line("open-file limit").await;
    assert!(line.contains("WARN"), "{line}");
    assert!(line.contains("open_file_limit=512"), "{line}");
    assert!(line.contains("max_client_connections=1024"), "{line}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_idle_timeout_never_cuts_a_slow_download_or_a_wait_for_upstream() {
    let hub = FakeHub::start().await;
    let blob = bytes::Bytes::from(support::hub::pattern("slow-but-alive", 1024 * 1024));
    let digest = hub.push_blob("library/alive", blob.clone());
    let image = support::Image::single(
        "alive",
        "application/vnd.docker.distribution.manifest.v2+json",
        10,
    );
    hub.push("library/alive", "1", &image);
    let proxy = TestProxy::start_with(&hub, |c| {
        c.client_idle_timeout = Duration::from_millis(500);
        c.upstream_deadline = Duration::from_secs(5);
    })
    .await;
    // Bytes keep moving (a 64 KiB chunk every 100 ms, 1.6 s in all): never idle.
    hub.fault(support::Fault::SlowBlob(Duration::from_millis(100)));
    let body = proxy
        .get(&format!("/v2/library/alive/blobs/{digest}"))
        .await
        .bytes()
        .await
        .unwrap();
    assert_eq!(body, blob);
    // No byte moves while upstream takes 1.5 s to answer, yet the answer arrives.
    hub.clear_faults();
    hub.fault(support::Fault::Delay(Duration::from_millis(1500)));
    assert_eq!(
        proxy.get_ok("/v2/library/alive/manifests/1").await,
        image.bytes
    );
}

#[tokio::test]
async fn the_header_timeout_holds_for_silent_clients_http2_and_kept_alive_connections() {
    let hub = FakeHub::start().await;
    let proxy = TestProxy::start_with(&hub, |c| {
        c.client_header_timeout = Duration::from_secs(1);
        c.client_idle_timeout = LONG;
    })
    .await;
    let preface: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";
    for (what, send) in [
        ("nothing", &b""[..]),
        ("the HTTP/2 preface line", &b"PRI * HTTP/2.0\r\n"[..]),
        ("the whole HTTP/2 preface", preface),
    ] {
        let mut stream = TcpStream::connect(addr(&proxy)).await.unwrap();
        stream.write_all(send).await.unwrap();
        let started = Instant::now();
        read_until_closed(&mut stream, Duration::from_secs(5))
            .await
            .unwrap_or_else(|| panic!("sending {what}: still open after {:?}", started.elapsed()));
    }
    // A kept-alive connection waiting for its next request head: the same timeout.
    let mut stream = TcpStream::connect(addr(&proxy)).await.unwrap();
    one_request(&mut stream).await;
    read_until_closed(&mut stream, Duration::from_secs(5))
        .await
        .expect("a kept-alive connection outlived the header timeout");
}

#[tokio::test]
async fn http2_with_prior_knowledge_is_served() {
    let hub = FakeHub::start().await;
    let image = support::Image::single(
        "h2",
        "application/vnd.docker.distribution.manifest.v2+json",
        10,
    );
    hub.push("library/h2", "1", &image);
    let proxy = TestProxy::start(&hub).await;
    let client = reqwest::Client::builder()
        .no_proxy()
        .http2_prior_knowledge()
        .build()
        .unwrap();
    let r = client
        .get(format!("{}/v2/library/h2/manifests/1", proxy.url))
        .send()
        .await
        .unwrap();
    assert_eq!(r.version(), reqwest::Version::HTTP_2);
    assert_eq!(r.status(), 200);
    assert_eq!(r.bytes().await.unwrap(), image.bytes);
}

/// The streams the server allows on one HTTP/2 connection (its SETTINGS_MAX_CONCURRENT_STREAMS).
const STREAM_CAP: usize = 100;

/// Descriptors of this process open on files under `dir`: the proxy's open blob files.
fn open_files_under(dir: &std::path::Path) -> usize {
    let dir = dir.canonicalize().unwrap();
    std::fs::read_dir("/proc/self/fd")
        .unwrap()
        .filter_map(|entry| std::fs::read_link(entry.ok()?.path()).ok())
        .filter(|target| target.starts_with(&dir))
        .count()
}

/// A 1 MiB blob (four of the server's read chunks) on a hub, behind a proxy whose
/// `client_idle_timeout` is 1 s: (hub, proxy, blob, blob path). The hub must outlive the proxy.
async fn blob_behind_proxy(
    tweak: impl FnOnce(&mut pullthrough::Config),
) -> (FakeHub, TestProxy, bytes::Bytes, String) {
    let hub = FakeHub::start().await;
    let blob = bytes::Bytes::from(support::hub::pattern("pinned", 1024 * 1024));
    let digest = hub.push_blob("library/pinned", blob.clone());
    let proxy = TestProxy::start_with(&hub, |c| {
        c.client_header_timeout = LONG;
        c.client_idle_timeout = Duration::from_secs(1);
        tweak(c);
    })
    .await;
    (
        hub,
        proxy,
        blob,
        format!("/v2/library/pinned/blobs/{digest}"),
    )
}

/// The flow-control attack over `io` (`uri` the blob's URL): SETTINGS_INITIAL_WINDOW_SIZE = 0, as
/// many streams for the blob as the server allows, never a WINDOW_UPDATE. Asserts the server
/// advertises [`STREAM_CAP`], that the streams hold the blob file open (one descriptor each),
/// and that after `client_idle_timeout` (1 s) the server closes the connection and the files.
async fn pin_streams<T>(io: T, uri: &str, data_dir: &std::path::Path)
where
    T: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    let baseline = open_files_under(data_dir);
    let (send, conn) = h2::client::Builder::new()
        .initial_window_size(0)
        .handshake::<_, bytes::Bytes>(io)
        .await
        .unwrap();
    let mut driver = tokio::spawn(conn);
    let request = |method: &str| {
        axum::http::Request::builder()
            .method(method)
            .uri(uri)
            .body(())
            .unwrap()
    };
    // A HEAD needs no window; its answer comes after the server's SETTINGS.
    let mut send = send.ready().await.unwrap();
    let (head, _) = send.send_request(request("HEAD"), true).unwrap();
    assert_eq!(head.await.unwrap().status(), 200);
    assert_eq!(
        send.current_max_send_streams(),
        STREAM_CAP,
        "the server's SETTINGS_MAX_CONCURRENT_STREAMS"
    );

    // Before the first GET: each stream's idle clock starts when its request arrives.
    let started = Instant::now();
    let mut answers = Vec::new();
    for _ in 0..STREAM_CAP {
        send = send.ready().await.unwrap();
        answers.push(send.send_request(request("GET"), true).unwrap().0);
    }
    let mut bodies = Vec::new();
    for answer in answers {
        let response = tokio::time::timeout(Duration::from_secs(10), answer)
            .await
            .expect("the response head arrives without any window")
            .unwrap();
        assert_eq!(response.status(), 200);
        bodies.push(response.into_body());
    }
    let pinned = open_files_under(data_dir);
    assert!(
        pinned >= baseline + STREAM_CAP,
        "each stream holds the blob file open: {pinned} open, {baseline} before"
    );

    // Ended either way: a clean close or a broken connection.
    let _ = tokio::time::timeout(Duration::from_secs(10), &mut driver)
        .await
        .expect("the connection was still open 10 s after a 1 s idle timeout")
        .unwrap();
    assert!(
        started.elapsed() >= Duration::from_millis(900),
        "closed before the idle timeout: {:?}",
        started.elapsed()
    );
    for mut body in bodies {
        let data = tokio::time::timeout(Duration::from_secs(1), body.data()).await;
        assert!(
            !matches!(data, Ok(Some(Ok(_))) | Err(_)),
            "a stream neither ended nor reset: {data:?}"
        );
    }
    let closed = eventually(Duration::from_secs(5), async || {
        open_files_under(data_dir) <= baseline
    })
    .await;
    assert!(
        closed,
        "{} blob files still open 5 s after the connection closed ({baseline} before)",
        open_files_under(data_dir)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http2_streams_with_no_window_are_capped_and_closed_after_the_idle_timeout() {
    let (_hub, proxy, blob, path) = blob_behind_proxy(|_| {}).await;
    assert_eq!(proxy.get_ok(&path).await, blob);
    let stream = TcpStream::connect(addr(&proxy)).await.unwrap();
    let uri = format!("{}{path}", proxy.url);
    tokio::time::timeout(
        Duration::from_secs(60),
        pin_streams(stream, &uri, &proxy.config.data_dir),
    )
    .await
    .expect("test hung");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http2_streams_with_no_window_over_tls_are_capped_and_closed_after_the_idle_timeout() {
    const NAME: &str = "pullthrough.test";
    let (ca, cert, key) = support::ca_and_certificate(NAME);
    let certs = tempfile::tempdir().unwrap();
    std::fs::write(certs.path().join("cert.pem"), cert).unwrap();
    std::fs::write(certs.path().join("key.pem"), key).unwrap();
    let (_hub, proxy, blob, path) = blob_behind_proxy(|c| {
        c.tls_cert = Some(certs.path().join("cert.pem"));
        c.tls_key = Some(certs.path().join("key.pem"));
    })
    .await;
    let port = proxy.url.rsplit(':').next().unwrap();
    let uri = format!("https://{NAME}:{port}{path}");
    let trusting = reqwest::Client::builder()
        .no_proxy()
        .tls_certs_only([reqwest::Certificate::from_pem(ca.as_bytes()).unwrap()])
        .resolve(NAME, addr(&proxy).parse().unwrap())
        .build()
        .unwrap();
    let cached = trusting.get(&uri).send().await.unwrap();
    assert_eq!(cached.bytes().await.unwrap(), blob);

    let mut roots = rustls::RootCertStore::empty();
    use rustls::pki_types::pem::PemObject as _;
    roots
        .add(rustls::pki_types::CertificateDer::from_pem_slice(ca.as_bytes()).unwrap())
        .unwrap();
    let provider = std::sync::Arc::new(rustls::crypto::aws_lc_rs::default_provider());
    let mut config = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots)
        .with_no_client_auth();
    config.alpn_protocols = vec![b"h2".to_vec()];
    let tcp = TcpStream::connect(addr(&proxy)).await.unwrap();
    let tls = tokio_rustls::TlsConnector::from(std::sync::Arc::new(config))
        .connect(NAME.try_into().unwrap(), tcp)
        .await
        .unwrap();
    assert_eq!(tls.get_ref().1.alpn_protocol(), Some(&b"h2"[..]));
    tokio::time::timeout(
        Duration::from_secs(60),
        pin_streams(tls, &uri, &proxy.config.data_dir),
    )
    .await
    .expect("test hung");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slowly_read_http2_stream_and_a_wait_for_upstream_outlive_the_idle_timeout() {
    let (hub, proxy, blob, path) =
        blob_behind_proxy(|c| c.upstream_deadline = Duration::from_secs(5)).await;
    assert_eq!(proxy.get_ok(&path).await, blob);
    let image = support::Image::single(
        "slow-h2",
        "application/vnd.docker.distribution.manifest.v2+json",
        10,
    );
    hub.push("library/slow", "1", &image);
    let stream = TcpStream::connect(addr(&proxy)).await.unwrap();
    let (send, conn) = h2::client::handshake(stream).await.unwrap();
    tokio::spawn(conn);
    let mut send = send.ready().await.unwrap();
    let get = |path: &str| {
        axum::http::Request::get(format!("{}{path}", proxy.url))
            .body(())
            .unwrap()
    };
    // About 160 KiB/s: a 256 KiB read chunk takes longer than the 1 s idle timeout to send,
    // yet bytes of the stream move every 100 ms.
    let (answer, _) = send.send_request(get(&path), true).unwrap();
    let mut body = answer.await.unwrap().into_body();
    let mut got = Vec::new();
    while let Some(data) = body.data().await {
        let data = data.expect("the slow stream was not cut");
        got.extend_from_slice(&data);
        // A slow reader on purpose.
        tokio::time::sleep(Duration::from_millis(100)).await;
        body.flow_control().release_capacity(data.len()).unwrap();
    }
    assert_eq!(got, blob);
    // No byte moves while upstream takes 1.5 s to answer, yet the answer arrives.
    hub.fault(support::Fault::Delay(Duration::from_millis(1500)));
    let mut send = send.ready().await.unwrap();
    let (answer, _) = send
        .send_request(get("/v2/library/slow/manifests/1"), true)
        .unwrap();
    let response = answer.await.unwrap();
    assert_eq!(response.status(), 200);
    let mut body = response.into_body();
    let mut got = Vec::new();
    while let Some(data) = body.data().await {
        let data = data.unwrap();
        got.extend_from_slice(&data);
        body.flow_control().release_capacity(data.len()).unwrap();
    }
    assert_eq!(got, image.bytes);
}
