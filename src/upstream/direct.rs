//! The client for manifest, tags-list and referrers requests when no proxy stands between
//! pullthrough and the upstream: hyper's own pooled client over rustls, without reqwest's
//! layers. These requests follow no redirect and need nothing reqwest adds, and reqwest's
//! per-request work (its URL parses, its redirect and retry layers) was the largest part of a
//! cold miss's own time that was not pullthrough's (docs/benchmarks.md, ninth sitting).
//!
//! The answer is handed on as a `reqwest::Response`, so everything after the exchange (status
//! checks, body limits, errors) is the same code whichever client sent the request. Where a
//! system proxy (`HTTPS_PROXY`, `HTTP_PROXY`, `ALL_PROXY`, `NO_PROXY`) applies to the upstream,
//! reqwest sends these requests as it sends every other one.

use super::Error;
use bytes::Bytes;
use http_body_util::Empty;
use hyper::body::{Frame, Incoming, SizeHint};
use hyper_rustls::HttpsConnector;
use hyper_util::client::legacy::{Client, connect::HttpConnector};
use hyper_util::rt::{TokioExecutor, TokioTimer};
use reqwest::Method;
use reqwest::header::{self, HeaderMap, HeaderValue};
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;
use url::Url;

/// hyper's pooled client for one thread's API requests, set up as reqwest sets up its own:
/// TCP_NODELAY, keepalive probes, the connect timeout, rustls with ALPN `h2` then `http/1.1`,
/// idle connections closed after 90 s.
#[derive(Clone)]
pub(super) struct Direct {
    client: Client<HttpsConnector<HttpConnector>, Empty<Bytes>>,
}

impl std::fmt::Debug for Direct {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Direct").finish_non_exhaustive()
    }
}

/// The `User-Agent` of every upstream request (reqwest's clients send the same).
pub(super) const USER_AGENT: &str = concat!("pullthrough/", env!("CARGO_PKG_VERSION"));

impl Direct {
    /// A client with a connection pool of its own.
    pub(super) fn new(connect_timeout: Duration, tls: &rustls::ClientConfig) -> Direct {
        let mut http = HttpConnector::new();
        http.enforce_http(false);
        http.set_nodelay(true);
        http.set_connect_timeout(Some(connect_timeout));
        http.set_keepalive(Some(Duration::from_secs(15)));
        http.set_keepalive_interval(Some(Duration::from_secs(15)));
        http.set_keepalive_retries(Some(3));
        // hyper-rustls sets the ALPN list itself (`h2`, then `http/1.1`), and refuses one set.
        let mut tls = tls.clone();
        tls.alpn_protocols.clear();
        let https = hyper_rustls::HttpsConnectorBuilder::new()
            .with_tls_config(tls)
            .https_or_http()
            .enable_all_versions()
            .wrap_connector(http);
        let client = Client::builder(TokioExecutor::new())
            .timer(TokioTimer::new())
            .pool_timer(TokioTimer::new())
            .pool_idle_timeout(Duration::from_secs(90))
            .build(https);
        Direct { client }
    }

    /// Sends a bodiless request with `headers` (plus `User-Agent`, and `Accept: */*` where
    /// none is given, as reqwest would) and returns the answer once its headers are in. The
    /// whole exchange, body included, must end within `deadline`: a body still arriving then
    /// fails as timed out, as under reqwest's per-request timeout.
    pub(super) async fn send(
        &self,
        method: Method,
        url: &Url,
        mut headers: HeaderMap,
        deadline: Duration,
    ) -> Result<reqwest::Response, Error> {
        let uri = hyper::Uri::try_from(url.as_str())
            .map_err(|e| Error::BadResponse(format!("cannot request {url}: {e}")))?;
        headers.insert(header::USER_AGENT, HeaderValue::from_static(USER_AGENT));
        headers
            .entry(header::ACCEPT)
            .or_insert(HeaderValue::from_static("*/*"));
        let mut request = hyper::Request::new(Empty::new());
        *request.method_mut() = method;
        *request.uri_mut() = uri;
        *request.headers_mut() = headers;
        let mut timer = Box::pin(tokio::time::sleep(deadline));
        let response = tokio::select! {
            biased;
            answer = self.client.request(request) => answer.map_err(failed)?,
            () = timer.as_mut() => return Err(Error::Timeout),
        };
        Ok(reqwest::Response::from(
            response.map(|body| reqwest::Body::wrap(Deadline { body, timer })),
        ))
    }
}

/// A request that got no answer, as the error reqwest's clients would give for it: a timeout
/// (the connect timeout's included), or unreachable with its cause.
fn failed(e: hyper_util::client::legacy::Error) -> Error {
    if super::timed_out(&e) {
        return Error::Timeout;
    }
    let class = super::class_in_chain(&e).unwrap_or(if e.is_connect() {
        "connection failed"
    } else {
        "request failed"
    });
    Error::Unreachable {
        class,
        source: Arc::new(e),
    }
}

/// A response body that fails as timed out once the exchange's deadline passes.
struct Deadline {
    body: Incoming,
    timer: Pin<Box<tokio::time::Sleep>>,
}

impl hyper::body::Body for Deadline {
    type Data = Bytes;
    type Error = Box<dyn std::error::Error + Send + Sync>;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Self::Error>>> {
        // The deadline first: a body that trickles in never leaves the timer unasked.
        if self.timer.as_mut().poll(cx).is_ready() {
            return Poll::Ready(Some(Err(Box::new(std::io::Error::new(
                std::io::ErrorKind::TimedOut,
                "upstream request timed out",
            )))));
        }
        Pin::new(&mut self.body)
            .poll_frame(cx)
            .map(|frame| frame.map(|f| f.map_err(Into::into)))
    }

    fn is_end_stream(&self) -> bool {
        self.body.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.body.size_hint()
    }
}
