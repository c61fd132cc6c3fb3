//! The binary's start-up contract: a bad setting stops it with one line naming the key and exit
//! status 2; `--help` documents the flags.

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::too_many_lines,
    reason = "a test panics on what it did not expect, and may read as one long story"
)]

mod support;

use support::binary::Pullthrough;

fn pullthrough(env: &[(&str, &str)], args: &[&str]) -> std::process::Output {
    Pullthrough::new()
        .args(args)
        .envs(env.iter().copied())
        .output()
}

#[test]
fn bad_settings_exit_2_with_one_line_naming_the_key() {
    type Case<'a> = (&'a [(&'a str, &'a str)], &'a [&'a str], &'a str);
    let cases: &[Case] = &[
        (
            &[("PULLTHROUGH_TAG_TTL", "soon")],
            &[],
            "PULLTHROUGH_TAG_TTL",
        ),
        (
            &[("PULLTHROUGH_UPSTREAM", "ftp://example")],
            &[],
            "upstream",
        ),
        (&[("PULLTHROUGH_TAG_TLL", "5m")], &[], "PULLTHROUGH_TAG_TLL"),
        (&[], &["--listen", "not-an-address"], "listen"),
        (&[], &["--tag-ttl", "soon"], "--tag-ttl"),
        (&[], &["--log-format", "xml"], "--log-format"),
        (
            &[("PULLTHROUGH_CACHE_HIGH_WATERMARK", "2")],
            &[],
            "cache_high_watermark",
        ),
        (&[("PULLTHROUGH_DATA_DIR", "")], &[], "data_dir"),
        (
            &[(
                "PULLTHROUGH_UPSTREAM_MAX_CONCURRENCY",
                "3000000000000000000",
            )],
            &[],
            "upstream_max_concurrency",
        ),
        (&[("PULLTHROUGH_MAX_STALE", "600000000y")], &[], "max_stale"),
        (
            &[("PULLTHROUGH_CACHE_MAX_DISK", "0")],
            &[],
            "cache_max_disk",
        ),
        (&[("PULLTHROUGH_NAMESPACES", "[1")], &[], "namespaces"),
        (
            &[],
            &["--config", "/nonexistent/pullthrough.toml"],
            "/nonexistent/pullthrough.toml",
        ),
        (
            &[("PULLTHROUGH_DATA_DIR", "/proc/pullthrough-cannot-be-here")],
            &[],
            "data_dir",
        ),
        (
            &[
                ("PULLTHROUGH_UPSTREAM_USERNAME", "u"),
                ("PULLTHROUGH_UPSTREAM_PASSWORD_FILE", "/nonexistent/secret"),
            ],
            &[],
            "upstream_password_file",
        ),
    ];
    for (env, args, key) in cases {
        let out = pullthrough(env, args);
        assert_eq!(out.status.code(), Some(2), "{env:?} {args:?}");
        let stderr = String::from_utf8(out.stderr).unwrap();
        assert_eq!(stderr.trim_end().lines().count(), 1, "{stderr}");
        assert!(stderr.contains(key), "{key} not in {stderr}");
        for internal in ["src/", ".rs:", "pullthrough::", "default."] {
            assert!(!stderr.contains(internal), "{internal} in {stderr}");
        }
    }
}

#[test]
fn a_typo_in_the_config_file_and_a_foreign_data_dir_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("p.toml");
    std::fs::write(&file, "tag_tl = \"5s\"\n").unwrap();
    let out = Pullthrough::new().config_file(&file).output();
    assert_eq!(out.status.code(), Some(2));
    let stderr = String::from_utf8(out.stderr).unwrap();
    assert!(
        stderr.contains("tag_tl") && stderr.trim_end().lines().count() == 1,
        "{stderr}"
    );

    // A directory with someone's files in it (here a tmp/ of theirs) is never used or emptied.
    let home = dir.path().join("home");
    std::fs::create_dir_all(home.join("tmp")).unwrap();
    std::fs::write(home.join("tmp/keep.txt"), "mine").unwrap();
    let out = pullthrough(&[("PULLTHROUGH_DATA_DIR", home.to_str().unwrap())], &[]);
    assert_eq!(out.status.code(), Some(2));
    let stderr = String::from_utf8(out.stderr).unwrap();
    assert!(stderr.contains("not a pullthrough cache"), "{stderr}");
    assert_eq!(stderr.trim_end().lines().count(), 1, "{stderr}");
    assert!(home.join("tmp/keep.txt").exists());
    assert!(
        !home.join(".pullthrough.lock").exists(),
        "nothing is written into a foreign directory"
    );
}

