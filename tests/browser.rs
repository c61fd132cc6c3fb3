//! The status page in a real headless browser (Debian's `chromium`): it renders, and it shows
//! the values the stats endpoint reports. Ignored by a plain `cargo test` (it needs chromium);
//! `.ci/run` installs chromium and runs it with `--include-ignored`.

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::too_many_lines,
    reason = "a test panics on what it did not expect, and may read as one long story"
)]

mod support;

use std::process::Command;
use support::{FULL_ACCEPT, FakeHub, Image, TestProxy};

/// Headless chromium with the flags this machine's closed network needs.
fn chromium(profile: &std::path::Path, args: &[&str]) -> std::process::Output {
    Command::new("chromium")
        .args([
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-quic",
            "--no-first-run",
            "--disable-background-networking",
            "--disable-component-update",
            "--disable-sync",
            "--window-size=1200,900",
        ])
        .arg(format!("--user-data-dir={}", profile.display()))
        .args(args)
        .output()
        .expect("chromium is installed (apt-get install chromium)")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs chromium; .ci/run installs it"]
async fn the_status_page_renders_the_stats_in_a_browser() {
    let hub = FakeHub::start().await;
    hub.push(
        "library/shown",
        "1",
        &Image::single(
            "shown",
            "application/vnd.docker.distribution.manifest.v2+json",
            100,
        ),
    );
    let proxy = TestProxy::start(&hub).await;
    for _ in 0..5 {
        let r = proxy
            .request(
                reqwest::Method::GET,
                "/v2/library/shown/manifests/1",
                &[("accept", FULL_ACCEPT)],
            )
            .await;
        assert_eq!(r.status(), 200);
    }
    let stats: serde_json::Value = proxy.get("/_pullthrough/stats").await.json().await.unwrap();
    let pulls_saved = stats["counters"]["pulls_saved"].as_u64().unwrap();
    let ratio = stats["counters"]["requests"]["manifest"]["hit_ratio"]
        .as_f64()
        .unwrap();
    let remaining = stats["rate_limit"]["remaining"].as_u64().unwrap();

    let profile = tempfile::tempdir().unwrap();
    let url = format!("{}/", proxy.url);
    let (dom, shot) = {
        let profile = profile.path().to_owned();
        let url = url.clone();
        tokio::task::spawn_blocking(move || {
            let dom = chromium(&profile.join("a"), &["--dump-dom", &url]);
            let png = profile.join("page.png");
            let shot = chromium(
                &profile.join("b"),
                &[&format!("--screenshot={}", png.display()), &url],
            );
            assert!(
                shot.status.success(),
                "{}",
                String::from_utf8_lossy(&shot.stderr)
            );
            (dom, std::fs::read(png).unwrap_or_default())
        })
        .await
        .unwrap()
    };
    assert!(
        dom.status.success(),
        "{}",
        String::from_utf8_lossy(&dom.stderr)
    );
    let dom = String::from_utf8(dom.stdout).unwrap();
    // The rendered DOM shows what the stats endpoint reports.
    assert!(
        dom.contains(&format!("<b id=\"pulls-saved\">{pulls_saved}</b>")),
        "{dom}"
    );
    assert!(
        dom.contains(&format!("<b id=\"hit-ratio\">{:.1}%</b>", ratio * 100.0)),
        "{dom}"
    );
    assert!(
        dom.contains(&format!("<b id=\"budget\">{remaining} of 100</b>")),
        "{dom}"
    );
    assert!(dom.contains("library/shown:1"), "{dom}");
    // A real picture came out (a PNG, not an error page's few bytes).
    assert!(
        shot.starts_with(b"\x89PNG") && shot.len() > 10_000,
        "{} bytes",
        shot.len()
    );
}
