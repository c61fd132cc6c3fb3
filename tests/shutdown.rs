//! SIGTERM: pullthrough stops accepting, lets responses in progress finish (within
//! `shutdown_grace`), and exits 0; nothing partial is left in the store.

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::too_many_lines,
    reason = "a test panics on what it did not expect, and may read as one long story"
)]

mod support;

use bytes::Bytes;
use futures_util::StreamExt;
use std::time::{Duration, Instant};
use support::binary::Pullthrough;
use support::hub::pattern;
use support::{FakeHub, Fault, eventually};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_during_a_blob_pull_lets_it_finish_and_exits_0() {
    sigterm_during_a_blob_pull("work-stealing").await;
}

/// The same with a runtime per core (the default): the accepting worker stops, and the pull, on
/// whichever worker serves it, finishes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn per_core_sigterm_during_a_blob_pull_lets_it_finish_and_exits_0() {
    sigterm_during_a_blob_pull("per-core").await;
}

async fn sigterm_during_a_blob_pull(runtime: &str) {
    let hub = FakeHub::start().await;
    let blob = Bytes::from(pattern("drain", 1024 * 1024));
    let digest = hub.push_blob("library/drain", blob.clone());
    // 16 chunks of 64 KiB, one every 60 ms: about a second.
    hub.fault(Fault::SlowBlob(Duration::from_millis(60)));
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("cache");
    let mut running = Pullthrough::new()
        .upstream(&hub.url)
        .data_dir(&data)
        .env("PULLTHROUGH_SHUTDOWN_GRACE", "10s")
        .env("PULLTHROUGH_RUNTIME", runtime)
        .start()
        .await;
    let addr = running.addr.clone();
    let url = format!("http://{addr}/v2/library/drain/blobs/{digest}");
    // The pull is under way (its first bytes arrived) when SIGTERM comes.
    let r = support::client().get(url).send().await.unwrap();
    assert_eq!(r.status(), 200);
    let mut stream = r.bytes_stream();
    let first = stream.next().await.unwrap().unwrap();
    let pull = tokio::spawn(async move {
        let mut body = first.to_vec();
        while let Some(chunk) = stream.next().await {
            body.extend_from_slice(&chunk?);
        }
        Ok::<_, reqwest::Error>(Bytes::from(body))
    });
    running.terminate();
    let signalled = Instant::now();
    let body = pull
        .await
        .unwrap()
        .expect("the response in progress finished");
    assert_eq!(body, blob);

    // New connections are no longer accepted.
    let refused = eventually(Duration::from_secs(2), async || {
        support::client()
            .get(format!("http://{addr}/v2/"))
            .timeout(Duration::from_secs(2))
            .send()
            .await
            .is_err()
    })
    .await;
    assert!(refused, "still accepting after SIGTERM");

    let status = running.exit_status(Duration::from_secs(20)).await;
    assert_eq!(status.and_then(|s| s.code()), Some(0));
    assert!(
        signalled.elapsed() < Duration::from_secs(10),
        "exited within the grace period"
    );
    // tmp/ holds no part-file.
    let hex = digest.trim_start_matches("sha256:");
    let stored = data.join("blobs/sha256").join(&hex[..2]).join(hex);
    // The response completed, so the blob verified and was stored before the exit.
    assert_eq!(std::fs::read(&stored).unwrap(), blob);
    let leftovers = std::fs::read_dir(data.join("tmp")).map_or(0, |d| d.count());
    assert_eq!(leftovers, 0, "partial files left in tmp/");
}
