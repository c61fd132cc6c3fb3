//! Attacks from the client side that need no new settings: a small range of a large blob asked
//! for while the blob is still downloading must not wait for the whole download.

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
use support::hub::pattern;
use support::{FakeHub, Fault, TestProxy};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_small_range_of_a_blob_being_downloaded_is_answered_at_once() {
    tokio::time::timeout(Duration::from_secs(60), async {
        const SIZE: usize = 64 * 1024 * 1024;
        let hub = FakeHub::start().await;
        let blob = Bytes::from(pattern("range-while-downloading", SIZE));
        let digest = hub.push_blob("acme/big", blob.clone());
        // One 64 KiB chunk every 15.625 ms: 4 MiB/s, 16 s for the whole blob.
        hub.fault(Fault::SlowBlob(Duration::from_micros(15_625)));
        let proxy = TestProxy::start(&hub).await;
        let path = format!("/v2/acme/big/blobs/{digest}");

        let full = proxy.get(&path).await;
        assert_eq!(full.status(), 200);
        let mut full = full.bytes_stream();
        full.next().await.unwrap().unwrap();

        let started = Instant::now();
        let r = proxy
            .request(reqwest::Method::GET, &path, &[("range", "bytes=0-1023")])
            .await;
        let status = r.status();
        let headers = r.headers().clone();
        let body = r.bytes().await.unwrap();
        let elapsed = started.elapsed();
        assert_eq!(status, 206, "after {elapsed:?}");
        assert_eq!(
            headers["content-range"],
            format!("bytes 0-1023/{SIZE}").as_str()
        );
        assert_eq!(headers["content-length"], "1024");
        assert_eq!(body, blob.slice(..1024));
        // The whole blob takes 16 s: an answer within 6 s did not wait for it.
        assert!(elapsed < Duration::from_secs(6), "took {elapsed:?}");
    })
    .await
    .expect("test hung");
}