#[test]
fn an_access_rule_for_a_registry_not_mirrored_stops_startup() {
    let dir = tempfile::tempdir().unwrap();
    let htpasswd = dir.path().join("htpasswd");
    std::fs::write(&htpasswd, "# nobody yet\n").unwrap();
    let file = dir.path().join("p.toml");
    // The default upstream's own host: its rules say docker.io, so this one would match nothing.
    std::fs::write(
        &file,
        format!(
            "upstream = \"http://127.0.0.1:5001\"\nhtpasswd = {:?}\ndata_dir = {:?}\n\n[[access]]\nupstream = \"127.0.0.1:5001\"\nprefix = \"team/\"\nusers = [\"alice\"]\n",
            htpasswd.display().to_string(),
            dir.path().join("cache").display().to_string()
        ),
    )
    .unwrap();
    let out = Pullthrough::new().config_file(&file).output();
    assert_eq!(out.status.code(), Some(2));
    let stderr = String::from_utf8(out.stderr).unwrap();
    assert_eq!(stderr.trim_end().lines().count(), 1, "{stderr}");
    assert!(
        stderr.contains("\"127.0.0.1:5001\"") && stderr.contains("\"docker.io\", \"*\""),
        "{stderr}"
    );
}

#[tokio::test]
async fn a_second_instance_on_one_data_dir_exits_2_naming_the_holder() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("cache");
    let data_text = data.to_str().unwrap();
    // Started: the first instance logs that it listens.
    let first = Pullthrough::new()
        .data_dir(&data)
        .env("PULLTHROUGH_LOG_FORMAT", "text")
        .start()
        .await;
    // A download of the first instance's under way.
    std::fs::write(data.join("tmp/in-flight"), "partial").unwrap();

    let out = pullthrough(&[("PULLTHROUGH_DATA_DIR", data_text)], &[]);
    let pid = first.pid();
    drop(first);
    assert_eq!(out.status.code(), Some(2));
    let stderr = String::from_utf8(out.stderr).unwrap();
    assert_eq!(stderr.trim_end().lines().count(), 1, "{stderr}");
    assert!(
        stderr.contains(data_text) && stderr.contains(&format!("pid {pid}")),
        "{stderr}"
    );
    assert!(
        data.join("tmp/in-flight").exists(),
        "the first one's files are left alone"
    );

    // Once the holder is gone, the directory is free again: it starts and listens.
    Pullthrough::new().data_dir(&data).start().await;
}

#[test]
fn the_documented_config_file_loads() {
    let file = concat!(env!("CARGO_MANIFEST_DIR"), "/config/pullthrough.toml");
    let config = pullthrough::config::Config::load(
        Some(std::path::Path::new(file)),
        Vec::new(),
        &Default::default(),
    )
    .unwrap();
    let defaults = pullthrough::Config::default();
    assert_eq!(
        config.listen, defaults.listen,
        "the file shows the defaults"
    );
    assert_eq!(config.tag_ttl, defaults.tag_ttl);
    assert_eq!(config.max_stale, defaults.max_stale);
    assert_eq!(config.manifest_cache_bytes, defaults.manifest_cache_bytes);
    assert_eq!(config.cache_max_disk, defaults.cache_max_disk);
}

#[test]
fn help_lists_the_flags() {
    let out = pullthrough(&[], &["--help"]);
    assert!(out.status.success());
    let help = String::from_utf8(out.stdout).unwrap();
    for flag in [
        "--config",
        "--listen",
        "--upstream",
        "--tag-ttl",
        "--data-dir",
        "--log-format",
    ] {
        assert!(help.contains(flag), "{flag}");
    }
}

