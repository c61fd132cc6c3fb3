//! The `pullthrough` binary: parse settings, set up logging, bind, serve.

use clap::Parser;
use pullthrough::config::{Config, LogFormat, Overrides};
use std::path::PathBuf;
use std::process::ExitCode;
use tokio::net::TcpListener;
use tracing_subscriber::EnvFilter;

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
    listen: Option<String>,
    /// Upstream registry URL [default: https://registry-1.docker.io].
    #[arg(long)]
    upstream: Option<String>,
    /// How long a tag answer is trusted before revalidation, e.g. 30s or 5m [default: 1m].
    #[arg(long)]
    tag_ttl: Option<String>,
    /// On-disk cache root [default: pullthrough-data].
    #[arg(long)]
    data_dir: Option<String>,
    /// Log format: text or json [default: text].
    #[arg(long)]
    log_format: Option<String>,
}

#[tokio::main]
async fn main() -> ExitCode {
    let cli = Cli::parse();
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
    match config.log_format {
        LogFormat::Text => tracing_subscriber::fmt().with_env_filter(filter).init(),
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
    tracing::info!(addr = %config.listen, upstream = %config.upstream, data_dir = %config.data_dir.display(), "listening");
    match pullthrough::serve(app, listener, shutdown_signal()).await {
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
