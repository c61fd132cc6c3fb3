//! The cache API under `/_pullthrough/`, pretty-printed JSON for curl: the cached tags
//! (filtered, paged), one entry with its platforms and blobs and what a pull would cost
//! (`?explain=pull`), a referrers list (`<name>/referrers/<digest>`), the stats, purges
//! (`?dry_run=true` lists what would go), and the offline switch (`GET`/`PUT /offline`,
//! `{"offline": true|false}`).
//!
//! Access: with `admin_token` set, every endpoint needs `Authorization: Bearer <admin_token>`;
//! without it, a change (a purge, the offline switch) is accepted only from a loopback client,
//! and the offline switch only from the admin (not a client of access control); reading is
//! open, except
//! that with client access control on a client sees only the repositories it may pull (no
//! blob entries, no upstream URLs or recent upstream errors). Unknown query keys are a 400: a
//! misspelled `dry_run` must not purge for real.

use crate::error::Error;
use crate::proxy::{ListQuery, Proxy, Purge};
use crate::registry::{Digest, Reference, RepoName};
use crate::state::{AppState, Viewer};
use axum::Router;
use axum::extract::rejection::QueryRejection;
use axum::extract::{Extension, Path, Query, Request, State};
use axum::http::{HeaderValue, Method, StatusCode, header};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use serde::{Deserialize, Serialize};
use std::sync::Arc;

/// The `/_pullthrough` routes.
pub fn router(state: Arc<AppState>) -> Router<Arc<AppState>> {
    Router::new()
        .route("/cache", axum::routing::get(list))
        .route("/cache/", axum::routing::get(list))
        .route("/cache/{*rest}", axum::routing::get(show).delete(purge))
        .route("/stats", axum::routing::get(stats))
        .route("/offline", axum::routing::get(offline).put(set_offline))
        .layer(middleware::from_fn_with_state(state, guard))
}

/// Pretty JSON.
fn json(status: StatusCode, value: &impl Serialize) -> Response {
    match serde_json::to_string_pretty(value) {
        Ok(mut text) => {
            text.push('\n');
            (status, [(header::CONTENT_TYPE, "application/json")], text).into_response()
        }
        Err(e) => Error::from(std::io::Error::from(e)).into_response(),
    }
}

/// 401 with a message that says what is expected.
pub fn unauthorized(message: &str) -> Response {
    let body = serde_json::json!({ "errors": [{ "code": "UNAUTHORIZED", "message": message, "detail": null }] });
    let mut response = json(StatusCode::UNAUTHORIZED, &body);
    response.headers_mut().insert(
        header::WWW_AUTHENTICATE,
        HeaderValue::from_static("Bearer realm=\"pullthrough-admin\""),
    );
    response
}

/// Whether `request` carries `Authorization: Bearer <token>` (scheme in any case). The hashes
/// are compared, without stopping at the first difference, so neither content nor length shows
/// in the time taken.
pub fn authorized(request: &Request, token: &crate::config::Secret) -> Option<bool> {
    use sha2::Digest as _;
    let value = request
        .headers()
        .get(header::AUTHORIZATION)?
        .to_str()
        .ok()?;
    let (scheme, given) = value.split_once(' ')?;
    if !scheme.eq_ignore_ascii_case("bearer") {
        return Some(false);
    }
    let (a, b) = (
        sha2::Sha256::digest(given.trim().as_bytes()),
        sha2::Sha256::digest(token.0.as_bytes()),
    );
    Some(
        a.iter()
            .zip(b.iter())
            .fold(0u8, |acc, (x, y)| acc | (x ^ y))
            == 0,
    )
}

/// The access rule of every `/_pullthrough/` endpoint; the handlers read the [`Viewer`] it
/// leaves in the request.
async fn guard(State(state): State<Arc<AppState>>, mut request: Request, next: Next) -> Response {
    let mut admin = false;
    match &state.admin_token {
        Some(token) => match authorized(&request, token) {
            Some(true) => admin = true,
            Some(false) => return unauthorized("wrong admin token"),
            None => {
                return unauthorized("this endpoint needs Authorization: Bearer <admin_token>");
            }
        },
        None if !matches!(*request.method(), Method::GET | Method::HEAD) => {
            let loopback = super::peer_ip(&request).is_some_and(|ip| ip.is_loopback());
            if !loopback {
                return unauthorized(
                    "purging and switching offline are accepted only from a loopback client unless admin_token is set",
                );
            }
        }
        None => {}
    }
    let (authorization, peer) = (super::authorization(&request), super::peer_ip(&request));
    let viewer = match state.viewer(admin, authorization, peer).await {
        Ok(viewer) => viewer,
        Err(e) => return e.into_response(),
    };
    request.extensions_mut().insert(viewer);
    next.run(request).await
}

/// Query parameters of the listing.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct ListParams {
    ns: Option<String>,
    prefix: Option<String>,
    stale: Option<bool>,
    limit: Option<usize>,
    after: Option<String>,
}