#[test]
fn a_bad_setting_says_what_to_fix() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("cache");
    let data = data.to_str().unwrap();
    let syntax = dir.path().join("syntax.toml");
    std::fs::write(
        &syntax,
        "upstream = \"http://127.0.0.1:5001\"\ntag_ttl = 5m\n",
    )
    .unwrap();
    let typo = dir.path().join("typo.toml");
    std::fs::write(&typo, "tag_tl = \"5s\"\n").unwrap();
    let (syntax, typo) = (syntax.to_str().unwrap(), typo.to_str().unwrap());
    type Case<'a> = (&'a [(&'a str, &'a str)], &'a [&'a str], &'a [&'a str]);
    let cases: &[Case] = &[
        // The file, the line number and the line itself.
        (
            &[],
            &["--config", syntax],
            &[syntax, "line 2", "tag_ttl = 5m"],
        ),
        // The nearest key, not all of them.
        (&[], &["--config", typo], &["did you mean \"tag_ttl\"?"]),
        (
            &[("PULLTHROUGH_TAG_TLL", "5s")],
            &[],
            &["did you mean \"tag_ttl\"?"],
        ),
        (
            &[],
            &["--upstream", "127.0.0.1:15001"],
            &["http:// or https://", "http://127.0.0.1:15001"],
        ),
        (
            &[("PULLTHROUGH_UPSTREAM", "127.0.0.1:15001")],
            &[],
            &["PULLTHROUGH_UPSTREAM", "http:// or https://"],
        ),
        (
            &[],
            &["--log-format", "xml"],
            &["--log-format", "text or json"],
        ),
        // `--config` after the subcommand is read too.
        (
            &[],
            &["warm", "--config", typo, "alpine"],
            &["did you mean \"tag_ttl\"?"],
        ),
    ];
    for (env, args, needles) in cases {
        let mut env = env.to_vec();
        env.push(("PULLTHROUGH_DATA_DIR", data));
        let out = pullthrough(&env, args);
        assert_eq!(out.status.code(), Some(2), "{args:?}");
        let stderr = String::from_utf8(out.stderr).unwrap();
        assert_eq!(stderr.trim_end().lines().count(), 1, "{args:?}: {stderr}");
        for needle in *needles {
            assert!(
                stderr.contains(needle),
                "{args:?}: {needle:?} not in {stderr}"
            );
        }
        assert!(!stderr.contains("known keys are"), "{stderr}");
    }

    // The health check says the same of its URL, and names the cause when nothing answers.
    let out = pullthrough(&[], &["healthcheck", "--url", "127.0.0.1:5000"]);
    assert_eq!(out.status.code(), Some(1));
    let stderr = String::from_utf8(out.stderr).unwrap();
    assert!(stderr.contains("http:// or https://"), "{stderr}");
    let closed = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let url = format!("http://{}", closed.local_addr().unwrap());
    drop(closed);
    let out = pullthrough(&[], &["healthcheck", "--url", &url]);
    let stderr = String::from_utf8(out.stderr).unwrap();
    assert!(
        stderr.to_lowercase().contains("connection refused"),
        "{stderr}"
    );
    let out = pullthrough(
        &[("PULLTHROUGH_DATA_DIR", data)],
        &["warm", "--url", &url, "alpine"],
    );
    assert_eq!(out.status.code(), Some(2));
    assert!(out.stdout.is_empty(), "nothing warmed, no summary");
    let stderr = String::from_utf8(out.stderr).unwrap();
    assert_eq!(
        stderr,
        format!("pullthrough: warm cannot reach pullthrough at {url}: connection refused\n"),
        "one line naming the address and the cause"
    );
}

#[tokio::test]
async fn listen_takes_a_host_name() {
    let dir = tempfile::tempdir().unwrap();
    let running = Pullthrough::new()
        .args(["--listen", "localhost:0"])
        .data_dir(dir.path().join("cache"))
        .env("PULLTHROUGH_LOG_FORMAT", "text")
        .start()
        .await;
    let line = &running.listening;
    assert!(
        line.contains("addr=127.0.0.1:") || line.contains("addr=[::1]:"),
        "{line}"
    );
}
