//! The upstream's referrers API (distribution-spec v1.1 §Listing Referrers): one page per
//! request, and where its `Link` header says the next one is, followed only on the upstream's
//! own origin and under the same repository's referrers path.

use super::{Error, Upstream, read_limited};
use crate::metrics::UpstreamKind as Kind;
use crate::registry::{Digest, RepoName};
use bytes::Bytes;
use reqwest::Method;
use reqwest::header;

/// One page of the upstream's referrers answer.
#[derive(Debug)]
pub struct ReferrersPage {
    /// The body, at most `limit` bytes.
    pub body: Bytes,
    /// The path and query of the next page, when there is one on this upstream.
    pub next: Option<String>,
    /// A `Link` named a next page that is not followed (another origin or path).
    pub refused: bool,
}

impl Upstream {
    /// GETs a page of `subject`'s referrers: the first (`page` `None`) or the one a previous
    /// page's `next` named; the body is refused past `limit` bytes.
    pub async fn referrers(
        &self,
        name: &RepoName,
        subject: &Digest,
        page: Option<&str>,
        limit: usize,
    ) -> Result<ReferrersPage, Error> {
        let first = format!("/v2/{name}/referrers/{subject}");
        let path = page.unwrap_or(&first);
        let exchange = self
            .send(Method::GET, name, path, None, Kind::Referrers)
            .await?;
        let target = next_target(
            exchange
                .response
                .headers()
                .get_all(header::LINK)
                .iter()
                .filter_map(|v| v.to_str().ok()),
        )
        .map(str::to_owned);
        let next = target
            .as_deref()
            .and_then(|target| self.next_page(&first, target));
        let refused = target.is_some() && next.is_none();
        if refused {
            tracing::warn!(repo = %name, %subject, link = target.as_deref().unwrap_or_default(), "referrers Link not followed: not a next page on this upstream's origin and path");
        }
        let body = read_limited(exchange.response, limit).await?;
        Ok(ReferrersPage {
            body,
            next,
            refused,
        })
    }

    /// The next page `target` (a `Link`'s `rel="next"`) names, as a path and query on this
    /// upstream: a target on another origin, or outside `first`'s path, is not followed
    /// (credentials go with it).
    fn next_page(&self, first: &str, target: &str) -> Option<String> {
        let url = self.base().join(target).ok()?;
        let same_origin = url.origin() == self.base().origin();
        (same_origin && url.path() == first).then(|| match url.query() {
            Some(q) => format!("{}?{q}", url.path()),
            None => url.path().to_owned(),
        })
    }
}

/// The target of the link whose `rel` includes `next`, among every `Link` header value (RFC
/// 8288: comma-separated link-values, each `<target>` then `;`-separated parameters).
fn next_target<'a>(values: impl IntoIterator<Item = &'a str>) -> Option<&'a str> {
    for value in values {
        let mut rest = value;
        loop {
            rest = rest.trim_start_matches(|c: char| c == ',' || c.is_whitespace());
            let Some((target, tail)) = rest.strip_prefix('<').and_then(|r| r.split_once('>'))
            else {
                break;
            };
            let (params, after) = tail.split_at(tail.find(',').unwrap_or(tail.len()));
            let next = params.split(';').any(|param| {
                param.split_once('=').is_some_and(|(key, value)| {
                    key.trim().eq_ignore_ascii_case("rel")
                        && value
                            .trim()
                            .trim_matches('"')
                            .split_ascii_whitespace()
                            .any(|rel| rel.eq_ignore_ascii_case("next"))
                })
            });
            if next {
                return Some(target);
            }
            rest = after;
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Config;

    #[test]
    fn follows_next_links_only_on_its_own_origin_and_path() {
        let config = Config {
            upstream: "https://registry.example:5000".parse().unwrap(),
            ..Config::default()
        };
        let upstream = Upstream::new(
            &config,
            crate::metrics::Metrics::new(vec![]).for_upstream(0),
            std::sync::Arc::new(crate::upstream::Offline::new(false)),
        )
        .unwrap();
        let first = format!("/v2/a/b/referrers/sha256:{}", "a".repeat(64));
        let cases = [
            (
                format!("<{first}?last=x>; rel=\"next\""),
                Some(format!("{first}?last=x")),
            ),
            (
                format!("<https://registry.example:5000{first}?n=2>; rel=\"next\""),
                Some(format!("{first}?n=2")),
            ),
            (
                format!("<https://elsewhere.example{first}?n=2>; rel=\"next\""),
                None,
            ),
            (
                format!("<http://registry.example:5000{first}>; rel=\"next\""),
                None,
            ),
            ("</v2/other/referrers/x>; rel=\"next\"".to_owned(), None),
            (format!("<{first}?last=x>; rel=\"prev\""), None),
            ("garbage".to_owned(), None),
        ];
        for (link, want) in cases {
            let got = next_target([link.as_str()]).and_then(|t| upstream.next_page(&first, t));
            assert_eq!(got, want, "{link}");
        }
    }

    #[test]
    fn finds_the_next_link_among_several() {
        let cases: [(&[&str], Option<&str>); 6] = [
            (&[r#"</p1>; rel="prev", </p2>; rel="next""#], Some("/p2")),
            (
                &[r#"</p1>; rel="prev""#, r#"</p2>; rel="next""#],
                Some("/p2"),
            ),
            (&[r#"</a,b>; title="x"; rel=next"#], Some("/a,b")),
            (&[r#"</p>; rel="prev next""#], Some("/p")),
            (&[r#"</p>; rel="nextish""#, "garbage", "<unclosed"], None),
            (&[], None),
        ];
        for (values, want) in cases {
            assert_eq!(next_target(values.iter().copied()), want, "{values:?}");
        }
    }
}
