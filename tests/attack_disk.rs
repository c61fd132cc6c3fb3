//! Attacks from the disk's side: stored blobs damaged behind pullthrough's back (wrong size,
//! changed bytes), the data directory removed while running, a filesystem short of space, and
//! a full disk during a download. What is damaged is dropped and fetched again; nothing wrong
//! is ever served whole.

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::too_many_lines,
    reason = "a test panics on what it did not expect, and may read as one long story"
)]

mod support;

use bytes::Bytes;
use bytesize::ByteSize;
use std::path::{Path, PathBuf};
use std::time::Duration;
use support::hub::pattern;
use support::{FakeHub, TestProxy, eventually};

const REPO: &str = "library/disk";

fn stored_file(proxy: &TestProxy, digest: &str) -> PathBuf {
    let hex = digest.trim_start_matches("sha256:");
    proxy
        .config
        .data_dir
        .join("blobs/sha256")
        .join(&hex[..2])
        .join(hex)
}

/// Pulls a blob, checks it, and waits until it is in the store.
async fn pull(proxy: &TestProxy, digest: &str, blob: &Bytes, cache: &str) {
    let r = proxy.get(&format!("/v2/{REPO}/blobs/{digest}")).await;
    assert_eq!(r.status(), 200);
    assert_eq!(r.headers()["x-cache"], cache);
    assert_eq!(r.bytes().await.unwrap(), *blob);
    let done = eventually(Duration::from_secs(10), async || {
        stored_file(proxy, digest).exists()
    })
    .await;
    assert!(done, "never: the blob is stored");
}

/// A GET whose body is either refused, cut short, or must not be the `bad` bytes.
async fn assert_not_served_whole(proxy: &TestProxy, digest: &str, len: usize) {
    let r = proxy.get(&format!("/v2/{REPO}/blobs/{digest}")).await;
    if r.status() == 200 {
        let body = r.bytes().await;
        assert!(
            body.as_ref().map_or(true, |b| b.len() < len),
            "a damaged blob was served whole"
        );
    }
}

fn flip_a_byte(path: &Path) {
    let mut data = std::fs::read(path).unwrap();
    let mid = data.len() / 2;
    data[mid] ^= 0x55;
    std::fs::write(path, data).unwrap();
}

#[tokio::test]
async fn a_stored_blob_of_the_wrong_size_is_dropped_and_fetched_again_at_once() {
    let hub = FakeHub::start().await;
    let blob = Bytes::from(pattern("size", 300_000));
    let digest = hub.push_blob(REPO, blob.clone());
    let proxy = TestProxy::start(&hub).await;
    pull(&proxy, &digest, &blob, "MISS").await;

    // Truncated: the next request is a whole, right answer (fetched again), not an abort.
    let file = stored_file(&proxy, &digest);
    std::fs::write(&file, &blob[..1000]).unwrap();
    pull(&proxy, &digest, &blob, "MISS").await;
    assert_eq!(hub.count("blob_get"), 2);
    assert_eq!(
        std::fs::read(&file).unwrap(),
        blob,
        "the store holds it again"
    );

    // Grown: the same.
    let mut longer = blob.to_vec();
    longer.extend_from_slice(b"junk");
    std::fs::write(&file, longer).unwrap();
    pull(&proxy, &digest, &blob, "MISS").await;
    assert_eq!(hub.count("blob_get"), 3);
    pull(&proxy, &digest, &blob, "HIT").await;
    assert_eq!(hub.count("blob_get"), 3);
}

#[tokio::test]
async fn with_verify_on_serve_a_changed_byte_is_never_served_whole() {
    let hub = FakeHub::start().await;
    let blob = Bytes::from(pattern("flip", 2 * 1024 * 1024));
    let digest = hub.push_blob(REPO, blob.clone());
    let proxy = TestProxy::start_with(&hub, |c| c.verify_on_serve = true).await;
    pull(&proxy, &digest, &blob, "MISS").await;
    pull(&proxy, &digest, &blob, "HIT").await;

    let file = stored_file(&proxy, &digest);
    flip_a_byte(&file);
    assert_not_served_whole(&proxy, &digest, blob.len()).await;
    // The damaged blob was dropped: the next request fetches it again.
    let done = eventually(Duration::from_secs(10), async || !file.exists()).await;
    assert!(done, "never: the damaged blob is dropped");
    pull(&proxy, &digest, &blob, "MISS").await;
    assert_eq!(hub.count("blob_get"), 2);

    // A range of a damaged blob is refused too (the whole file is hashed first).
    flip_a_byte(&file);
    let r = proxy
        .request(
            reqwest::Method::GET,
            &format!("/v2/{REPO}/blobs/{digest}"),
            &[("range", "bytes=0-99")],
        )
        .await;
    assert_eq!(r.status(), 206);
    assert_eq!(r.headers()["x-cache"], "MISS", "fetched again, not served");
    assert_eq!(r.bytes().await.unwrap(), blob.slice(..100));
}