async fn list(
    State(state): State<Arc<AppState>>,
    Extension(viewer): Extension<Viewer>,
    query: Result<Query<ListParams>, QueryRejection>,
) -> Response {
    let Ok(Query(p)) = query else {
        return bad_request(
            "query: ns=<registry host>, prefix=<repository prefix>, stale=true|false, limit=1..1000, after=<repository:tag>",
        );
    };
    let proxies: Vec<_> = match &p.ns {
        Some(ns) => match state.route("", Some(&ns_query(ns))).await {
            Ok((proxy, ..)) => vec![proxy],
            Err(e) => return e.into_response(),
        },
        None => state.proxies().cloned().collect(),
    };
    let query = ListQuery {
        prefix: p.prefix,
        stale: p.stale,
        limit: p.limit,
        after: p.after,
    };
    let visible = |proxy: &Proxy, name: &RepoName| state.may_see(&viewer, proxy, name);
    json(
        StatusCode::OK,
        &crate::proxy::list(&proxies, &query, &visible).await,
    )
}

fn bad_request(message: &str) -> Response {
    let body = serde_json::json!({ "errors": [{ "code": "UNSUPPORTED", "message": message, "detail": null }] });
    json(StatusCode::BAD_REQUEST, &body)
}

/// What a path under `/cache/` names (a `<host>/` prefix picks a further upstream).
enum Target {
    Repository(Arc<Proxy>, RepoName),
    Manifest(Arc<Proxy>, RepoName, Reference),
    Referrers(Arc<Proxy>, RepoName, Digest),
    Blob(Digest),
}

/// `ns=<host>` as the registry API's query carries it.
fn ns_query(ns: &str) -> String {
    url::form_urlencoded::Serializer::new(String::new())
        .append_pair("ns", ns)
        .finish()
}

/// What `rest` names, under the registry `ns` picks (as `?ns=` does for the registry API) or
/// its `<host>/` prefix.
async fn target(state: &AppState, rest: &str, ns: Option<&str>) -> Result<Target, Error> {
    // `blobs/` is reserved for blobs: a repository of that name is not addressable here.
    if let Some(d) = rest.strip_prefix("blobs/") {
        return d
            .parse::<Digest>()
            .map(Target::Blob)
            .map_err(|e| Error::DigestInvalid(e.to_string()));
    }
    let query = ns.map(ns_query);
    let (proxy, rest, default) = state.route(rest, query.as_deref()).await?;
    let hub = default && state.docker_hub_known();
    let name = |raw: &str| RepoName::parse(raw, hub).map_err(|e| Error::NameInvalid(e.to_string()));
    if let Some((repo, subject)) = rest.rsplit_once("/referrers/")
        && !subject.contains('/')
    {
        let subject = subject
            .parse()
            .map_err(|e: crate::registry::DigestError| Error::DigestInvalid(e.to_string()))?;
        return Ok(Target::Referrers(proxy, name(repo)?, subject));
    }
    match rest.rsplit_once("/manifests/") {
        Some((repo, reference)) => {
            let reference =
                Reference::parse(reference).map_err(|e| Error::ManifestUnknown(e.to_string()))?;
            Ok(Target::Manifest(proxy, name(repo)?, reference))
        }
        None => Ok(Target::Repository(proxy, name(rest.trim_end_matches('/'))?)),
    }
}

/// Whether `viewer` may see (or purge) `target`: a repository it may pull, a manifest by digest
/// only where upstream showed it in that repository (the by-digest cache is shared by every
/// repository), and blobs only as the admin (which digests are cached says what was pulled).
fn check_view(state: &AppState, viewer: &Viewer, target: &Target) -> Result<(), Error> {
    if *viewer == Viewer::Admin {
        return Ok(());
    }
    match target {
        Target::Repository(proxy, name) | Target::Referrers(proxy, name, _) => {
            state.check_view(viewer, proxy, name)
        }
        Target::Manifest(proxy, name, reference) => {
            state.check_view(viewer, proxy, name)?;
            match reference {
                Reference::Digest(d) if !proxy.manifests.granted(name, d) => {
                    Err(Error::ManifestUnknown("manifest unknown".into()))
                }
                _ => Ok(()),
            }
        }
        Target::Blob(_) => Err(Error::AccessDenied),
    }
}

/// Query parameters of one entry.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct ShowParams {
    ns: Option<String>,
    explain: Option<String>,
    platform: Option<String>,
}

