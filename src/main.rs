//! The `pullthrough` binary: parse settings, set up logging, bind, serve.

use clap::Parser;
use pullthrough::config::{Config, LogFormat, Overrides, Secret};
use pullthrough::http::listeners::Listeners;
use std::io::IsTerminal;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;
use tracing_subscriber::EnvFilter;
use url::Url;

/// A caching pull-through proxy for container registries.
///
/// Settings come from the config file, then PULLTHROUGH_<KEY> environment variables, then
/// these flags; config/pullthrough.toml documents every key.
#[derive(Debug, Parser)]
#[command(version)]
struct Cli {
    /// Configuration file (TOML); also after a subcommand.
    #[arg(long, env = "PULLTHROUGH_CONFIG", global = true)]
    config: Option<PathBuf>,
    /// Address to listen on, host:port [default: 127.0.0.1:5000].
    #[arg(long, value_parser = pullthrough::config::resolve_listen)]
    listen: Option<SocketAddr>,
    /// Upstream registry URL [default: https://registry-1.docker.io].
    #[arg(long, value_parser = pullthrough::config::parse_url)]
    upstream: Option<Url>,
    /// How long a tag answer is trusted before revalidation, e.g. 30s or 5m [default: 1m].
    #[arg(long, value_parser = humantime::parse_duration)]
    tag_ttl: Option<Duration>,
    /// On-disk cache root [default: pullthrough-data].
    #[arg(long)]
    data_dir: Option<PathBuf>,
    /// Log format [default: text].
    #[arg(long, value_enum)]
    log_format: Option<LogFormat>,
    #[command(subcommand)]
    command: Option<Command>,
}

#[derive(Debug, clap::Subcommand)]
enum Command {
    /// Exit 0 when the pullthrough at --url (default: the configured listen address) is ready
    /// to serve, 1 otherwise. For container health checks without curl.
    Healthcheck {
        /// Base URL of the pullthrough to check.
        #[arg(long)]
        url: Option<String>,
    },
    /// Ask a running pullthrough to fetch images (every platform, or --platform), and report
    /// what was already cached and what it cost upstream.
    Warm {
        /// Images: alpine, library/alpine:3.20, org/app@sha256:...
        images: Vec<String>,
        /// A file with one image per line (# starts a comment).
        #[arg(long)]
        file: Option<PathBuf>,
        /// Only this platform of multi-platform images, e.g. linux/arm64.
        #[arg(long)]
        platform: Option<String>,
        /// Base URL of the pullthrough (default: the configured listen address).
        #[arg(long)]
        url: Option<String>,
        /// Admin token for the stats of --url (the configured admin_token is sent only to the
        /// configured listen address).
        #[arg(long, value_parser = token)]
        admin_token: Option<Secret>,
    },
}

/// A bearer token from the command line: visible ASCII, as a header value must be.
fn token(text: &str) -> Result<Secret, String> {
    if text.is_empty() || !text.bytes().all(|b| b.is_ascii_graphic()) {
        return Err("must be visible ASCII characters".to_owned());
    }
    Ok(Secret(text.to_owned()))
}

#[tokio::main]
async fn main() -> ExitCode {
    let cli = match parse_cli() {
        Ok(cli) => cli,
        Err(code) => return code,
    };
    let config = match load_config(&cli) {
        Ok(config) => config,
        Err(code) => return code,
    };
    match cli.command {
        Some(command) => run_command(command, &config).await,
        None => run_server(&config).await,
    }
}

/// The command line, or the exit status once clap has answered: 0 after `--help` or
/// `--version`, 2 after one line naming a bad flag.
fn parse_cli() -> Result<Cli, ExitCode> {
    Cli::try_parse().map_err(|e| {
        if e.use_stderr() {
            eprintln!("pullthrough: {}", flag_error(&e));
            ExitCode::from(2)
        } else {
            let _ = e.print();
            ExitCode::SUCCESS
        }
    })
}

/// One line naming the flag, like every other bad setting, with the values it takes.
fn flag_error(e: &clap::Error) -> String {
    use clap::error::{ContextKind, ContextValue};
    let text = e.to_string();
    let first = text.lines().next().unwrap_or_default();
    let valid = match e.get(ContextKind::ValidValue) {
        Some(ContextValue::Strings(values)) => {
            format!("; expected {}", values.join(" or "))
        }
        _ => String::new(),
    };
    format!("{}{valid}", first.trim_start_matches("error: "))
}

