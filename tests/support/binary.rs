//! The `pullthrough` binary as the tests launch it: a builder for its arguments and
//! environment, run to the end ([`Pullthrough::output`]) or started and serving
//! ([`Pullthrough::start`]) with its log lines kept for the test to read.

use super::{Process, eventually};
use std::ffi::{OsStr, OsString};
use std::io::BufRead;
use std::path::Path;
use std::process::{Command, ExitStatus, Output, Stdio};
use std::sync::{Arc, Mutex};
use std::time::Duration;

/// A `pullthrough` command line. The test's own `PULLTHROUGH_*` environment never reaches it;
/// it listens on `127.0.0.1:0` unless told otherwise (by `PULLTHROUGH_LISTEN` or `--listen`).
#[derive(Default)]
pub struct Pullthrough {
    args: Vec<OsString>,
    env: Vec<(OsString, OsString)>,
    /// `ulimit` flags and value to run under (`-n 64`: soft and hard; `-Sn 64`: soft).
    fd_limit: Option<String>,
    echo: bool,
}

impl Pullthrough {
    pub fn new() -> Pullthrough {
        Pullthrough::default()
    }

    pub fn arg(mut self, arg: impl AsRef<OsStr>) -> Self {
        self.args.push(arg.as_ref().to_owned());
        self
    }

    pub fn args<S: AsRef<OsStr>>(mut self, args: impl IntoIterator<Item = S>) -> Self {
        self.args
            .extend(args.into_iter().map(|a| a.as_ref().to_owned()));
        self
    }

    /// Sets a variable; a later setting of the same one wins.
    pub fn env(mut self, key: impl AsRef<OsStr>, value: impl AsRef<OsStr>) -> Self {
        self.env
            .push((key.as_ref().to_owned(), value.as_ref().to_owned()));
        self
    }

    pub fn envs<K: AsRef<OsStr>, V: AsRef<OsStr>>(
        mut self,
        vars: impl IntoIterator<Item = (K, V)>,
    ) -> Self {
        for (k, v) in vars {
            self = self.env(k, v);
        }
        self
    }

    pub fn upstream(self, url: &str) -> Self {
        self.env("PULLTHROUGH_UPSTREAM", url)
    }

    pub fn data_dir(self, dir: impl AsRef<Path>) -> Self {
        self.env("PULLTHROUGH_DATA_DIR", dir.as_ref())
    }

    pub fn listen(self, addr: &str) -> Self {
        self.env("PULLTHROUGH_LISTEN", addr)
    }

    pub fn config_file(self, file: impl AsRef<Path>) -> Self {
        self.arg("--config").arg(file.as_ref())
    }

    /// Runs under `ulimit -n limit` (the soft and the hard limit).
    pub fn fd_limit(mut self, limit: u32) -> Self {
        self.fd_limit = Some(format!("-n {limit}"));
        self
    }

    /// Runs under `ulimit -Sn limit` (the soft limit only).
    pub fn soft_fd_limit(mut self, limit: u32) -> Self {
        self.fd_limit = Some(format!("-Sn {limit}"));
        self
    }

    /// Copies what a started binary logs to the test's stdout as well (for debugging).
    pub fn echo(mut self, echo: bool) -> Self {
        self.echo = echo;
        self
    }

    fn has(&self, key: &str) -> bool {
        self.env.iter().any(|(k, _)| k == key)
    }

    fn command(&self) -> Command {
        let binary = env!("CARGO_BIN_EXE_pullthrough");
        let mut command = match &self.fd_limit {
            Some(limit) => {
                let mut bash = Command::new("bash");
                bash.arg("-c")
                    .arg(format!("ulimit {limit} && exec \"$0\" \"$@\""))
                    .arg(binary);
                bash
            }
            None => Command::new(binary),
        };
        command.args(&self.args);
        for (key, _) in std::env::vars_os() {
            if key.to_string_lossy().starts_with("PULLTHROUGH_") {
                command.env_remove(key);
            }
        }
        if !self.args.iter().any(|a| a == "--listen") {
            command.env("PULLTHROUGH_LISTEN", "127.0.0.1:0");
        }
        command.envs(self.env.iter().map(|(k, v)| (k, v)));
        command
    }

    /// Runs it to the end.
    pub fn output(self) -> Output {
        self.command().output().unwrap()
    }

    /// Runs it to the end, which must come within `limit`.
    pub async fn output_within(self, limit: Duration) -> Output {
        let mut command = tokio::process::Command::from(self.command());
        command.kill_on_drop(true);
        tokio::time::timeout(limit, command.output())
            .await
            .unwrap_or_else(|_| panic!("pullthrough {:?} did not end within {limit:?}", self.args))
            .unwrap()
    }

