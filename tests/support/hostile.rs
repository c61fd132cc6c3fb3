//! A scriptable hostile upstream: an axum server on 127.0.0.1:0 that answers each request with
//! the handler registered for its method and path (the longest matching prefix, or an exact
//! path), passing the handler the recorded request and the route's call count (1 for the
//! first call). Every request is recorded (method, path with query, headers, body) so tests
//! can assert what was sent and where. Unmatched requests get a registry 404. Helpers build
//! the misbehaviour: `/v2/` answers (200 or a Bearer challenge), any status with any headers
//! (`Content-Length`, `Content-Range`, `Retry-After`, `Location`), delays, and bodies streamed
//! chunk by chunk that may break off with an error part way. Stops when dropped.
//!
//! ```ignore
//! let up = Hostile::start().await;
//! up.answer_ping(Duration::ZERO, None);
//! up.on(Method::GET, "/v2/acme/app/blobs/", move |_req, n| match n {
//!     1 => respond(200, &[("content-length", "100")], stream(data.clone(), 10, ZERO, Some(50))),
//!     _ => respond(200, &[], data.clone()),
//! });
//! assert_eq!(up.count(Method::GET, "/v2/acme/app/blobs/"), 2);
//! ```

use axum::Router;
use axum::body::Body;
use axum::extract::{Request, State};
use axum::http::{HeaderMap, HeaderName, HeaderValue, Method, StatusCode, header};
use axum::response::Response;
use bytes::Bytes;
use futures_util::future::BoxFuture;
use futures_util::{FutureExt, StreamExt};
use std::future::Future;
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::net::TcpListener;

/// One request as the hostile server received it.
#[derive(Debug, Clone)]
pub struct Recorded {
    pub method: Method,
    /// Path and query, as sent.
    pub path: String,
    pub headers: HeaderMap,
    pub body: Bytes,
}

impl Recorded {
    /// A header's value as text ("" if absent or not text).
    pub fn header(&self, name: &str) -> &str {
        self.headers
            .get(name)
            .and_then(|v| v.to_str().ok())
            .unwrap_or_default()
    }
}

type Handler = Arc<dyn Fn(Recorded, u64) -> BoxFuture<'static, Response> + Send + Sync>;

struct Route {
    method: Method,
    path: String,
    exact: bool,
    calls: u64,
    handler: Handler,
}

#[derive(Default)]
struct Inner {
    routes: Vec<Route>,
    log: Vec<Recorded>,
}

/// The running server; see the module documentation.
pub struct Hostile {
    /// `http://127.0.0.1:<port>`.
    pub url: String,
    pub port: u16,
    inner: Arc<Mutex<Inner>>,
    task: tokio::task::AbortHandle,
}

impl Hostile {
    pub async fn start() -> Hostile {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let inner = Arc::new(Mutex::new(Inner::default()));
        let app = Router::new().fallback(dispatch).with_state(inner.clone());
        let task = tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
        Hostile {
            url: format!("http://127.0.0.1:{port}"),
            port,
            inner,
            task: task.abort_handle(),
        }
    }

    /// Answers `method` requests whose path starts with `prefix` (the longest prefix wins;
    /// registering the same route again replaces its handler and keeps its count).
    pub fn on(
        &self,
        method: Method,
        prefix: &str,
        f: impl Fn(Recorded, u64) -> Response + Send + Sync + 'static,
    ) -> &Self {
        self.route(method, prefix, false, move |r, n| {
            std::future::ready(f(r, n))
        })
    }

    /// Like [`Hostile::on`] with an async handler (to delay the response headers).
    pub fn on_async<F>(
        &self,
        method: Method,
        prefix: &str,
        f: impl Fn(Recorded, u64) -> F + Send + Sync + 'static,
    ) -> &Self
    where
        F: Future<Output = Response> + Send + 'static,
    {
        self.route(method, prefix, false, f)
    }

    /// Answers `GET /v2/` (exactly) after `delay`: 200 `{}`, or 401 with this
    /// `WWW-Authenticate`.
    pub fn answer_ping(&self, delay: Duration, challenge: Option<String>) -> &Self {
        self.route(Method::GET, "/v2/", true, move |_, _| {
            let challenge = challenge.clone();
            async move {
                tokio::time::sleep(delay).await;
                match challenge {
                    None => respond(200, &[("content-type", "application/json")], "{}"),
                    Some(c) => unauthorized(&c),
                }
            }
        })
    }

