//! `runtime = "per-core"`: one listener whose connections are handed to a thread per core, each
//! with a current-thread runtime of its own, the one holding the fewest connections taking the
//! next. Through the binary: one listening socket, connections split evenly over the workers, a
//! miss shared by connections on different workers costs one upstream request, one client after
//! another wakes one worker, TLS, HTTP/2 and h2c work, and SIGTERM ends it with exit status 0.

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::too_many_lines,
    reason = "a test panics on what it did not expect, and may read as one long story"
)]

mod support;

use std::time::Duration;
use support::binary::{Pullthrough, Running};
use support::{DOCKER_MANIFEST, FakeHub, Fault, Image};

/// Worker threads pullthrough starts per core: one for each core this test may use.
fn cores() -> usize {
    std::thread::available_parallelism().map_or(1, usize::from)
}

/// The thread ids of `running`'s per-core workers, once there is one per core: their threads
/// start after the server says it listens.
async fn started_workers(running: &Running) -> Vec<String> {
    let all = support::eventually(Duration::from_secs(10), async || {
        workers(running).len() == cores()
    })
    .await;
    assert!(all, "a worker thread per core");
    workers(running)
}

/// The thread ids of `running`'s per-core workers, by their names.
fn workers(running: &Running) -> Vec<String> {
    let tasks = std::fs::read_dir(format!("/proc/{}/task", running.pid())).unwrap();
    tasks
        .map(|t| t.unwrap().path())
        .filter(|t| {
            std::fs::read_to_string(t.join("comm")).is_ok_and(|c| c.starts_with("per-core-"))
        })
        .map(|t| t.file_name().unwrap().to_string_lossy().into_owned())
        .collect()
}

/// The scheduler's statistics of the thread `tid` of `running`: nanoseconds on the CPU, and how
/// many times it has been run (woken or scheduled in).
fn schedstat(running: &Running, tid: &str) -> (u64, u64) {
    let stat =
        std::fs::read_to_string(format!("/proc/{}/task/{tid}/schedstat", running.pid())).unwrap();
    let fields: Vec<u64> = stat
        .split_whitespace()
        .map(|f| f.parse().unwrap())
        .collect();
    (fields[0], fields[2])
}

/// Nanoseconds the thread `tid` of `running` has run.
fn on_cpu(running: &Running, tid: &str) -> u64 {
    schedstat(running, tid).0
}

/// How many times the thread `tid` of `running` has been run.
fn runs(running: &Running, tid: &str) -> u64 {
    schedstat(running, tid).1
}

/// Which of `workers` serves `connection`: the one that runs for its requests (an idle one runs
/// a little now and then, for timers).
async fn serving_worker(
    running: &Running,
    workers: &[String],
    connection: &mut tokio::net::TcpStream,
) -> usize {
    let before: Vec<u64> = workers.iter().map(|w| on_cpu(running, w)).collect();
    for _ in 0..100 {
        ask_v2(connection).await;
    }
    let mut ran: Vec<(u64, usize)> = workers
        .iter()
        .zip(&before)
        .enumerate()
        .map(|(i, (w, b))| (on_cpu(running, w) - b, i))
        .collect();
    ran.sort_unstable();
    let (most, serving) = ran[ran.len() - 1];
    let next = ran.len().checked_sub(2).map_or(0, |i| ran[i].0);
    assert!(most >= 10 * next, "one worker serves it: {ran:?}");
    serving
}

/// The listening sockets `running` holds on `port`, from the kernel's table of TCP sockets
/// and the process's file descriptors.
fn listeners_on(running: &Running, port: u16) -> usize {
    let fds = std::fs::read_dir(format!("/proc/{}/fd", running.pid())).unwrap();
    let sockets: Vec<String> = fds
        .filter_map(|fd| std::fs::read_link(fd.unwrap().path()).ok())
        .filter_map(|l| {
            let l = l.to_string_lossy().into_owned();
            Some(l.strip_prefix("socket:[")?.strip_suffix(']')?.to_owned())
        })
        .collect();
    let table = std::fs::read_to_string(format!("/proc/{}/net/tcp", running.pid())).unwrap();
    let local = format!(":{port:04X}");
    table
        .lines()
        .skip(1)
        .map(|l| l.split_whitespace().collect::<Vec<_>>())
        // local address, state (0A: LISTEN), inode
        .filter(|f| f[1].ends_with(&local) && f[3] == "0A" && sockets.contains(&f[9].to_owned()))
        .count()
}

