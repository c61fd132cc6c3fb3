//! The real binary killed with SIGKILL in the middle of a blob download leaves nothing that is
//! served wrongly after a restart.

mod support;

use bytes::Bytes;
use futures_util::StreamExt;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};
use support::hub::pattern;
use support::{FakeHub, Fault};

struct Binary(Child);

impl Drop for Binary {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

async fn start(upstream: &str, data: &std::path::Path) -> (Binary, String) {
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let child = Command::new(env!("CARGO_BIN_EXE_pullthrough"))
        .env("PULLTHROUGH_UPSTREAM", upstream)
        .env("PULLTHROUGH_DATA_DIR", data)
        .env("PULLTHROUGH_LISTEN", format!("127.0.0.1:{port}"))
        .env("PULLTHROUGH_UPSTREAM_DEADLINE", "2s")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let url = format!("http://127.0.0.1:{port}");
    let client = support::client();
    let deadline = Instant::now() + Duration::from_secs(10);
    while client.get(format!("{url}/v2/")).send().await.is_err() {
        assert!(Instant::now() < deadline, "pullthrough did not start");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    (Binary(child), url)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigkill_during_a_blob_write_leaves_nothing_served_wrongly() {
    let hub = FakeHub::start().await;
    let blob = Bytes::from(pattern("crash", 16 * 1024 * 1024));
    let digest = hub.push_blob("library/crash", blob.clone());
    hub.fault(Fault::SlowBlob(Duration::from_millis(5)));
    let data = tempfile::tempdir().unwrap();
    let path = format!("/v2/library/crash/blobs/{digest}");

    let (mut binary, url) = start(&hub.url, data.path()).await;
    let client = support::client();
    let response = client.get(format!("{url}{path}")).send().await.unwrap();
    assert_eq!(response.status(), 200);
    let mut stream = response.bytes_stream();
    let mut got = 0;
    while got < 1024 * 1024 {
        got += stream.next().await.unwrap().unwrap().len();
    }
    binary.0.kill().unwrap();
    binary.0.wait().unwrap();
    // The client never receives the whole blob from the killed process.
    while let Some(Ok(chunk)) = stream.next().await {
        got += chunk.len();
    }
    assert!(got < blob.len(), "{got} of {} bytes", blob.len());

    // Restart with the upstream unreachable: the partial blob must not be served.
    let (binary, url) = start("http://127.0.0.1:9", data.path()).await;
    let r = client.get(format!("{url}{path}")).send().await.unwrap();
    assert_ne!(r.status(), 200, "a partial download is never served");
    assert_eq!(
        std::fs::read_dir(data.path().join("tmp")).unwrap().count(),
        0,
        "leftover temp files were removed"
    );
    drop(binary);

    // With the upstream back, the blob is fetched whole and verified.
    hub.clear_faults();
    let (_binary, url) = start(&hub.url, data.path()).await;
    let r = client.get(format!("{url}{path}")).send().await.unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(r.bytes().await.unwrap(), blob);
}