async fn show(
    State(state): State<Arc<AppState>>,
    Extension(viewer): Extension<Viewer>,
    Path(rest): Path<String>,
    query: Result<Query<ShowParams>, QueryRejection>,
) -> Result<Response, Error> {
    let Ok(Query(p)) = query else {
        return Ok(bad_request(
            "query: ns=<registry host>, explain=pull, platform=<os/architecture[/variant]>",
        ));
    };
    let target = target(&state, &rest, p.ns.as_deref()).await?;
    check_view(&state, &viewer, &target)?;
    match target {
        // `?explain=pull` answers the documented object on its own, not inside the entry.
        Target::Manifest(proxy, name, reference) => match p.explain.as_deref() {
            Some("pull") => {
                let platform = p.platform.as_deref().unwrap_or("linux/amd64");
                let explain = proxy.explain(&name, &reference, platform).await;
                Ok(json(StatusCode::OK, &explain))
            }
            Some(_) => Ok(bad_request("explain takes one value: pull")),
            None => Ok(json(StatusCode::OK, &proxy.entry(&name, &reference).await)),
        },
        Target::Referrers(proxy, name, subject) => match p.explain.as_deref() {
            Some("pull") => Ok(json(
                StatusCode::OK,
                &proxy.explain_referrers(&name, &subject).await,
            )),
            Some(_) => Ok(bad_request("explain takes one value: pull")),
            None => Ok(json(
                StatusCode::OK,
                &proxy.referrers_view(&name, &subject).await,
            )),
        },
        Target::Repository(proxy, name) => {
            let entries = proxy.repository(&name).await;
            Ok(json(
                StatusCode::OK,
                &serde_json::json!({ "repository": name.as_str(), "tags": entries }),
            ))
        }
        Target::Blob(digest) => Ok(json(
            StatusCode::OK,
            &serde_json::json!({ "digest": digest, "cached": state.proxy.blobs.contains(&digest) }),
        )),
    }
}

/// Query parameters of a purge.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct PurgeParams {
    ns: Option<String>,
    dry_run: Option<bool>,
}

/// What a purge answers.
#[derive(Debug, Serialize)]
struct PurgeAnswer {
    dry_run: bool,
    #[serde(flatten)]
    purge: Purge,
}

async fn purge(
    State(state): State<Arc<AppState>>,
    Extension(viewer): Extension<Viewer>,
    Path(rest): Path<String>,
    query: Result<Query<PurgeParams>, QueryRejection>,
) -> Result<Response, Error> {
    let Ok(Query(p)) = query else {
        return Ok(bad_request("query: ns=<registry host>, dry_run=true|false"));
    };
    let dry_run = p.dry_run.unwrap_or(false);
    let target = target(&state, &rest, p.ns.as_deref()).await?;
    check_view(&state, &viewer, &target)?;
    let purge = match target {
        Target::Repository(proxy, name) => proxy.purge_repository(&name, dry_run).await,
        Target::Manifest(proxy, name, reference) => {
            proxy.purge_manifest(&name, &reference, dry_run).await
        }
        Target::Referrers(proxy, name, subject) => {
            proxy.purge_referrers(&name, &subject, dry_run).await
        }
        Target::Blob(digest) => state.proxy.purge_blob(&digest, dry_run).await,
    };
    let removed = purge.tags.len()
        + purge.manifests.len()
        + purge.blobs.len()
        + purge.referrers.len()
        + purge.not_found.len();
    if !dry_run && removed > 0 {
        tracing::info!(
            tags = purge.tags.len(),
            manifests = purge.manifests.len(),
            blobs = purge.blobs.len(),
            referrers = purge.referrers.len(),
            not_found = purge.not_found.len(),
            "purged from the cache"
        );
    }
    Ok(json(StatusCode::OK, &PurgeAnswer { dry_run, purge }))
}

/// The offline switch's body and answer.
#[derive(Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct OfflineSwitch {
    offline: bool,
}

/// `GET /offline`: whether pullthrough is offline.
async fn offline(State(state): State<Arc<AppState>>) -> Response {
    json(
        StatusCode::OK,
        &OfflineSwitch {
            offline: state.offline.is_on(),
        },
    )
}

/// `PUT /offline` with `{"offline": true|false}`: the admin switches offline mode (it takes
/// effect for every upstream request not yet sent; exchanges under way finish).
async fn set_offline(
    State(state): State<Arc<AppState>>,
    Extension(viewer): Extension<Viewer>,
    body: axum::body::Bytes,
) -> Response {
    if viewer != Viewer::Admin {
        return Error::AccessDenied.into_response();
    }
    // An object only: serde would take `[true]` for the struct too.
    let parsed = serde_json::from_slice::<serde_json::Value>(&body).and_then(|value| match value {
        serde_json::Value::Object(_) => serde_json::from_value::<OfflineSwitch>(value),
        _ => Err(serde::de::Error::custom("not a JSON object")),
    });
    let switch = match parsed {
        Ok(switch) => switch,
        Err(e) => {
            return bad_request(&format!(
                r#"body: {{"offline": true}} or {{"offline": false}} ({e})"#
            ));
        }
    };
    let was = state.offline.set(switch.offline);
    if was != switch.offline {
        match switch.offline {
            true => tracing::warn!(
                "offline (cache API): nothing is asked upstream; what is not cached answers 503"
            ),
            false => tracing::info!("online again (cache API): upstream is asked as usual"),
        }
    }
    json(StatusCode::OK, &switch)
}

async fn stats(
    State(state): State<Arc<AppState>>,
    Extension(viewer): Extension<Viewer>,
) -> Response {
    let stats = match viewer {
        Viewer::Admin => state.stats(),
        _ => state.stats().redacted(),
    };
    json(StatusCode::OK, &stats)
}