/// The settings from the file, the environment and the flags, or the exit status after one
/// line saying what is wrong.
fn load_config(cli: &Cli) -> Result<Config, ExitCode> {
    let overrides = Overrides {
        listen: cli.listen,
        upstream: cli.upstream.clone(),
        tag_ttl: cli.tag_ttl,
        data_dir: cli.data_dir.clone(),
        log_format: cli.log_format,
    };
    Config::load(cli.config.as_deref(), std::env::vars(), &overrides).map_err(|e| {
        eprintln!("pullthrough: {e}");
        // A health check reports unhealthy (1); Docker reserves 2.
        if matches!(cli.command, Some(Command::Healthcheck { .. })) {
            ExitCode::from(1)
        } else {
            ExitCode::from(2)
        }
    })
}

/// Runs a subcommand against a running pullthrough.
async fn run_command(command: Command, config: &Config) -> ExitCode {
    match command {
        Command::Healthcheck { url } => healthcheck(url, config).await,
        Command::Warm {
            images,
            file,
            platform,
            url,
            admin_token,
        } => {
            let token = warm_token(admin_token, url.as_deref(), config);
            warm(images, file, platform, url, token, config).await
        }
    }
}

/// Sets up logging, then serves until Ctrl-C or SIGTERM: exit status 2 for a bad setting
/// found on the way, 1 if serving fails.
async fn run_server(config: &Config) -> ExitCode {
    let _log = init_logging(config.log_format);
    let (app, listeners) = match start(config).await {
        Ok(started) => started,
        Err(why) => {
            eprintln!("pullthrough: {why}");
            return ExitCode::from(2);
        }
    };
    announce(config, &listeners);
    raise_open_file_limit(config.max_client_connections);
    match pullthrough::serve(app, listeners, config, shutdown_signal()).await {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("pullthrough: {e:#}");
            ExitCode::FAILURE
        }
    }
}

/// Descriptors beyond the client connections: the listener, each worker's runtime, upstream
/// connections, blob files being read and written, the log.
const SPARE_DESCRIPTORS: u64 = 256;

/// The most open files asked for (Go's runtime raises its limit the same way, to the hard
/// limit).
const MOST_OPEN_FILES: u64 = 1 << 20;

/// Raises the soft limit on open files to the hard one: every client connection, upstream
/// connection and blob being served holds a descriptor, and the soft limit systemd and
/// containerd give a service (1,024) is taken by `max_client_connections`' default alone.
/// Warns when even the raised limit leaves no room for `max_connections` clients.
fn raise_open_file_limit(max_connections: usize) {
    use rustix::process::{Resource, Rlimit, getrlimit, setrlimit};
    let limit = getrlimit(Resource::Nofile);
    let wanted = limit
        .maximum
        .map_or(MOST_OPEN_FILES, |m| m.min(MOST_OPEN_FILES));
    let mut current = limit.current;
    if current.is_some_and(|c| c < wanted) {
        let raised = Rlimit {
            current: Some(wanted),
            maximum: limit.maximum,
        };
        match setrlimit(Resource::Nofile, raised) {
            Ok(()) => {
                tracing::debug!(from = ?current, to = wanted, "raised the open-file limit");
                current = Some(wanted);
            }
            Err(e) => tracing::debug!(error = %e, "could not raise the open-file limit"),
        }
    }
    let needed = u64::try_from(max_connections)
        .unwrap_or(u64::MAX)
        .saturating_add(SPARE_DESCRIPTORS);
    if let Some(current) = current.filter(|&c| c < needed) {
        tracing::warn!(
            open_file_limit = current,
            max_client_connections = max_connections,
            "the open-file limit leaves no room for max_client_connections clients: when \
             descriptors run out the quietest connections are closed; raise the limit \
             (ulimit -n, LimitNOFILE=, --ulimit nofile=) or lower max_client_connections"
        );
    }
}

