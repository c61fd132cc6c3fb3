//! The status page at `/`: one small server-rendered HTML page, no script, that shows at a
//! glance what the stats endpoint reports: hit ratio, pulls saved, rate-limit budget, the most
//! pulled images with their freshness, disk use, each upstream's share, and the last upstream
//! errors; and a banner while offline.

use crate::metrics::UpstreamFailure;
use crate::state::{AppState, Stats, UpstreamStats, Viewer};
use axum::extract::State;
use axum::http::header;
use axum::response::{IntoResponse, Response};
use std::fmt::Write;
use std::sync::Arc;

/// Escapes text for HTML.
fn esc(text: &str) -> String {
    text.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
        .replace('"', "&quot;")
}

fn percent(ratio: Option<f64>) -> String {
    ratio.map_or("–".to_owned(), |r| format!("{:.1}%", r * 100.0))
}

fn size(bytes: u64) -> String {
    bytesize::ByteSize::b(bytes).to_string()
}

/// `GET /`.
pub async fn page(State(state): State<Arc<AppState>>, request: axum::extract::Request) -> Response {
    let admin = carries_admin_token(&state, &request);
    let authorization = super::authorization(&request);
    let viewer = match state
        .viewer(admin, authorization, super::peer_ip(&request))
        .await
    {
        Ok(viewer) => viewer,
        Err(e) => return e.into_response(),
    };
    let stats = if viewer == Viewer::Admin {
        state.stats()
    } else {
        state.stats().redacted()
    };
    let html = render(&state, &viewer, &stats);
    (
        [
            (header::CONTENT_TYPE, "text/html; charset=utf-8"),
            (header::CACHE_CONTROL, "no-store"),
        ],
        html,
    )
        .into_response()
}

/// Whether the request carries the admin token. With admin_token set, image names, errors and
/// upstream URLs are shown only to requests that carry it; with access control, a client sees
/// the repositories it may pull.
fn carries_admin_token(state: &AppState, request: &axum::extract::Request) -> bool {
    state
        .admin_token
        .as_ref()
        .is_some_and(|t| super::api::authorized(request, t) == Some(true))
}

