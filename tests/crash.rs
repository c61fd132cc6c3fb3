//! The real binary killed with SIGKILL in the middle of a blob download leaves nothing that is
//! served wrongly after a restart.

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::too_many_lines,
    reason = "a test panics on what it did not expect, and may read as one long story"
)]

mod support;

use bytes::Bytes;
use futures_util::StreamExt;
use std::time::Duration;
use support::binary::{Pullthrough, Running};
use support::hub::pattern;
use support::{FakeHub, Fault};

async fn start(upstream: &str, data: &std::path::Path) -> Running {
    Pullthrough::new()
        .upstream(upstream)
        .data_dir(data)
        .env("PULLTHROUGH_UPSTREAM_DEADLINE", "2s")
        .start()
        .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigkill_during_a_blob_write_leaves_nothing_served_wrongly() {
    let hub = FakeHub::start().await;
    let blob = Bytes::from(pattern("crash", 16 * 1024 * 1024));
    let digest = hub.push_blob("library/crash", blob.clone());
    hub.fault(Fault::SlowBlob(Duration::from_millis(5)));
    let data = tempfile::tempdir().unwrap();
    let path = format!("/v2/library/crash/blobs/{digest}");

    let client = support::client();
    let get = |binary: &Running| client.get(format!("{}{path}", binary.url)).send();
    let mut binary = start(&hub.url, data.path()).await;
    let response = get(&binary).await.unwrap();
    assert_eq!(response.status(), 200);
    let mut stream = response.bytes_stream();
    let mut got = 0;
    while got < 1024 * 1024 {
        got += stream.next().await.unwrap().unwrap().len();
    }
    binary.kill();
    // The client never receives the whole blob from the killed process.
    while let Some(Ok(chunk)) = stream.next().await {
        got += chunk.len();
    }
    assert!(got < blob.len(), "{got} of {} bytes", blob.len());

    // Restart with the upstream unreachable: the partial blob must not be served.
    let binary = start("http://127.0.0.1:9", data.path()).await;
    let r = get(&binary).await.unwrap();
    assert_ne!(r.status(), 200, "a partial download is never served");
    assert_eq!(
        std::fs::read_dir(data.path().join("tmp")).unwrap().count(),
        0,
        "leftover temp files were removed"
    );
    drop(binary);

    // With the upstream back, the blob is fetched whole and verified.
    hub.clear_faults();
    let binary = start(&hub.url, data.path()).await;
    let r = get(&binary).await.unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(r.bytes().await.unwrap(), blob);
}