/// Log events to stdout through the log's own writer thread (`pullthrough::logging`),
/// filtered by `RUST_LOG` (default `pullthrough=info`). The guard flushes the queue: keep it
/// until the process ends.
fn init_logging(format: LogFormat) -> tracing_appender::non_blocking::WorkerGuard {
    let filter =
        EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("pullthrough=info"));
    // Colour only for a person at a terminal; files and log collectors get plain text.
    let ansi = std::io::stdout().is_terminal();
    let (writer, guard) = pullthrough::logging::stdout();
    match format {
        LogFormat::Text => {
            if !ansi {
                pullthrough::logging::write_access_lines_to(writer.clone());
            }
            tracing_subscriber::fmt()
                .with_ansi(ansi)
                .fmt_fields(pullthrough::logging::PlainFields)
                .with_writer(writer)
                .with_env_filter(filter)
                .init();
        }
        LogFormat::Json => tracing_subscriber::fmt()
            .json()
            .flatten_event(true)
            .with_writer(writer)
            .with_env_filter(filter)
            .init(),
    }
    guard
}

/// The application and its bound listener. Everything that can fail on a bad setting (data
/// directory, password file, patterns, certificate, listen address) fails here, before
/// serving.
async fn start(config: &Config) -> Result<(pullthrough::App, Listeners), String> {
    let app = pullthrough::app(config).map_err(|e| format!("{e:#}"))?;
    if let (Some(cert), Some(key)) = (&config.tls_cert, &config.tls_key)
        && let Err(e) = pullthrough::http::tls::acceptor(cert, key)
    {
        return Err(format!("invalid value for key \"tls_cert\": {e:#}"));
    }
    match Listeners::bind(config.listen, config.runtime) {
        Ok(listeners) => Ok((app, listeners)),
        Err(e) => Err(format!(
            "invalid value for key \"listen\": cannot listen on {}: {e}",
            config.listen
        )),
    }
}

/// Logs the address really bound, and warns when upstream credentials are open to every
/// client.
fn announce(config: &Config, listeners: &Listeners) {
    let bound = listeners.local_addr().unwrap_or(config.listen);
    let scheme = scheme(config);
    tracing::info!(addr = %bound, scheme, upstream = %config.upstream, data_dir = %config.data_dir.display(), "listening");
    if config.credentials_open_to_all() {
        tracing::warn!(addr = %bound, "upstream credentials are configured and pullthrough has no client access control: every client that can reach this address can read the private images those credentials can");
    }
}

/// `https` when the listener has a certificate, else `http`.
fn scheme(config: &Config) -> &'static str {
    if config.tls_cert.is_some() {
        "https"
    } else {
        "http"
    }
}

/// Where a client on this machine reaches the configured listener (over TLS when it has a
/// certificate).
fn local_url(config: &Config) -> String {
    let mut addr = config.listen;
    if addr.ip().is_unspecified() {
        addr.set_ip(match addr.ip() {
            std::net::IpAddr::V4(_) => std::net::Ipv4Addr::LOCALHOST.into(),
            std::net::IpAddr::V6(_) => std::net::Ipv6Addr::LOCALHOST.into(),
        });
    }
    format!("{}://{addr}", scheme(config))
}

/// `GET {url}/readyz`, as `healthcheck` and `warm` ask a running pullthrough.
async fn readyz(
    url: &str,
    accept_invalid_certs: bool,
    timeout: Duration,
) -> Result<reqwest::Response, reqwest::Error> {
    let client = reqwest::Client::builder()
        .danger_accept_invalid_certs(accept_invalid_certs)
        .timeout(timeout)
        .build()
        .unwrap_or_default();
    client
        .get(format!("{}/readyz", url.trim_end_matches('/')))
        .send()
        .await
}

/// Whether a pullthrough answers at `url` (any HTTP answer will do): the cause in a word when
/// nothing does (`connection refused`, `name not resolved`).
async fn reachable(url: &str) -> Result<(), String> {
    pullthrough::config::parse_url(url).map_err(|why| format!("invalid --url: {why}"))?;
    match readyz(url, false, Duration::from_secs(5)).await {
        Ok(_) => Ok(()),
        Err(e) => Err(pullthrough::upstream::unreachable_class(&e).to_owned()),
    }
}

