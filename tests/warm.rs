//! `pullthrough warm` and `pullthrough healthcheck` against a running pullthrough: what warm-up
//! fetched, what it cost upstream, and that a second run costs nothing.

mod support;

use support::{FakeHub, Image, TestProxy};

const OCI_INDEX: &str = "application/vnd.oci.image.index.v1+json";
const OCI_MANIFEST: &str = "application/vnd.oci.image.manifest.v1+json";

async fn pullthrough(args: &[&str]) -> (bool, String) {
    let out = tokio::process::Command::new(env!("CARGO_BIN_EXE_pullthrough"))
        .args(args)
        .env("PULLTHROUGH_LISTEN", "127.0.0.1:1")
        .output()
        .await
        .unwrap();
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status.success(), text)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn warm_fetches_every_platform_once_and_reports_its_cost() {
    let hub = FakeHub::start().await;
    let app = Image::index(
        OCI_INDEX,
        vec![
            ("amd64", Image::single("warm-amd64", OCI_MANIFEST, 40_000)),
            ("arm64", Image::single("warm-arm64", OCI_MANIFEST, 50_000)),
        ],
    );
    hub.push("library/app", "1", &app);
    let tool = Image::index(
        OCI_INDEX,
        vec![
            ("amd64", Image::single("tool-amd64", OCI_MANIFEST, 1000)),
            ("arm64", Image::single("tool-arm64", OCI_MANIFEST, 2000)),
        ],
    );
    hub.push("team/tool", "v2", &tool);
    let proxy = TestProxy::start(&hub).await;
    let list = tempfile::NamedTempFile::new().unwrap();
    std::fs::write(
        list.path(),
        "# images for CI\nteam/tool:v2   # arm runners\n",
    )
    .unwrap();

    // app: all platforms; team/tool from the file, arm64 only.
    let (ok, out) = pullthrough(&["warm", "--url", &proxy.url, "app:1"]).await;
    assert!(ok, "{out}");
    assert!(
        out.contains("manifests 3 fetched upstream, 0 cached"),
        "{out}"
    );
    assert!(out.contains("blobs 4 fetched upstream"), "{out}");
    assert!(
        out.contains("upstream manifest GETs (Docker Hub pulls): 3"),
        "{out}"
    );
    assert_eq!(hub.count("manifest_get"), 3);
    assert_eq!(hub.count("blob_get"), 4);

    let file = list.path().to_str().unwrap();
    let (ok, out) = pullthrough(&[
        "warm",
        "--url",
        &proxy.url,
        "--file",
        file,
        "--platform",
        "linux/arm64",
    ])
    .await;
    assert!(ok, "{out}");
    assert!(out.contains("manifests 2 fetched upstream"), "{out}");
    assert!(out.contains("blobs 2 fetched upstream"), "{out}");
    assert_eq!(
        hub.count("blob_get"),
        6,
        "only the arm64 blobs of team/tool"
    );

    // Warm again: everything is cached, nothing is asked upstream.
    let (ok, out) = pullthrough(&["warm", "--url", &proxy.url, "app:1"]).await;
    assert!(ok, "{out}");
    assert!(
        out.contains("manifests 0 fetched upstream, 3 cached"),
        "{out}"
    );
    assert!(
        out.contains("upstream manifest GETs (Docker Hub pulls): 0"),
        "{out}"
    );
    assert_eq!(hub.count("manifest_get"), 5);
    // All platforms of team/tool: only the amd64 manifest and blobs are new.
    let (ok, out) = pullthrough(&["warm", "--url", &proxy.url, "team/tool:v2"]).await;
    assert!(ok, "{out}");
    assert!(
        out.contains("upstream manifest GETs (Docker Hub pulls): 1"),
        "{out}"
    );
    assert_eq!(hub.count("blob_get"), 6 + 2);

    // An image that does not exist fails the run, naming it.
    let (ok, out) = pullthrough(&["warm", "--url", &proxy.url, "nope:1"]).await;
    assert!(!ok);
    assert!(
        out.contains("nope:1 FAILED") && out.contains("404"),
        "{out}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn healthcheck_exits_0_when_ready_and_1_otherwise() {
    let hub = FakeHub::start().await;
    let proxy = TestProxy::start(&hub).await;
    let (ok, out) = pullthrough(&["healthcheck", "--url", &proxy.url]).await;
    assert!(ok, "{out}");
    let tmp = proxy.config.data_dir.join("tmp");
    std::fs::remove_dir_all(&tmp).unwrap();
    std::fs::write(&tmp, "not a directory").unwrap();
    let (ok, out) = pullthrough(&["healthcheck", "--url", &proxy.url]).await;
    assert!(!ok && out.contains("503"), "{out}");
    let (ok, out) = pullthrough(&["healthcheck"]).await;
    assert!(!ok && out.contains("not reachable"), "{out}");
}
