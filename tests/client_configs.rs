//! The client configurations in `config/clients/`, checked by the programs that read them:
//! every Kubernetes manifest in the repository against the Kubernetes API schemas
//! (`kubernetes-validate`, from PyPI), the DaemonSet's cache set-up run as the kubelet would run
//! it, and the CRI-O drop-in parsed by podman and followed by skopeo (containers/image, CRI-O's
//! registry client). Ignored by a plain `cargo test` (they need those programs, and root);
//! `.ci/run` installs them and runs these with `--include-ignored`.

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::too_many_lines,
    reason = "a test panics on what it did not expect, and may read as one long story"
)]

mod support;

use std::io::Read;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};
use support::{DOCKER_MANIFEST, FakeHub, Image, Process, TestProxy, free_port};

/// The Kubernetes versions the manifests are validated against: the newest that the pinned
/// kubernetes-validate (1.37.0, see `.ci/run`) ships schemas for, and one two minors older, as
/// clusters lag behind.
const KUBERNETES_VERSIONS: [&str; 2] = ["1.35.0", "1.37.0"];

fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// `kubernetes-validate`'s venv (`.ci/run` makes it), or `$KUBERNETES_VALIDATE_VENV`.
fn venv() -> PathBuf {
    let venv = std::env::var_os("KUBERNETES_VALIDATE_VENV")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("/opt/pullthrough-kubernetes-validate"));
    assert!(
        venv.join("bin/kubernetes-validate").exists(),
        "no kubernetes-validate in {}: .ci/run installs it (pip install kubernetes-validate)",
        venv.display()
    );
    venv
}

fn output(cmd: &mut Command) -> Output {
    cmd.output().unwrap_or_else(|e| panic!("{cmd:?}: {e}"))
}