/// `pullthrough healthcheck`.
async fn healthcheck(url: Option<String>, config: &Config) -> ExitCode {
    // Its own listener on this machine: over TLS the certificate names the public host, not
    // 127.0.0.1, and readiness is all that is asked.
    let own = url.is_none() && config.tls_cert.is_some();
    let url = url.unwrap_or_else(|| local_url(config));
    if let Err(why) = pullthrough::config::parse_url(&url) {
        eprintln!("pullthrough: invalid value for --url: {why}");
        return ExitCode::FAILURE;
    }
    match readyz(&url, own, Duration::from_secs(3)).await {
        Ok(r) if r.status().is_success() => ExitCode::SUCCESS,
        Ok(r) => {
            eprintln!("pullthrough: not ready: HTTP {}", r.status().as_u16());
            ExitCode::FAILURE
        }
        Err(e) => {
            eprintln!(
                "pullthrough: not reachable at {url}: {}",
                pullthrough::warm::cause(&e)
            );
            ExitCode::FAILURE
        }
    }
}

/// The admin token `warm` sends to `url`: the one given on the command line, else the
/// configured one, but only to the configured listener: any other URL may be anyone's server
/// (and plain http anyone's to read).
fn warm_token(given: Option<Secret>, url: Option<&str>, config: &Config) -> Option<Secret> {
    if given.is_some() {
        return given;
    }
    let token = config.admin_token.clone()?;
    match url {
        Some(url)
            if !pullthrough::warm::is_listener(url, config.listen, config.tls_cert.is_some()) =>
        {
            eprintln!(
                "pullthrough: admin_token is not sent to {url}, which is not the configured listen address; pass --admin-token to send one"
            );
            None
        }
        _ => Some(token),
    }
}

/// `pullthrough warm`.
async fn warm(
    mut images: Vec<String>,
    file: Option<PathBuf>,
    platform: Option<String>,
    url: Option<String>,
    admin_token: Option<Secret>,
    config: &Config,
) -> ExitCode {
    if let Some(path) = file {
        match std::fs::read_to_string(&path) {
            Ok(text) => images.extend(
                text.lines()
                    .map(|l| l.split('#').next().unwrap_or_default().trim())
                    .filter(|l| !l.is_empty())
                    .map(str::to_owned),
            ),
            Err(e) => {
                eprintln!("pullthrough: cannot read {}: {e}", path.display());
                return ExitCode::from(2);
            }
        }
    }
    if images.is_empty() {
        eprintln!("pullthrough: warm needs at least one image (or --file)");
        return ExitCode::from(2);
    }
    let url = url.unwrap_or_else(|| local_url(config));
    if let Err(why) = reachable(&url).await {
        eprintln!("pullthrough: warm cannot reach pullthrough at {url}: {why}");
        return ExitCode::from(2);
    }
    let request = pullthrough::warm::Request {
        url,
        images,
        platform,
        admin_token,
        default_host: config.default_host(),
    };
    let summary = if std::io::stderr().is_terminal() {
        pullthrough::warm::warm(&request, &Bar::new()).await
    } else {
        pullthrough::warm::warm(&request, &Lines::default()).await
    };
    println!("{}", summary.line());
    if summary.failed > 0 {
        ExitCode::FAILURE
    } else {
        ExitCode::SUCCESS
    }
}

/// Warm-up progress as plain lines (not a terminal: CI logs): sizes in units, and each
/// blob's share of its image's bytes.
#[derive(Default)]
struct Lines {
    /// Blob bytes of the current image done, and in all.
    done: std::cell::Cell<(u64, u64)>,
}

impl pullthrough::warm::Report for Lines {
    fn image(&self, image: &str) {
        self.done.set((0, 0));
        println!("{image}");
    }
    fn blobs(&self, count: usize, bytes: u64) {
        self.done.set((0, bytes));
        println!("  {count} blob(s), {}", indicatif::HumanBytes(bytes));
    }
    fn item(&self, what: &str, bytes: u64, cached: bool) {
        println!("  {}", item_line(what, bytes, cached, &self.done));
    }
    fn failed(&self, image: &str, error: &str) {
        println!("  {image} FAILED: {error}");
    }
}

/// `blob sha256:…: 2.50 MiB, fetched (40% of 6.25 MiB)`; a blob's bytes count towards `done`.
fn item_line(what: &str, bytes: u64, cached: bool, done: &std::cell::Cell<(u64, u64)>) -> String {
    let source = if cached { "cached" } else { "fetched" };
    let size = indicatif::HumanBytes(bytes);
    let (sofar, total) = done.get();
    if !what.starts_with("blob ") || total == 0 {
        return format!("{what}: {size}, {source}");
    }
    let sofar = sofar.saturating_add(bytes).min(total);
    done.set((sofar, total));
    let percent = u128::from(sofar) * 100 / u128::from(total);
    let total = indicatif::HumanBytes(total);
    format!("{what}: {size}, {source} ({percent}% of {total})")
}

