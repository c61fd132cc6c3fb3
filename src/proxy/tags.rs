//! Tags lists (distribution-spec §Listing Tags): `n` and `last` passed upstream, the `Link`
//! header rewritten to point at pullthrough, a short-lived cache, and the last good answer
//! served (within `max_stale`) when upstream fails.

use super::Proxy;
use crate::error::Error;
use crate::metrics::{Outcome, StaleCause};
use crate::registry::{RepoName, Tag};
use bytes::Bytes;
use std::sync::Arc;
use std::time::Instant;

/// One page of a tags list.
#[derive(Debug, Clone)]
pub struct TagsPage {
    /// The JSON body, as upstream sent it.
    pub body: Bytes,
    /// The `Link` to the next page, relative to pullthrough.
    pub link: Option<String>,
    /// When upstream sent it.
    pub fetched_at: Instant,
    /// Hit (fresh copy), miss (fetched for this request) or stale (upstream failed).
    pub outcome: Outcome,
}

/// Which page is asked for.
#[derive(Debug, Clone, Default, PartialEq, Eq, Hash)]
pub struct TagsQuery {
    /// `n`: page size.
    pub n: Option<u32>,
    /// `last`: the tag the page starts after.
    pub last: Option<Tag>,
}

impl TagsQuery {
    /// Parses `n` and `last` from a query string (other parameters, like `ns`, are ignored).
    pub fn parse(query: Option<&str>) -> Result<TagsQuery, Error> {
        let mut q = TagsQuery {
            n: None,
            last: None,
        };
        for (key, value) in url::form_urlencoded::parse(query.unwrap_or_default().as_bytes()) {
            match &*key {
                "n" => q.n = Some(value.parse().map_err(|_| Error::PaginationInvalid)?),
                "last" => {
                    q.last = Some(Tag::parse(&value).map_err(|e| Error::TagInvalid(e.to_string()))?)
                }
                _ => {}
            }
        }
        Ok(q)
    }

    /// The query sent upstream, keys sorted as distribution writes them.
    fn upstream_query(&self) -> String {
        let mut out = url::form_urlencoded::Serializer::new(String::new());
        if let Some(last) = &self.last {
            out.append_pair("last", last.as_str());
        }
        if let Some(n) = self.n {
            out.append_pair("n", &n.to_string());
        }
        out.finish()
    }
}

impl Proxy {
    /// Bytes held by the tags-list cache (bounded by `tags_list_cache_bytes`).
    pub fn tags_cache_bytes(&self) -> u64 {
        self.tag_pages.run_pending_tasks();
        self.tag_pages.weighted_size()
    }

    /// A tags-list page: fresh from cache, else from upstream (one request per page at a
    /// time), else the last good copy while upstream fails.
    pub async fn tags_list(
        self: &Arc<Self>,
        name: &RepoName,
        query: TagsQuery,
    ) -> Result<TagsPage, Error> {
        if query.n == Some(0) {
            // dist-spec: n=0 is an empty list without a Link, whatever the repository holds.
            let body = serde_json::json!({ "name": name.as_str(), "tags": [] }).to_string();
            return Ok(TagsPage {
                body: body.into(),
                link: None,
                fetched_at: Instant::now(),
                outcome: Outcome::Hit,
            });
        }
        let key = (name.clone(), query.clone());
        let cached = self.tag_pages.get(&key);
        if let Some(page) = &cached
            && page.fetched_at.elapsed() < self.tags_ttl
        {
            return Ok((**page).clone());
        }
        if self.offline() {
            // The last copy, while the cache keeps it (`tags_list_ttl` + `max_stale`).
            return cached
                .inspect(|_| self.upstream.metrics.stale(StaleCause::Offline))
                .map(|p| TagsPage {
                    outcome: Outcome::Stale,
                    ..(*p).clone()
                })
                .ok_or_else(|| {
                    Error::Offline(format!(
                        "pullthrough is offline and the tags list of {name} is not cached"
                    ))
                });
        }
        let this = Arc::clone(self);
        // A page stored by a fetch that ended after this request looked.
        let stored = |key: &_| {
            let page = self.tag_pages.get(key)?;
            (page.fetched_at.elapsed() < self.tags_ttl).then_some(page)
        };
        let flight = self
            .tag_page_flights
            .join_unless(&key, stored, move |key| async move {
                let (name, query) = key;
                let (body, link) = this
                    .upstream
                    .tags_list(&name, &query.upstream_query())
                    .await
                    .map_err(Error::from)?;
                let link = link.map(|l| relative_link(&l));
                let page = Arc::new(TagsPage {
                    body,
                    link,
                    fetched_at: Instant::now(),
                    outcome: Outcome::Hit,
                });
                this.tag_pages.insert((name, query), Arc::clone(&page));
                Ok(page)
            });
        // A little under the deadline, so the stale copy beats the request-wide deadline.
        match tokio::time::timeout(self.deadline.mul_f64(0.9), flight).await {
            Ok(Ok(page)) => Ok(TagsPage {
                outcome: Outcome::Miss,
                ..(*page).clone()
            }),
            Ok(Err(e @ Error::NameUnknown)) => Err(e),
            Ok(Err(e)) => cached
                .inspect(|_| self.upstream.metrics.stale(StaleCause::UpstreamError))
                .map(|p| TagsPage {
                    outcome: Outcome::Stale,
                    ..(*p).clone()
                })
                .ok_or(e),
            Err(_) => cached
                .inspect(|_| self.upstream.metrics.stale(StaleCause::UpstreamError))
                .map(|p| TagsPage {
                    outcome: Outcome::Stale,
                    ..(*p).clone()
                })
                .ok_or(Error::GatewayTimeout),
        }
    }
}

/// Makes upstream's `Link` relative (`</v2/...>; rel="next"`) so clients page through
/// pullthrough, not around it.
fn relative_link(link: &str) -> String {
    let Some((target, rest)) = link
        .trim()
        .strip_prefix('<')
        .and_then(|l| l.split_once('>'))
    else {
        return link.to_owned();
    };
    let relative = match url::Url::parse(target) {
        Ok(url) => match url.query() {
            Some(q) => format!("{}?{q}", url.path()),
            None => url.path().to_owned(),
        },
        Err(_) => target.to_owned(),
    };
    format!("<{relative}>{rest}")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rewrites_links_to_relative() {
        assert_eq!(
            relative_link(
                r#"<https://registry-1.docker.io/v2/library/a/tags/list?last=b&n=2>; rel="next""#
            ),
            r#"</v2/library/a/tags/list?last=b&n=2>; rel="next""#
        );
        assert_eq!(
            relative_link(r#"</v2/a/tags/list?last=b&n=2>; rel="next""#),
            r#"</v2/a/tags/list?last=b&n=2>; rel="next""#
        );
    }

    #[test]
    fn parses_queries() {
        assert_eq!(
            TagsQuery::parse(Some("n=5&last=v1&ns=docker.io"))
                .unwrap()
                .upstream_query(),
            "last=v1&n=5"
        );
        assert!(matches!(
            TagsQuery::parse(Some("n=-1")),
            Err(Error::PaginationInvalid)
        ));
        assert!(matches!(
            TagsQuery::parse(Some("n=x")),
            Err(Error::PaginationInvalid)
        ));
        assert!(matches!(
            TagsQuery::parse(Some("last=..")),
            Err(Error::TagInvalid(_))
        ));
        assert_eq!(TagsQuery::parse(None).unwrap().upstream_query(), "");
    }
}