fn run(cmd: &mut Command) -> Vec<u8> {
    let out = output(cmd);
    assert!(
        out.status.success(),
        "{cmd:?} failed: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    out.stdout
}

/// Every YAML file under `dir`, outside build output and version control.
fn yaml_files(dir: &Path, found: &mut Vec<PathBuf>) {
    let entries = std::fs::read_dir(dir).unwrap_or_else(|e| panic!("{}: {e}", dir.display()));
    for path in entries.flatten().map(|entry| entry.path()) {
        let name = path
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default();
        if path.is_dir() {
            if name != "target" && name != ".git" {
                yaml_files(&path, found);
            }
        } else if name.ends_with(".yaml") || name.ends_with(".yml") {
            found.push(path);
        }
    }
}

/// A Kubernetes manifest, by its top-level `apiVersion` and `kind` (compose files and the
/// reference registry's configuration have neither).
fn is_kubernetes(text: &str) -> bool {
    text.lines().any(|l| l.starts_with("apiVersion:"))
        && text.lines().any(|l| l.starts_with("kind:"))
}

/// Runs the validator, strictly (unknown fields are errors), against every version in
/// [`KUBERNETES_VERSIONS`]; Ok with its report when every resource passed, Err otherwise. A
/// resource of a kind it has no schema for is only a warning to it, and a failure here.
fn validate(files: &[PathBuf]) -> Result<String, String> {
    let mut cmd = Command::new(venv().join("bin/kubernetes-validate"));
    cmd.arg("--strict");
    for version in KUBERNETES_VERSIONS {
        cmd.args(["--kubernetes-version", version]);
    }
    let out = output(cmd.args(files));
    let report = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    let all_passed = report
        .lines()
        .filter(|l| !l.trim().is_empty())
        .all(|l| l.starts_with("INFO ") && l.contains(" passed for resource "));
    if out.status.success() && all_passed {
        Ok(report)
    } else {
        Err(report)
    }
}

#[test]
#[ignore = "needs kubernetes-validate from PyPI (run by .ci/run)"]
fn every_kubernetes_manifest_validates_against_the_kubernetes_schemas() {
    let mut files = Vec::new();
    yaml_files(&repo(), &mut files);
    files.sort();
    let manifests: Vec<PathBuf> = files
        .into_iter()
        .filter(|f| {
            let text = std::fs::read_to_string(f).unwrap();
            // Everything in config/clients/ is a manifest: one that stopped looking like one
            // (a misspelt apiVersion) fails here rather than going unchecked.
            f.starts_with(repo().join("config/clients")) || is_kubernetes(&text)
        })
        .collect();
    assert!(
        manifests.contains(&repo().join("config/clients/kubernetes.yaml")),
        "{manifests:?}"
    );
    let report = validate(&manifests).unwrap_or_else(|report| panic!("{report}"));
    for file in &manifests {
        let text = std::fs::read_to_string(file).unwrap();
        let resources = text
            .split("\n---")
            .filter(|doc| doc.lines().any(|l| l.starts_with("kind:")))
            .count();
        let passed = report
            .lines()
            .filter(|l| l.starts_with(&format!("INFO {} passed", file.display())))
            .count();
        assert_eq!(
            passed,
            resources * KUBERNETES_VERSIONS.len(),
            "every resource in {} passed against every version:\n{report}",
            file.display()
        );
    }

    // The check can fail: a misspelt field, a wrong type and an unknown kind are each refused.
    let dir = tempfile::tempdir().unwrap();
    let original = std::fs::read_to_string(repo().join("config/clients/kubernetes.yaml")).unwrap();
    for (name, from, to) in [
        ("field", "hostPath: {path:", "hostPth: {path:"),
        ("type", "periodSeconds: 10", "periodSeconds: ten"),
        ("kind", "kind: DaemonSet", "kind: DaemonSett"),
    ] {
        assert!(original.contains(from), "{from}");
        let broken = dir.path().join(format!("{name}.yaml"));
        std::fs::write(&broken, original.replacen(from, to, 1)).unwrap();
        assert!(
            validate(&[broken]).is_err(),
            "a manifest with a broken {name} passed"
        );
    }
}

/// The resources in a YAML file, as JSON (by the validator's own PyYAML).
fn yaml_documents(file: &Path) -> Vec<serde_json::Value> {
    let json = run(Command::new(venv().join("bin/python"))
        .args([
            "-c",
            "import json, sys, yaml; print(json.dumps([d for d in yaml.safe_load_all(open(sys.argv[1])) if d]))",
        ])
        .arg(file));
    serde_json::from_slice(&json).unwrap_or_else(|e| panic!("{}: {e}", file.display()))
}

fn str_of(value: &serde_json::Value) -> &str {
    value
        .as_str()
        .unwrap_or_else(|| panic!("a string: {value}"))
}

/// `command` as a container of the pod would run it: as `user`, with only the capabilities in
/// `container`'s securityContext (all of them dropped, then those added), no privilege
/// escalation, and the container's mount path `mount` standing for `host_dir`.
fn as_container(
    container: &serde_json::Value,
    user: (u64, u64),
    mount: &str,
    host_dir: &Path,
    program: &Path,
    args: &[String],
) -> Command {
    let security = &container["securityContext"];
    assert_eq!(security["allowPrivilegeEscalation"], false, "{container}");
    assert_eq!(
        security["capabilities"]["drop"],
        serde_json::json!(["ALL"]),
        "{container}"
    );
    let mut bounding = "-all".to_owned();
    for cap in security["capabilities"]["add"]
        .as_array()
        .into_iter()
        .flatten()
    {
        bounding.push_str(&format!(",+{}", str_of(cap).to_lowercase()));
    }
    let host_dir = host_dir.to_string_lossy();
    let mut cmd = Command::new("setpriv");
    cmd.arg(format!("--reuid={}", user.0))
        .arg(format!("--regid={}", user.1))
        .args(["--clear-groups", "--inh-caps=-all", "--no-new-privs"])
        .arg(format!("--bounding-set={bounding}"))
        .arg("--")
        .arg(program)
        .args(args.iter().map(|a| a.replace(mount, &host_dir)))
        .env_clear()
        .env("PATH", "/usr/sbin:/usr/bin:/sbin:/bin");
    cmd
}

/// Waits for pullthrough's /healthz, or for it to exit (Err with its exit status).
async fn healthy(process: &mut Process, url: &str) -> Result<(), String> {
    let client = support::client();
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        match process.0.try_wait() {
            Ok(Some(status)) => return Err(format!("pullthrough exited: {status}")),
            Ok(None) => {}
            Err(e) => return Err(format!("pullthrough: {e}")),
        }
        let response = client.get(format!("{url}/healthz")).send().await;
        if response.is_ok_and(|r| r.status() == 200) {
            return Ok(());
        }
        assert!(Instant::now() < deadline, "pullthrough did not come up");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// The container's mount path of the pod's hostPath `volume`.
fn mount_of(container: &serde_json::Value, volume: &serde_json::Value) -> String {
    container["volumeMounts"]
        .as_array()
        .into_iter()
        .flatten()
        .find(|m| m["name"] == volume["name"])
        .map(|m| str_of(&m["mountPath"]).to_owned())
        .unwrap_or_else(|| panic!("{container} mounts {}", volume["name"]))
}

/// Runs the pod's init containers, in order, on `host_dir`.
fn run_init_containers(
    pod: &serde_json::Value,
    volume: &serde_json::Value,
    user: (u64, u64),
    host_dir: &Path,
) {
    let inits = pod["initContainers"]
        .as_array()
        .unwrap_or_else(|| panic!("init containers: {pod}"));
    for init in inits {
        let security = &init["securityContext"];
        let init_user = (
            security["runAsUser"].as_u64().unwrap_or(user.0),
            security["runAsGroup"].as_u64().unwrap_or(user.1),
        );
        let words: Vec<String> = init["command"]
            .as_array()
            .into_iter()
            .flatten()
            .chain(init["args"].as_array().into_iter().flatten())
            .map(|w| str_of(w).to_owned())
            .collect();
        let (program, args) = words
            .split_first()
            .unwrap_or_else(|| panic!("a command: {init}"));
        run(&mut as_container(
            init,
            init_user,
            &mount_of(init, volume),
            host_dir,
            Path::new(program),
            args,
        ));
    }
}

/// pullthrough as the pod's container would run (its user, environment and capabilities), on
/// `host_dir`, listening on a free loopback port instead of 5000: (process, its URL).
fn start_pullthrough(
    container: &serde_json::Value,
    volume: &serde_json::Value,
    user: (u64, u64),
    host_dir: &Path,
    binary: &Path,
) -> (Process, String) {
    let mount = mount_of(container, volume);
    let port = free_port();
    let mut cmd = as_container(container, user, &mount, host_dir, binary, &[]);
    for var in container["env"].as_array().into_iter().flatten() {
        let name = str_of(&var["name"]);
        let value = match name {
            "PULLTHROUGH_LISTEN" => format!("127.0.0.1:{port}"),
            _ => str_of(&var["value"]).replace(&mount, &host_dir.to_string_lossy()),
        };
        cmd.env(name, value);
    }
    // Its logs are not read; a startup failure's one line on stderr is.
    let child = cmd
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("{cmd:?}: {e}"));
    (Process(child), format!("http://127.0.0.1:{port}"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs root, setpriv and kubernetes-validate's PyYAML (run by .ci/run)"]
async fn the_daemonset_runs_pullthrough_as_its_user_on_a_fresh_host_path() {
    let documents = yaml_documents(&repo().join("config/clients/kubernetes.yaml"));
    let daemonset = documents
        .iter()
        .find(|d| d["kind"] == "DaemonSet")
        .expect("a DaemonSet");
    let pod = &daemonset["spec"]["template"]["spec"];
    let user = (
        pod["securityContext"]["runAsUser"].as_u64().unwrap(),
        pod["securityContext"]["runAsGroup"].as_u64().unwrap(),
    );
    assert_ne!(user.0, 0, "pullthrough does not run as root");
    let volume = pod["volumes"]
        .as_array()
        .unwrap()
        .iter()
        .find(|v| v["hostPath"].is_object())
        .expect("a hostPath volume");
    assert_eq!(volume["hostPath"]["type"], "DirectoryOrCreate");
    let container = &pod["containers"][0];
    assert!(
        container["command"].is_null() && container["args"].is_null(),
        "pullthrough runs as the image's entrypoint, with no arguments"
    );

    // The kubelet's DirectoryOrCreate: a new directory owned by root, mode 0755. uid 10001 has
    // to reach it, and to run a copy of pullthrough's binary.
    let root = tempfile::tempdir().unwrap();
    std::fs::set_permissions(root.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    let host_dir = root.path().join("var-lib-pullthrough");
    std::fs::create_dir(&host_dir).unwrap();
    std::fs::set_permissions(&host_dir, std::fs::Permissions::from_mode(0o755)).unwrap();
    let binary = root.path().join("pullthrough");
    std::fs::copy(env!("CARGO_BIN_EXE_pullthrough"), &binary).unwrap();

    // Without the init containers, pullthrough cannot use the directory: the pod of the issue.
    let (mut bare, url) = start_pullthrough(container, volume, user, &host_dir, &binary);
    let exited = healthy(&mut bare, &url).await;
    assert_eq!(
        exited,
        Err("pullthrough exited: exit status: 2".to_owned()),
        "pullthrough ran as {user:?} on a root-owned 0755 directory"
    );
    let mut said = String::new();
    bare.0
        .stderr
        .take()
        .unwrap()
        .read_to_string(&mut said)
        .unwrap();
    assert_eq!(said.lines().count(), 1, "one line: {said}");
    assert_eq!(
        said.to_lowercase().matches("permission denied").count(),
        1,
        "says permission denied once: {said}"
    );
    assert!(said.contains("data_dir"), "names the setting: {said}");
    drop(bare);

    // The pod's start, twice (the second on a directory the first has already handed over):
    // the init containers, then pullthrough, which comes up and writes its cache there.
    for start in 1..=2 {
        run_init_containers(pod, volume, user, &host_dir);
        let meta = std::fs::metadata(&host_dir).unwrap();
        assert_eq!((u64::from(meta.uid()), u64::from(meta.gid())), user);
        assert_eq!(
            meta.mode() & 0o777,
            0o700,
            "the cache is closed to other users"
        );
        let (mut pullthrough, url) = start_pullthrough(container, volume, user, &host_dir, &binary);
        healthy(&mut pullthrough, &url)
            .await
            .unwrap_or_else(|e| panic!("start {start}: {e}"));
        drop(pullthrough);
        assert!(
            std::fs::read_dir(&host_dir).unwrap().next().is_some(),
            "pullthrough wrote nothing to its cache directory"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs podman and skopeo (run by .ci/run)"]
async fn the_cri_o_drop_in_sends_docker_io_pulls_to_pullthrough() {
    let hub = FakeHub::start().await;
    let image = Image::single("crio", DOCKER_MANIFEST, 1000);
    hub.push("library/criotest", "1", &image);
    let proxy = TestProxy::start(&hub).await;
    let host = proxy.url.trim_start_matches("http://");

    // The drop-in, with the test's pullthrough where the node's would listen.
    let original =
        std::fs::read_to_string(repo().join("config/clients/crio-registries.conf")).unwrap();
    assert!(original.contains("location = \"127.0.0.1:5000\""));
    let dir = tempfile::tempdir().unwrap();
    let conf = dir.path().join("50-pullthrough.conf");
    std::fs::write(
        &conf,
        original.replace(
            "location = \"127.0.0.1:5000\"",
            &format!("location = \"{host}\""),
        ),
    )
    .unwrap();
    // podman takes the file from the environment; skopeo only from its flag.
    let containers = |program: &str| {
        let mut c = Command::new(program);
        c.env("CONTAINERS_REGISTRIES_CONF", &conf);
        if program == "skopeo" {
            c.arg("--registries-conf").arg(&conf);
        }
        c.env_remove("HTTP_PROXY")
            .env_remove("HTTPS_PROXY")
            .env_remove("http_proxy")
            .env_remove("https_proxy");
        c
    };

    // podman reads it as CRI-O would (both through containers/image): docker.io has pullthrough
    // as its one mirror, over plain http.
    let info = run(containers("podman")
        .arg("--root")
        .arg(dir.path().join("root"))
        .arg("--runroot")
        .arg(dir.path().join("run"))
        .args(["--storage-driver", "vfs", "--events-backend", "file"])
        .args(["info", "--format", "{{json .Registries}}"]));
    let registries: serde_json::Value = serde_json::from_slice(&info).unwrap();
    let docker_io = &registries["docker.io"];
    assert_eq!(
        docker_io["Location"], "registry-1.docker.io",
        "{registries}"
    );
    let mirrors = docker_io["Mirrors"].as_array().unwrap();
    assert_eq!(mirrors.len(), 1, "{registries}");
    assert_eq!(
        (&mirrors[0]["Location"], &mirrors[0]["Insecure"]),
        (&serde_json::json!(host), &serde_json::json!(true)),
        "{registries}"
    );

    // A pull of a docker.io image by its docker.io name gets the mirror's bytes (Docker Hub
    // has no such image, nor is it reachable here); a copy checks every digest.
    let raw = run(containers("skopeo").args([
        "inspect",
        "--raw",
        "docker://docker.io/library/criotest:1",
    ]));
    assert_eq!(raw, image.bytes);
    run(containers("skopeo")
        .args(["copy", "docker://docker.io/library/criotest:1"])
        .arg(format!("oci:{}:1", dir.path().join("copied").display())));
    let cached: serde_json::Value = proxy
        .get("/_pullthrough/cache/library/criotest/manifests/1")
        .await
        .json()
        .await
        .unwrap();
    assert!(cached["tag"].is_object(), "{cached}");
}