/// Asks for `/v2/` on `connection` and reads the whole answer, leaving the connection open.
async fn ask_v2(connection: &mut tokio::net::TcpStream) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    connection
        .write_all(b"GET /v2/ HTTP/1.1\r\nHost: pullthrough.test\r\n\r\n")
        .await
        .unwrap();
    let mut answer = Vec::new();
    loop {
        let mut chunk = [0; 4096];
        let n = connection.read(&mut chunk).await.unwrap();
        assert!(n > 0, "closed: {}", String::from_utf8_lossy(&answer));
        answer.extend_from_slice(&chunk[..n]);
        let text = String::from_utf8_lossy(&answer).into_owned();
        let Some((head, body)) = text.split_once("\r\n\r\n") else {
            continue;
        };
        assert!(head.starts_with("HTTP/1.1 200"), "{head}");
        let length: usize = head
            .lines()
            .find_map(|l| {
                l.to_ascii_lowercase()
                    .strip_prefix("content-length:")
                    .map(|v| v.trim().parse().unwrap())
            })
            .expect("a Content-Length");
        if body.len() >= length {
            return;
        }
    }
}

/// `n` clients at once, each on a connection of its own (every fourth over h2c), GET `url`;
/// their bodies.
async fn at_once(n: usize, url: &str) -> Vec<bytes::Bytes> {
    let tasks: Vec<_> = (0..n)
        .map(|i| {
            let url = url.to_owned();
            tokio::spawn(async move {
                let mut client = reqwest::Client::builder().no_proxy();
                if i % 4 == 3 {
                    client = client.http2_prior_knowledge();
                }
                let r = client.build().unwrap().get(url).send().await.unwrap();
                assert_eq!(r.status(), 200);
                r.bytes().await.unwrap()
            })
        })
        .collect();
    let mut bodies = Vec::new();
    for t in tasks {
        bodies.push(t.await.unwrap());
    }
    bodies
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn per_core_workers_share_the_port_and_a_miss_costs_one_upstream_request() {
    let hub = FakeHub::start().await;
    let image = Image::single("percore", DOCKER_MANIFEST, 512 * 1024);
    hub.push("library/percore", "1", &image);
    // Misses wait upstream, so that every client's request joins the first one's.
    hub.fault(Fault::Delay(Duration::from_millis(300)));
    let mut running = Pullthrough::new()
        .upstream(&hub.url)
        .env("PULLTHROUGH_RUNTIME", "per-core")
        .env("PULLTHROUGH_SHUTDOWN_GRACE", "10s")
        .start()
        .await;
    let port: u16 = running.addr.rsplit_once(':').unwrap().1.parse().unwrap();
    assert_eq!(listeners_on(&running, port), 1, "one listening socket");
    started_workers(&running).await;

    // 32 connections, spread over the workers. Each miss is one upstream GET.
    let manifest = format!("{}/v2/library/percore/manifests/1", running.url);
    for body in at_once(32, &manifest).await {
        assert_eq!(body, image.bytes);
    }
    assert_eq!(hub.count("manifest_get"), 1);
    for blob in &image.blobs {
        let url = format!(
            "{}/v2/library/percore/blobs/{}",
            running.url,
            support::hub::sha256(blob)
        );
        for body in at_once(32, &url).await {
            assert_eq!(&body, blob);
        }
    }
    assert_eq!(hub.count("blob_get"), image.blobs.len() as u64);
    running.terminate();
    let status = running.exit_status(Duration::from_secs(10)).await;
    assert_eq!(status.and_then(|s| s.code()), Some(0));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn per_core_hands_each_connection_to_the_worker_holding_the_fewest() {
    // Kept connections sit idle while others are measured: not for long enough to be closed.
    let running = Pullthrough::new()
        .env("PULLTHROUGH_RUNTIME", "per-core")
        .env("PULLTHROUGH_CLIENT_HEADER_TIMEOUT", "300s")
        .env("PULLTHROUGH_CLIENT_IDLE_TIMEOUT", "300s")
        .start()
        .await;
    let workers = started_workers(&running).await;
    let per_worker = 3;
    // Connections opened one after another and kept open: they go to the workers in turn.
    let addr: std::net::SocketAddr = running.addr.parse().unwrap();
    let mut connections = Vec::new();
    for _ in 0..per_worker * workers.len() {
        let mut connection = tokio::net::TcpStream::connect(addr).await.unwrap();
        ask_v2(&mut connection).await;
        connections.push(connection);
    }
    let mut held = vec![0; workers.len()];
    let mut owners = Vec::new();
    for connection in &mut connections {
        let owner = serving_worker(&running, &workers, connection).await;
        held[owner] += 1;
        owners.push(owner);
    }
    assert_eq!(
        held,
        vec![per_worker; workers.len()],
        "connections per worker"
    );

    // The first worker's connections close (the server's end too, before going on): the
    // next ones it is given all go to it.
    let first = owners[0];
    let mut kept = Vec::new();
    for (mut connection, owner) in connections.into_iter().zip(&owners) {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        if *owner != first {
            kept.push(connection);
            continue;
        }
        connection.shutdown().await.unwrap();
        let mut rest = Vec::new();
        connection.read_to_end(&mut rest).await.unwrap();
    }
    // The server counts a connection off after closing it.
    tokio::time::sleep(Duration::from_millis(500)).await;
    for _ in 0..per_worker {
        let mut connection = tokio::net::TcpStream::connect(addr).await.unwrap();
        ask_v2(&mut connection).await;
        assert_eq!(
            serving_worker(&running, &workers, &mut connection).await,
            first
        );
        kept.push(connection);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn per_core_wakes_one_worker_for_one_client_after_another() {
    let running = Pullthrough::new()
        .env("PULLTHROUGH_RUNTIME", "per-core")
        .start()
        .await;
    if cores() < 2 {
        return;
    }
    let workers = started_workers(&running).await;
    let addr: std::net::SocketAddr = running.addr.parse().unwrap();
    let before: Vec<u64> = workers.iter().map(|w| runs(&running, w)).collect();
    // One connection after another, each closed by the server (it saw the client's end)
    // before the next opens: the acceptor then holds none, so it serves them all, and no
    // other worker is woken for them.
    let connections = 200;
    for _ in 0..connections {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let mut connection = tokio::net::TcpStream::connect(addr).await.unwrap();
        ask_v2(&mut connection).await;
        connection.shutdown().await.unwrap();
        let mut rest = Vec::new();
        connection.read_to_end(&mut rest).await.unwrap();
    }
    let mut woken: Vec<u64> = workers
        .iter()
        .zip(&before)
        .map(|(w, b)| runs(&running, w) - b)
        .collect();
    woken.sort_unstable();
    // Each worker waiting on the listening socket would be woken for every connection.
    assert!(
        woken[woken.len() - 1] >= connections && woken[0] < connections / 4,
        "runs per worker for {connections} connections in turn: {woken:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn per_core_serves_tls_with_http2() {
    let hub = FakeHub::start().await;
    let image = Image::single("percore-tls", DOCKER_MANIFEST, 1000);
    hub.push("library/secure", "1", &image);
    let certs = tempfile::tempdir().unwrap();
    let (ca, cert, key) = support::ca_and_certificate("pullthrough.test");
    std::fs::write(certs.path().join("cert.pem"), cert).unwrap();
    std::fs::write(certs.path().join("key.pem"), key).unwrap();
    let running = Pullthrough::new()
        .upstream(&hub.url)
        .env("PULLTHROUGH_RUNTIME", "per-core")
        .env("PULLTHROUGH_TLS_CERT", certs.path().join("cert.pem"))
        .env("PULLTHROUGH_TLS_KEY", certs.path().join("key.pem"))
        .start()
        .await;
    assert!(running.url.starts_with("https://"), "{}", running.url);
    let addr: std::net::SocketAddr = running.addr.parse().unwrap();
    for _ in 0..8 {
        // A connection each (no pool), so both workers serve some.
        let client = reqwest::Client::builder()
            .no_proxy()
            .tls_certs_only([reqwest::Certificate::from_pem(ca.as_bytes()).unwrap()])
            .resolve("pullthrough.test", addr)
            .pool_max_idle_per_host(0)
            .build()
            .unwrap();
        let url = format!(
            "https://pullthrough.test:{}/v2/library/secure/manifests/1",
            addr.port()
        );
        let r = client.get(url).send().await.unwrap();
        assert_eq!(r.status(), 200);
        assert_eq!(r.version(), reqwest::Version::HTTP_2, "ALPN chose h2");
        assert_eq!(r.bytes().await.unwrap(), image.bytes);
    }
    assert_eq!(hub.count("manifest_get"), 1);
}

#[test]
fn a_bad_runtime_stops_startup_with_one_line_naming_both_values() {
    let out = Pullthrough::new()
        .env("PULLTHROUGH_RUNTIME", "threads")
        .output();
    assert_eq!(out.status.code(), Some(2));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(stderr.lines().count(), 1, "{stderr}");
    for word in [
        "runtime",
        "PULLTHROUGH_RUNTIME",
        "per-core",
        "work-stealing",
    ] {
        assert!(stderr.contains(word), "{word}: {stderr}");
    }
}