/// The page: the cards, then the most pulled images, the upstreams and the recent errors.
fn render(state: &AppState, viewer: &Viewer, stats: &Stats) -> String {
    let c = &stats.counters;
    let ratio = |kind: &str| percent(c.totals.requests.get(kind).and_then(|k| k.hit_ratio));
    let (rows, upstreams, errors) = (
        most_pulled_rows(state, viewer),
        upstream_rows(&stats.upstreams),
        error_rows(&c.recent_upstream_errors, *viewer == Viewer::Admin),
    );
    let (budget, disk) = (budget(state, stats), disk(state, stats));
    format!(
        r#"<!doctype html>
<html lang="en"><head><meta charset="utf-8"><meta name="viewport" content="width=device-width">
<title>pullthrough</title>
<style>
body{{font:15px/1.4 system-ui,sans-serif;margin:2em auto;max-width:60em;padding:0 1em;color:#222}}
h1{{font-size:1.4em}} h2{{font-size:1.1em;margin-top:2em}}
.cards{{display:flex;flex-wrap:wrap;gap:1em}}
.card{{border:1px solid #ddd;border-radius:6px;padding:.8em 1.2em;min-width:10em}}
.card b{{display:block;font-size:1.6em}}
table{{border-collapse:collapse;width:100%}} td,th{{border-bottom:1px solid #eee;padding:.3em .5em;text-align:left}}
.num{{text-align:right}} .fresh{{color:#2a7}} .stale{{color:#c80}} .expired{{color:#c33}}
.offline{{background:#fdf3d8;border:1px solid #e8c060;border-radius:6px;padding:.6em 1em}}
</style></head><body>
<h1>pullthrough <small>→ {upstream}</small></h1>
{offline}<div class="cards">
<div class="card">manifest hit ratio<b id="hit-ratio">{hit_ratio}</b></div>
<div class="card">blob hit ratio<b id="blob-hit-ratio">{blob_ratio}</b></div>
<div class="card">pulls saved<b id="pulls-saved">{pulls_saved}</b></div>
<div class="card">rate-limit budget left<b id="budget">{budget}</b></div>
<div class="card">disk<b id="disk">{disk}</b></div>
</div>
<h2>Most pulled</h2>
<table id="top"><tr><th>image</th><th class="num">hits</th><th>freshness</th><th>digest</th><th>validated</th></tr>{rows}</table>
<h2>Upstreams</h2>
<table id="upstreams"><tr><th>registry</th><th>url</th><th class="num">manifest hit ratio</th><th class="num">pulls saved</th><th class="num">manifest GETs</th><th class="num">budget left</th><th class="num">tags</th></tr>{upstreams}</table>
<h2>Recent upstream errors</h2>
<table id="errors"><tr><th>when</th><th>upstream</th><th>what</th><th>status</th><th>error</th></tr>{errors}</table>
<p><a href="/_pullthrough/stats">stats</a> · <a href="/_pullthrough/cache">cache</a> · <a href="/metrics">metrics</a></p>
</body></html>
"#,
        upstream = esc(&stats.upstream),
        offline = if stats.offline {
            "<p id=\"offline\" class=\"offline\"><b>Offline</b>: nothing is asked upstream; cached content is served (tags whatever their age), the rest answers 503.</p>\n"
        } else {
            ""
        },
        hit_ratio = ratio("manifest"),
        blob_ratio = ratio("blob"),
        pulls_saved = c.totals.pulls_saved,
    )
}

/// The rate-limit budget left, as the default upstream last reported it.
fn budget(state: &AppState, stats: &Stats) -> String {
    match (stats.rate_limit.remaining, stats.rate_limit.limit) {
        (Some(r), Some(l)) => format!("{r} of {l}"),
        // Docker Hub reports its budget on manifest answers; most registries never do.
        _ if state.docker_hub_known() => "not reported yet".to_owned(),
        _ => "none reported by this registry".to_owned(),
    }
}

/// The blob store's use against `cache_max_disk`.
fn disk(state: &AppState, stats: &Stats) -> String {
    format!(
        "{} of {} ({} blobs)",
        size(stats.blob_store.bytes),
        size(state.disk_limit),
        stats.blob_store.blobs
    )
}

/// The 15 tags served most, over every upstream, that `viewer` may see.
fn most_pulled_rows(state: &AppState, viewer: &Viewer) -> String {
    if *viewer == Viewer::Nobody {
        return "<tr><td colspan=\"5\">shown with the admin token only</td></tr>".to_owned();
    }
    let mut all: Vec<_> = state
        .proxies()
        .flat_map(|p| p.most_pulled(15, |name| state.may_see(viewer, p, name)))
        .collect();
    all.sort_by_key(|v| std::cmp::Reverse(v.hits));
    all.truncate(15);
    let mut rows = String::new();
    for e in &all {
        let _ = write!(
            rows,
            "<tr><td>{}:{}</td><td class=\"num\">{}</td><td class=\"{}\">{}</td><td><code>{}</code></td><td>{}</td></tr>",
            esc(&e.repository),
            esc(&e.tag),
            e.hits,
            e.freshness,
            e.freshness,
            esc(e.digest.to_string().get(..19).unwrap_or_default()),
            esc(&e.validated_at)
        );
    }
    if rows.is_empty() {
        rows.push_str("<tr><td colspan=\"5\">nothing pulled yet</td></tr>");
    }
    rows
}

/// One row per upstream: its share of the hits, pulls saved, manifest GETs, budget and tags.
fn upstream_rows(upstreams: &[UpstreamStats]) -> String {
    let mut rows = String::new();
    for u in upstreams {
        let manifests = u.counters.requests.get("manifest");
        let gets: u64 = u
            .counters
            .upstream_requests
            .get("manifest_get")
            .map_or(0, |by_status| by_status.values().sum());
        let budget = match (u.rate_limit.remaining, u.rate_limit.limit) {
            (Some(r), Some(l)) => format!("{r} of {l}"),
            _ => "–".to_owned(),
        };
        let _ = write!(
            rows,
            "<tr><td>{}{}</td><td>{}</td><td class=\"num\">{}</td><td class=\"num\">{}</td><td class=\"num\">{}</td><td class=\"num\">{}</td><td class=\"num\">{}</td></tr>",
            esc(&u.host),
            if u.default { " (default)" } else { "" },
            if u.url.is_empty() {
                "–".to_owned()
            } else {
                esc(&u.url)
            },
            percent(manifests.and_then(|m| m.hit_ratio)),
            u.counters.pulls_saved,
            gets,
            budget,
            u.manifest_cache.tags,
        );
    }
    rows
}

/// The last upstream failures, newest first, for the admin only.
fn error_rows(errors: &[UpstreamFailure], admin: bool) -> String {
    if !admin {
        return "<tr><td colspan=\"5\">shown with the admin token only</td></tr>".to_owned();
    }
    let mut rows = String::new();
    for e in errors {
        let when = humantime::format_rfc3339_seconds(
            std::time::SystemTime::UNIX_EPOCH + std::time::Duration::from_secs(e.at),
        );
        let _ = write!(
            rows,
            "<tr><td>{when}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td></tr>",
            esc(&e.upstream),
            e.kind.as_str(),
            e.status.map_or("–".to_owned(), |s| s.to_string()),
            esc(&e.error)
        );
    }
    if rows.is_empty() {
        rows.push_str("<tr><td colspan=\"5\">none</td></tr>");
    }
    rows
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::metrics::UpstreamKind;

    #[test]
    fn text_is_escaped_for_html() {
        assert_eq!(
            esc(r#"<a href="x">&</a>"#),
            "&lt;a href=&quot;x&quot;&gt;&amp;&lt;/a&gt;"
        );
        assert_eq!(percent(Some(0.5)), "50.0%");
        assert_eq!(percent(None), "–");
    }

    #[test]
    fn errors_are_shown_to_the_admin_only_and_escaped() {
        let failure = UpstreamFailure {
            at: 0,
            upstream: "ghcr.io".to_owned(),
            kind: UpstreamKind::ManifestGet,
            status: None,
            error: "<script>".to_owned(),
        };
        assert_eq!(
            error_rows(std::slice::from_ref(&failure), true),
            "<tr><td>1970-01-01T00:00:00Z</td><td>ghcr.io</td><td>manifest_get</td><td>–</td>\
             <td>&lt;script&gt;</td></tr>"
        );
        assert!(error_rows(&[failure], false).contains("admin token only"));
        assert!(error_rows(&[], true).contains(">none<"));
    }
}
