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
        let link = exchange
            .response
            .headers()
            .get(header::LINK)
            .and_then(|v| v.to_str().ok());
        let next = link.and_then(|link| self.next_page(&first, link));
        if let (Some(link), None) = (link, &next)
            && link.contains("next")
        {
            tracing::warn!(repo = %name, %subject, link, "referrers Link not followed: not a next page on this upstream's origin and path");
        }
        let refused = link.is_some_and(|l| l.contains("next")) && next.is_none();
        let body = read_limited(exchange.response, limit).await?;
        Ok(ReferrersPage {
            body,
            next,
            refused,
        })
    }

    /// The next page a `Link` header names, as a path and query on this upstream: a target on
    /// another origin, or outside `first`'s path, is not followed (credentials go with it).
    fn next_page(&self, first: &str, link: &str) -> Option<String> {
        let (target, params) = link.trim().strip_prefix('<')?.split_once('>')?;
        if !params.contains("rel=\"next\"") && !params.contains("rel=next") {
            return None;
        }
        let url = self.base().join(target).ok()?;
        let same_origin = url.origin() == self.base().origin();
        (same_origin && url.path() == first).then(|| match url.query() {
            Some(q) => format!("{}?{q}", url.path()),
            None => url.path().to_owned(),
        })
    }
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
            assert_eq!(upstream.next_page(&first, &link), want, "{link}");
        }
    }
}