#[tokio::test]
async fn the_scrub_drops_a_blob_whose_bytes_changed() {
    let hub = FakeHub::start().await;
    let blob = Bytes::from(pattern("scrub", 500_000));
    let digest = hub.push_blob(REPO, blob.clone());
    let proxy = TestProxy::start_with(&hub, |c| {
        c.scrub_interval = Duration::from_millis(200);
        c.scrub_rate = ByteSize::mib(64);
    })
    .await;
    pull(&proxy, &digest, &blob, "MISS").await;
    let file = stored_file(&proxy, &digest);
    flip_a_byte(&file);
    let done = eventually(Duration::from_secs(10), async || !file.exists()).await;
    assert!(done, "never: the scrub drops the changed blob");
    pull(&proxy, &digest, &blob, "MISS").await;
    assert_eq!(hub.count("blob_get"), 2);
}

#[tokio::test]
async fn a_data_dir_removed_while_running_is_recreated_on_demand() {
    let hub = FakeHub::start().await;
    let blob = Bytes::from(pattern("gone", 200_000));
    let digest = hub.push_blob(REPO, blob.clone());
    let image = support::Image::single(
        "gone",
        "application/vnd.docker.distribution.manifest.v2+json",
        1000,
    );
    hub.push(REPO, "1", &image);
    let second = support::Image::single("gone2", &image.media_type, 1000);
    hub.push(REPO, "2", &second);
    let proxy = TestProxy::start(&hub).await;
    pull(&proxy, &digest, &blob, "MISS").await;
    assert_eq!(
        proxy.get_ok(&format!("/v2/{REPO}/manifests/1")).await,
        image.bytes
    );

    // Manifests are written behind their responses: a write may land while the directory goes.
    let mut error = None;
    let removed = eventually(Duration::from_secs(1), async || {
        let removal = std::fs::remove_dir_all(&proxy.config.data_dir);
        error = removal.err();
        error.is_none()
    })
    .await;
    assert!(removed, "cannot remove the data dir: {error:?}");
    pull(&proxy, &digest, &blob, "MISS").await;
    assert_eq!(hub.count("blob_get"), 2);
    assert_eq!(
        proxy.get_ok(&format!("/v2/{REPO}/manifests/2")).await,
        second.bytes
    );
    assert!(proxy.config.data_dir.join(".pullthrough-cache").is_file());
    // The first manifest is still served from memory, exactly.
    assert_eq!(
        proxy.get_ok(&format!("/v2/{REPO}/manifests/1")).await,
        image.bytes
    );
}

#[tokio::test]
async fn eviction_keeps_the_minimum_free_space() {
    let hub = FakeHub::start().await;
    let blob = Bytes::from(pattern("free", 300_000));
    let digest = hub.push_blob(REPO, blob.clone());
    // More free space than any disk has: every stored blob that is not being read must go.
    let proxy = TestProxy::start_with(&hub, |c| c.cache_min_free_disk = ByteSize::pib(1)).await;
    let r = proxy.get(&format!("/v2/{REPO}/blobs/{digest}")).await;
    assert_eq!(
        r.bytes().await.unwrap(),
        blob,
        "the download itself is served whole"
    );
    let file = stored_file(&proxy, &digest);
    let done = eventually(Duration::from_secs(10), async || !file.exists()).await;
    assert!(done, "never: the blob is evicted for free space");
    let r = proxy.get(&format!("/v2/{REPO}/blobs/{digest}")).await;
    assert_eq!(r.headers()["x-cache"], "MISS");
    assert_eq!(r.bytes().await.unwrap(), blob);
    assert_eq!(hub.count("blob_get"), 2);
}

/// A small tmpfs, unmounted on drop.
struct Tmpfs {
    path: PathBuf,
    _dir: tempfile::TempDir,
}

impl Tmpfs {
    fn mount(size: &str) -> Option<Tmpfs> {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("fs");
        std::fs::create_dir(&path).unwrap();
        let mounted = std::process::Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={size}"), "tmpfs"])
            .arg(&path)
            .output()
            .is_ok_and(|o| o.status.success());
        mounted.then_some(Tmpfs { path, _dir: dir })
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = std::process::Command::new("umount")
            .arg("-l")
            .arg(&self.path)
            .status();
    }
}

#[tokio::test]
async fn a_full_disk_during_a_download_evicts_and_retries() {
    let Some(fs) = Tmpfs::mount("8m") else {
        // Mounting needs root: CI runs as root, so there this must not be skipped.
        assert!(
            std::env::var_os("CI").is_none(),
            "cannot mount a tmpfs in CI"
        );
        eprintln!("SKIPPED: cannot mount a tmpfs here (not root)");
        return;
    };
    let hub = FakeHub::start().await;
    let first = Bytes::from(pattern("enospc-a", 5 * 1024 * 1024));
    let second = Bytes::from(pattern("enospc-b", 5 * 1024 * 1024));
    let a = hub.push_blob(REPO, first.clone());
    let b = hub.push_blob(REPO, second.clone());
    let mut config = TestProxy::config(&hub.url, &fs.path.join("cache"));
    config.cache_max_disk = ByteSize::gib(1);
    let proxy = TestProxy::start_config(config, None).await;
    pull(&proxy, &a, &first, "MISS").await;
    // The second blob does not fit beside the first: the full disk evicts the first.
    pull(&proxy, &b, &second, "MISS").await;
    assert_eq!(
        hub.count("blob_get"),
        2,
        "the second download was not restarted"
    );
    assert!(
        !stored_file(&proxy, &a).exists(),
        "the first blob made room"
    );
    pull(&proxy, &b, &second, "HIT").await;
    proxy.stop().await;
}