    /// Starts it serving, and waits for the line that says where it listens. Unless told
    /// otherwise it logs at `pullthrough=info`, keeps its cache in a directory of its own and
    /// evicts nothing for free disk space (the tests' disk may be nearly full).
    pub async fn start(mut self) -> Running {
        let data = (!self.has("PULLTHROUGH_DATA_DIR")
            && !self.args.iter().any(|a| a == "--config"))
        .then(|| tempfile::tempdir().unwrap());
        let mut defaults = vec![
            ("RUST_LOG", "pullthrough=info".into()),
            ("PULLTHROUGH_CACHE_MIN_FREE_DISK", "0 B".into()),
        ];
        if let Some(data) = &data {
            defaults.push(("PULLTHROUGH_DATA_DIR", data.path().join("cache").into()));
        }
        for (key, value) in defaults {
            if !self.has(key) {
                self.env.push((key.into(), value));
            }
        }
        let mut command = self.command();
        command.stdout(Stdio::piped()).stderr(Stdio::piped());
        let mut child = command.spawn().unwrap();
        let log = Log::default();
        log.follow(child.stdout.take().unwrap(), self.echo);
        log.follow(child.stderr.take().unwrap(), self.echo);
        let mut running = Running {
            process: Process(child),
            log,
            read: 0,
            url: String::new(),
            addr: String::new(),
            listening: String::new(),
            _data: data,
        };
        let started = eventually(Duration::from_secs(30), async || {
            running.find_listening() || running.exited()
        })
        .await;
        assert!(
            started && !running.listening.is_empty(),
            "pullthrough did not start listening; it logged:\n{}",
            running.lines().join("\n")
        );
        running
    }
}

/// The lines a process wrote (stdout and stderr, as they came).
#[derive(Clone, Default)]
struct Log(Arc<Mutex<Vec<String>>>);

impl Log {
    fn follow(&self, output: impl std::io::Read + Send + 'static, echo: bool) {
        let log = self.clone();
        std::thread::spawn(move || {
            let mut output = std::io::BufReader::new(output);
            let mut line = Vec::new();
            while output.read_until(b'\n', &mut line).is_ok_and(|n| n > 0) {
                let text = String::from_utf8_lossy(&line).trim_end().to_owned();
                if echo {
                    use std::io::Write;
                    let _ = writeln!(std::io::stdout(), "{text}");
                }
                log.0.lock().unwrap().push(text);
                line.clear();
            }
        });
    }

    fn len(&self) -> usize {
        self.0.lock().unwrap().len()
    }
}

/// A started `pullthrough`, killed when dropped.
pub struct Running {
    process: Process,
    log: Log,
    /// Lines before this one have been read (by `start` and `line`).
    read: usize,
    /// `http://` or `https://` and the address it listens on.
    pub url: String,
    /// The address it listens on, `host:port`.
    pub addr: String,
    /// The line that said so.
    pub listening: String,
    _data: Option<tempfile::TempDir>,
}

/// The scheme and address of a "listening" line, text or JSON.
fn listening(line: &str) -> Option<(String, String)> {
    if let Ok(event) = serde_json::from_str::<serde_json::Value>(line) {
        if event["message"] != "listening" {
            return None;
        }
        let field = |name: &str| event[name].as_str().map(str::to_owned);
        return Some((field("scheme")?, field("addr")?));
    }
    if !line.contains(" listening ") {
        return None;
    }
    let field = |name: &str| {
        line.split_whitespace()
            .find_map(|w| w.strip_prefix(name)?.strip_prefix('='))
            .map(|value| value.trim_matches('"').to_owned())
    };
    Some((field("scheme")?, field("addr")?))
}

impl Running {
    /// Whether the "listening" line has come (and then reads up to it).
    fn find_listening(&mut self) -> bool {
        let lines = self.log.0.lock().unwrap();
        let Some((i, scheme, addr)) = lines
            .iter()
            .enumerate()
            .find_map(|(i, l)| listening(l).map(|(s, a)| (i, s, a)))
        else {
            return false;
        };
        assert!(!addr.ends_with(":0"), "logged port 0: {}", lines[i]);
        self.listening = lines[i].clone();
        drop(lines);
        self.url = format!("{scheme}://{addr}");
        self.addr = addr;
        self.read = i + 1;
        true
    }

    fn exited(&mut self) -> bool {
        self.process.0.try_wait().unwrap().is_some()
    }

    pub fn pid(&self) -> u32 {
        self.process.0.id()
    }

    /// Every line logged so far.
    pub fn lines(&self) -> Vec<String> {
        self.log.0.lock().unwrap().clone()
    }

    /// The first line not read yet that contains `needle`, within 10 s; the lines up to it are
    /// read then.
    pub async fn line(&mut self, needle: &str) -> String {
        let mut found = None;
        let log = self.log.clone();
        let from = self.read;
        eventually(Duration::from_secs(10), async || {
            found = log.0.lock().unwrap()[from..]
                .iter()
                .position(|l| l.contains(needle))
                .map(|i| from + i);
            found.is_some()
        })
        .await;
        let Some(i) = found else {
            panic!(
                "no log line with {needle:?}; saw {:#?}",
                &self.lines()[from..]
            );
        };
        self.read = i + 1;
        self.log.0.lock().unwrap()[i].clone()
    }

    /// Every line logged, once none has come for `quiet`: the wait is the point, for a test
    /// that asserts something is never logged.
    pub async fn quiet_log(&self, quiet: Duration) -> String {
        loop {
            let before = self.log.len();
            tokio::time::sleep(quiet).await;
            if self.log.len() == before {
                return self.lines().join("\n");
            }
        }
    }

    /// SIGKILL, and reaps it.
    pub fn kill(&mut self) {
        self.process.0.kill().unwrap();
        self.process.0.wait().unwrap();
    }

    /// SIGTERM.
    pub fn terminate(&self) {
        let status = Command::new("kill")
            .args(["-TERM", &self.pid().to_string()])
            .status()
            .unwrap();
        assert!(status.success());
    }

    /// How it exited, if it did within `limit`.
    pub async fn exit_status(&mut self, limit: Duration) -> Option<ExitStatus> {
        let mut status = None;
        eventually(limit, async || {
            status = self.process.0.try_wait().unwrap();
            status.is_some()
        })
        .await;
        status
    }
}
