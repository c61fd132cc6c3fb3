//! The `pullthrough` binary: parse settings, set up logging, bind, serve.

use clap::Parser;
use pullthrough::config::{Config, LogFormat, Overrides};
use std::io::IsTerminal;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;
use tokio::net::TcpListener;
use tracing_subscriber::EnvFilter;
use url::Url;

/// A caching pull-through proxy for container registries.
///
/// Settings come from the config file, then PULLTHROUGH_<KEY> environment variables, then
/// these flags; config/pullthrough.toml documents every key.
#[derive(Debug, Parser)]
#[command(version)]
struct Cli {
    /// Configuration file (TOML).
    #[arg(long, env = "PULLTHROUGH_CONFIG")]
    config: Option<PathBuf>,
    /// Address to listen on [default: 127.0.0.1:5000].
    #[arg(long)]
    listen: Option<SocketAddr>,
    /// Upstream registry URL [default: https://registry-1.docker.io].
    #[arg(long)]
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
}

#[tokio::main]
async fn main() -> ExitCode {
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        Err(e) if e.use_stderr() => {
            // One line naming the flag, like every other bad setting.
            let text = e.to_string();
            let first = text.lines().next().unwrap_or_default();
            eprintln!("pullthrough: {}", first.trim_start_matches("error: "));
            return ExitCode::from(2);
        }
        Err(e) => {
            let _ = e.print();
            return ExitCode::SUCCESS;
        }
    };
    let overrides = Overrides {
        listen: cli.listen,
        upstream: cli.upstream,
        tag_ttl: cli.tag_ttl,
        data_dir: cli.data_dir,
        log_format: cli.log_format,
    };
    let config = match Config::load(cli.config.as_deref(), std::env::vars(), &overrides) {
        Ok(config) => config,
        Err(e) => {
            eprintln!("pullthrough: {e}");
            return ExitCode::from(2);
        }
    };
    let filter =
        EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("pullthrough=info"));
    // Colour only for a person at a terminal; files and log collectors get plain text.
    let ansi = std::io::stdout().is_terminal();
    match config.log_format {
        LogFormat::Text => tracing_subscriber::fmt()
            .with_ansi(ansi)
            .with_env_filter(filter)
            .init(),
        LogFormat::Json => tracing_subscriber::fmt()
            .json()
            .flatten_event(true)
            .with_env_filter(filter)
            .init(),
    }
    // Everything that can fail on a bad setting (data directory, password file, patterns)
    // fails here, before serving, with exit status 2.
    let app = match pullthrough::app(&config) {
        Ok(app) => app,
        Err(e) => {
            eprintln!("pullthrough: {e:#}");
            return ExitCode::from(2);
        }
    };
    let listener = match TcpListener::bind(config.listen).await {
        Ok(l) => l,
        Err(e) => {
            eprintln!(
                "pullthrough: invalid value for key \"listen\": cannot listen on {}: {e}",
                config.listen
            );
            return ExitCode::from(2);
        }
    };
    let bound = listener.local_addr().unwrap_or(config.listen);
    tracing::info!(addr = %bound, upstream = %config.upstream, data_dir = %config.data_dir.display(), "listening");
    match pullthrough::serve(app, listener, &config, shutdown_signal()).await {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("pullthrough: {e:#}");
            ExitCode::FAILURE
        }
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