    fn route<F>(
        &self,
        method: Method,
        path: &str,
        exact: bool,
        f: impl Fn(Recorded, u64) -> F + Send + Sync + 'static,
    ) -> &Self
    where
        F: Future<Output = Response> + Send + 'static,
    {
        let handler: Handler = Arc::new(move |r, n| f(r, n).boxed());
        let mut inner = self.inner.lock().unwrap();
        match inner
            .routes
            .iter_mut()
            .find(|r| r.method == method && r.path == path && r.exact == exact)
        {
            Some(route) => route.handler = handler,
            None => inner.routes.push(Route {
                method,
                path: path.to_owned(),
                exact,
                calls: 0,
                handler,
            }),
        }
        self
    }

    /// Every request received so far, in order.
    pub fn requests(&self) -> Vec<Recorded> {
        self.inner.lock().unwrap().log.clone()
    }

    /// How many `method` requests had a path starting with `prefix`.
    pub fn count(&self, method: Method, prefix: &str) -> usize {
        let inner = self.inner.lock().unwrap();
        inner
            .log
            .iter()
            .filter(|r| r.method == method && r.path.starts_with(prefix))
            .count()
    }
}

impl Drop for Hostile {
    fn drop(&mut self) {
        self.task.abort();
    }
}

async fn dispatch(State(inner): State<Arc<Mutex<Inner>>>, request: Request) -> Response {
    let (parts, body) = request.into_parts();
    let body = axum::body::to_bytes(body, 64 << 20)
        .await
        .unwrap_or_default();
    let recorded = Recorded {
        method: parts.method,
        path: parts
            .uri
            .path_and_query()
            .map_or("/", |p| p.as_str())
            .into(),
        headers: parts.headers,
        body,
    };
    let path = parts.uri.path();
    let found = {
        let mut inner = inner.lock().unwrap();
        inner.log.push(recorded.clone());
        inner
            .routes
            .iter_mut()
            .filter(|r| r.method == recorded.method)
            .filter(|r| {
                if r.exact {
                    path == r.path
                } else {
                    path.starts_with(&r.path)
                }
            })
            .max_by_key(|r| (r.exact, r.path.len()))
            .map(|r| {
                r.calls += 1;
                (r.handler.clone(), r.calls)
            })
    };
    match found {
        Some((handler, n)) => handler(recorded, n).await,
        None => json_error(404, "NOT_FOUND", "no such route on the hostile upstream"),
    }
}

/// A response with this status, headers (set exactly as given, `Content-Length` included) and
/// body.
pub fn respond(status: u16, headers: &[(&str, &str)], body: impl Into<Body>) -> Response {
    let mut response = Response::new(body.into());
    *response.status_mut() = StatusCode::from_u16(status).unwrap();
    for (k, v) in headers {
        response.headers_mut().insert(
            HeaderName::from_bytes(k.as_bytes()).unwrap(),
            HeaderValue::from_str(v).unwrap(),
        );
    }
    response
}

/// A registry error envelope.
pub fn json_error(status: u16, code: &str, message: &str) -> Response {
    let body = serde_json::json!({ "errors": [{ "code": code, "message": message }] });
    respond(
        status,
        &[("content-type", "application/json")],
        body.to_string(),
    )
}

/// 401 with this `WWW-Authenticate` (e.g. `Bearer realm="...",service="..."`).
pub fn unauthorized(challenge: &str) -> Response {
    let mut r = json_error(401, "UNAUTHORIZED", "authentication required");
    r.headers_mut()
        .insert(header::WWW_AUTHENTICATE, challenge.parse().unwrap());
    r
}

/// `data` sent in `chunk`-byte pieces, each after `pause`; 200 ms after the last piece the
/// body ends (without `Content-Length` a client cannot tell the end earlier). With `break_at`,
/// it sends that many bytes and then, instead of ending, fails, which aborts the connection.
pub fn stream(data: Bytes, chunk: usize, pause: Duration, break_at: Option<usize>) -> Body {
    let stop = break_at.unwrap_or(data.len()).min(data.len());
    let pieces = futures_util::stream::unfold(0usize, move |offset| {
        let data = data.clone();
        async move {
            if offset >= stop {
                if offset == usize::MAX {
                    return None;
                }
                // The bytes sent reach the client before the end or the break.
                tokio::time::sleep(Duration::from_millis(200)).await;
                return break_at.map(|_| (Err(std::io::Error::other("hostile break")), usize::MAX));
            }
            if !pause.is_zero() {
                tokio::time::sleep(pause).await;
            }
            let end = (offset + chunk).min(stop);
            Some((Ok(data.slice(offset..end)), end))
        }
    });
    Body::from_stream(pieces.boxed())
}