/// Warm-up progress as a bar per image: its blobs' bytes done, in units and percent.
struct Bar(indicatif::ProgressBar);

impl Bar {
    fn new() -> Bar {
        Bar::drawn_to(indicatif::ProgressDrawTarget::stderr())
    }

    fn drawn_to(target: indicatif::ProgressDrawTarget) -> Bar {
        let bar = indicatif::ProgressBar::with_draw_target(Some(0), target);
        let template = "{spinner} {prefix} [{bar:24}] {bytes}/{total_bytes} ({percent}%) {msg}";
        bar.set_style(
            indicatif::ProgressStyle::with_template(template)
                .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar())
                .progress_chars("=> "),
        );
        bar.enable_steady_tick(Duration::from_millis(120));
        Bar(bar)
    }
}

impl pullthrough::warm::Report for Bar {
    fn image(&self, image: &str) {
        self.0.set_prefix(image.to_owned());
        self.0.set_length(0);
        self.0.set_position(0);
        self.0.set_message("manifests");
    }
    fn blobs(&self, count: usize, bytes: u64) {
        self.0.set_length(bytes);
        self.0.set_message(format!("{count} blob(s)"));
    }
    fn item(&self, what: &str, bytes: u64, cached: bool) {
        if what.starts_with("blob ") {
            self.0.inc(bytes);
        }
        let source = if cached { "cached" } else { "fetched" };
        let size = indicatif::HumanBytes(bytes);
        self.0.set_message(format!("{what} ({size}, {source})"));
    }
    fn failed(&self, image: &str, error: &str) {
        self.0.println(format!("{image} FAILED: {error}"));
    }
}

impl Drop for Bar {
    fn drop(&mut self) {
        self.0.finish_and_clear();
    }
}

/// Ctrl-C or SIGTERM.
async fn shutdown_signal() {
    let ctrl_c = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    let terminate = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending().await,
        }
    };
    tokio::select! {
        () = ctrl_c => {},
        () = terminate => {},
    }
    tracing::info!("shutting down");
}

#[cfg(test)]
mod tests {
    use super::*;
    use pullthrough::warm::Report;

    #[test]
    fn warm_lines_give_sizes_in_units_and_each_blob_its_share() {
        let done = std::cell::Cell::new((0, 4 * 1024 * 1024));
        let manifest = item_line("manifest alpine:3", 1500, false, &done);
        assert_eq!(manifest, "manifest alpine:3: 1.46 KiB, fetched");
        let first = item_line("blob sha256:ab", 1024 * 1024, false, &done);
        assert_eq!(first, "blob sha256:ab: 1.00 MiB, fetched (25% of 4.00 MiB)");
        let second = item_line("blob sha256:cd", 3 * 1024 * 1024, true, &done);
        assert_eq!(
            second,
            "blob sha256:cd: 3.00 MiB, cached (100% of 4.00 MiB)"
        );
        // An image whose blob sizes are unknown: no share to give.
        let unknown = std::cell::Cell::new((0, 0));
        let line = item_line("blob sha256:ef", 10, false, &unknown);
        assert_eq!(line, "blob sha256:ef: 10 B, fetched");
    }

    #[test]
    fn the_warm_bar_counts_each_images_blob_bytes() {
        let bar = Bar::drawn_to(indicatif::ProgressDrawTarget::hidden());
        bar.image("alpine:3");
        bar.item("manifest alpine:3", 1500, false);
        bar.blobs(2, 3000);
        assert_eq!((bar.0.position(), bar.0.length()), (0, Some(3000)));
        bar.item("blob sha256:ab", 1000, false);
        bar.item("blob sha256:cd", 2000, true);
        assert_eq!(bar.0.position(), 3000);
        assert!(
            bar.0.message().contains("1.95 KiB, cached"),
            "{}",
            bar.0.message()
        );
        // The next image starts from nothing.
        bar.image("busybox:1");
        assert_eq!((bar.0.position(), bar.0.length()), (0, Some(0)));
    }
}
