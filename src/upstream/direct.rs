//! The client for manifest, tags-list and referrers requests when no proxy stands between
//! pullthrough and the upstream: hyper's own pooled client over rustls, without reqwest's
//! layers. reqwest's per-request work (its URL parses, its redirect and retry layers) was the
//! largest part of a cold miss's own time that was not pullthrough's (docs/benchmarks.md, ninth
//! sitting). These requests follow no redirect; what reqwest does for them that hyper's client
//! does not is done here: the connect timeout over the name lookup, TCP connect and TLS
//! handshake together, and a request the upstream refused unseen over HTTP/2 sent again.
//!
//! The answer is handed on as a `reqwest::Response`, so everything after the exchange (status
//! checks, body limits, errors) is the same code whichever client sent the request. Where a
//! system proxy (`HTTPS_PROXY`, `HTTP_PROXY`, `ALL_PROXY`, `NO_PROXY`) applies to the upstream,
//! reqwest sends these requests as it sends every other one.

use super::Error;
use bytes::Bytes;
use http_body_util::Empty;
use hyper::Uri;
use hyper::body::{Frame, Incoming, SizeHint};
use hyper_rustls::{HttpsConnector, MaybeHttpsStream};
use hyper_util::client::legacy::{Client, connect::HttpConnector};
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use reqwest::Method;
use reqwest::header::{self, HeaderMap, HeaderValue};
use std::error::Error as StdError;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;
use url::Url;

/// Times a request is sent again after the upstream refused it unseen (reqwest's default).
const RETRIES: usize = 2;

/// hyper's pooled client for one thread's API requests, set up as reqwest sets up its own:
/// TCP_NODELAY, keepalive probes, the connect timeout over the whole connect, rustls with ALPN
/// `h2` then `http/1.1`, idle connections closed after 90 s.
#[derive(Clone)]
pub(super) struct Direct {
    client: Client<Timed, Empty<Bytes>>,
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
            .build(Timed {
                inner: https,
                limit: connect_timeout,
            });
        Direct { client }
    }

    /// Sends a bodiless request with `headers` (plus `User-Agent`, and `Accept: */*` where
    /// none is given, as reqwest would) and returns the answer once its headers are in. The
    /// whole exchange, body included, must end within `deadline`: a body still arriving then
    /// fails as timed out, as under reqwest's per-request timeout. A request an HTTP/2
    /// upstream refused before acting on it (`REFUSED_STREAM`, or a graceful `GOAWAY`) is sent
    /// again, up to [`RETRIES`] times within the same deadline, as reqwest does.
    pub(super) async fn send(
        &self,
        method: Method,
        url: &Url,
        mut headers: HeaderMap,
        deadline: Duration,
    ) -> Result<reqwest::Response, Error> {
        let uri = Uri::try_from(url.as_str())
            .map_err(|e| Error::BadResponse(format!("cannot request {url}: {e}")))?;
        headers.insert(header::USER_AGENT, HeaderValue::from_static(USER_AGENT));
        headers
            .entry(header::ACCEPT)
            .or_insert(HeaderValue::from_static("*/*"));
        let mut timer = Box::pin(tokio::time::sleep(deadline));
        let mut retries = 0;
        let response = loop {
            let mut request = hyper::Request::new(Empty::new());
            *request.method_mut() = method.clone();
            *request.uri_mut() = uri.clone();
            *request.headers_mut() = headers.clone();
            let answer = tokio::select! {
                biased;
                answer = self.client.request(request) => answer,
                () = timer.as_mut() => return Err(Error::Timeout),
            };
            match answer {
                Ok(response) => break response,
                Err(e) if retries < RETRIES && refused_unseen(&e) => retries += 1,
                Err(e) => return Err(failed(url, e)),
            }
        };
        Ok(reqwest::Response::from(
            response.map(|body| reqwest::Body::wrap(Deadline { body, timer })),
        ))
    }
}

/// Whether an HTTP/2 upstream refused the request before acting on it, so that it may be sent
/// again on a new stream (RFC 9113 §8.7): it reset the stream with `REFUSED_STREAM`, or is
/// closing the connection gracefully (`GOAWAY` with `NO_ERROR`). reqwest's own test.
fn refused_unseen(e: &(dyn StdError + 'static)) -> bool {
    let mut next = Some(e);
    while let Some(cause) = next {
        if let Some(h2) = cause.downcast_ref::<h2::Error>() {
            let reason = h2.reason();
            return h2.is_remote()
                && ((h2.is_go_away() && reason == Some(h2::Reason::NO_ERROR))
                    || (h2.is_reset() && reason == Some(h2::Reason::REFUSED_STREAM)));
        }
        next = cause.source();
    }
    false
}

/// A request that got no answer, as the error reqwest's clients would give for it: a timeout
/// (the connect timeout's included), or unreachable with its cause, naming the URL.
fn failed(url: &Url, e: hyper_util::client::legacy::Error) -> Error {
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
        source: Arc::new(Failed {
            url: url.to_string(),
            source: e,
        }),
    }
}

/// A failed request and the URL it was for, as reqwest's errors say it.
#[derive(Debug, thiserror::Error)]
#[error("error sending request for url ({url})")]
struct Failed {
    url: String,
    #[source]
    source: hyper_util::client::legacy::Error,
}

/// hyper-rustls's connector with the connect timeout over the whole connect, as reqwest has
/// it: the name lookup, the TCP connect and the TLS handshake. hyper's own timeout covers the
/// TCP connect alone, and a connect the pool no longer needs goes on in the background.
#[derive(Clone)]
struct Timed {
    inner: HttpsConnector<HttpConnector>,
    limit: Duration,
}

type BoxError = Box<dyn StdError + Send + Sync>;

impl tower::Service<Uri> for Timed {
    type Response = MaybeHttpsStream<TokioIo<tokio::net::TcpStream>>;
    type Error = BoxError;
    type Future = Pin<Box<dyn Future<Output = Result<Self::Response, BoxError>> + Send>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), BoxError>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, uri: Uri) -> Self::Future {
        let connecting = self.inner.call(uri);
        let limit = self.limit;
        Box::pin(async move {
            tokio::time::timeout(limit, connecting)
                .await
                .unwrap_or_else(|_| {
                    Err(Box::new(std::io::Error::new(
                        std::io::ErrorKind::TimedOut,
                        "connect timed out",
                    )))
                })
        })
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
