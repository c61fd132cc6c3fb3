//! The referrers API (distribution-spec v1.1 §Listing Referrers) for every upstream, those
//! without one included: a subject's list is the union by digest of the upstream's referrers
//! API answer (all its pages, bounded) and the index under the referrers tag schema
//! (`sha256-<hex>`), where verifiers of registries without the API (Docker Hub's cosign users)
//! push. Cached like a tag: fresh for `tag_ttl`, then served stale while one background
//! refresh runs (the tag revalidated by HEAD, fetched only when its digest moved), stale while
//! upstream fails within `max_stale`; one refresh at a time per subject. The `artifactType`
//! filter is applied here, to the one cached list.

use super::{Proxy, failure};
use crate::clock::now_ms;
use crate::error::Error;
use crate::manifests::{Freshness, Referrers, ReferrersEntry, TagIndex};
use crate::metrics::{Outcome, StaleCause};
use crate::registry::{ArtifactFilter, Digest, Reference, RepoName};
use crate::registry::{index_descriptors, referrers_tag, render_referrers};
use crate::upstream;
use bytes::Bytes;
use serde_json::Value;
use std::sync::Arc;
use std::time::{Duration, Instant};

/// The most pages of an upstream's referrers answer followed.
const MAX_PAGES: usize = 16;
/// The most bytes of one page, and of all pages together.
const MAX_PAGE_BYTES: usize = crate::upstream::MAX_MANIFEST_BYTES;
const MAX_BYTES: usize = 2 * MAX_PAGE_BYTES;

type Key = (RepoName, Digest);

/// A referrers answer.
#[derive(Debug, Clone)]
pub struct ReferrersAnswer {
    /// The image index.
    pub body: Bytes,
    /// How it was obtained.
    pub outcome: Outcome,
    /// An `artifactType` filter was applied.
    pub filtered: bool,
    /// Time spent waiting for upstream, if any.
    pub upstream_wait: Option<Duration>,
}

impl Proxy {
    /// The referrers of `subject` in `name`, filtered by `filter`.
    pub async fn referrers(
        self: &Arc<Self>,
        name: &RepoName,
        subject: &Digest,
        filter: &ArtifactFilter,
    ) -> Result<ReferrersAnswer, Error> {
        let started = Instant::now();
        let key = (name.clone(), subject.clone());
        let cached = self.manifests.referrers(name, subject).await;
        let (list, outcome) = match cached {
            // Offline: the cached list at any age, never refreshed; none is a 503.
            _ if self.offline() => match cached {
                Some(list) => {
                    let fresh =
                        self.policy.by_age(list.entry.validated_at, now_ms()) == Freshness::Fresh;
                    if fresh {
                        (list, Outcome::Hit)
                    } else {
                        self.upstream.metrics.stale(StaleCause::Offline);
                        (list, Outcome::Stale)
                    }
                }
                None => {
                    return Err(Error::Offline(format!(
                        "pullthrough is offline and the referrers of {name}@{subject} are not cached"
                    )));
                }
            },
            None => (Box::pin(self.refresh_referrers(key)).await?, Outcome::Miss),
            Some(list) => match self.policy.by_age(list.entry.validated_at, now_ms()) {
                Freshness::Fresh => (list, Outcome::Hit),
                Freshness::Stale => {
                    if self.referrers_backoff.contains_key(&key) {
                        self.upstream.metrics.stale(StaleCause::UpstreamError);
                    } else {
                        drop(self.refresh_referrers(key));
                        self.upstream.metrics.stale(StaleCause::Revalidating);
                    }
                    (list, Outcome::Stale)
                }
                Freshness::Expired => (
                    Box::pin(self.refresh_referrers(key)).await?,
                    Outcome::Revalidated,
                ),
            },
        };
        let body = if filter.is_active() {
            render_referrers(&list.list, filter)
        } else {
            list.body.clone()
        };
        Ok(ReferrersAnswer {
            body,
            outcome,
            filtered: filter.is_active(),
            upstream_wait: matches!(outcome, Outcome::Miss | Outcome::Revalidated)
                .then(|| started.elapsed()),
        })
    }

    /// Fetches a subject's referrers (single-flight per repository and subject, as its own
    /// task) and stores them; a failure rests the subject in `referrers_backoff`.
    fn refresh_referrers(
        self: &Arc<Self>,
        key: Key,
    ) -> impl Future<Output = Result<Arc<Referrers>, Error>> + use<> {
        let this = Arc::clone(self);
        self.referrers_flights.join(key.clone(), move || async move {
            // Again inside the flight: a list stored by one that ended after the caller looked.
            let previous = this.manifests.referrers(&key.0, &key.1).await;
            if let Some(list) = &previous
                && this.policy.by_age(list.entry.validated_at, now_ms()) == Freshness::Fresh
            {
                return Ok(Arc::clone(list));
            }
            match this.fetch_referrers(&key, previous).await {
                Ok(entry) => {
                    this.referrers_backoff.invalidate(&key);
                    Ok(this.manifests.set_referrers(&key.0, &key.1, entry))
                }
                Err(e) => {
                    tracing::warn!(repo = %key.0, subject = %key.1, error = %crate::error::Chain(&e), "referrers fetch failed");
                    this.referrers_backoff.insert(key, ());
                    Err(e)
                }
            }
        })
    }

    /// Asks upstream for both parts at once: the referrers API and the tag schema's HEAD.
    /// `previous`: the list cached now.
    async fn fetch_referrers(
        self: &Arc<Self>,
        (name, subject): &Key,
        previous: Option<Arc<Referrers>>,
    ) -> Result<ReferrersEntry, Error> {
        let previous_tag = previous.as_ref().and_then(|p| p.entry.tag.as_ref());
        let (api, tag) = tokio::join!(
            self.referrers_api(name, subject),
            self.referrers_tag_index(name, subject, previous_tag),
        );
        let ((api, truncated), tag) = (api?, tag?);
        let now = now_ms();
        Ok(ReferrersEntry {
            api,
            tag,
            fetched_at: previous.map_or(now, |p| p.entry.fetched_at),
            validated_at: now,
            truncated,
        })
    }

    /// The descriptors of every page of the upstream's referrers answer (`None`: it has no
    /// referrers API), and whether the answer was cut: at [`MAX_PAGES`] or [`MAX_BYTES`], or
    /// at a `Link` not followed.
    async fn referrers_api(
        &self,
        name: &RepoName,
        subject: &Digest,
    ) -> Result<(Option<Vec<Value>>, bool), Error> {
        let mut descriptors = Vec::new();
        let mut page: Option<String> = None;
        let mut bytes = 0usize;
        for n in 0..MAX_PAGES {
            let limit = MAX_BYTES.saturating_sub(bytes).min(MAX_PAGE_BYTES);
            let answer = match self
                .upstream
                .referrers(name, subject, page.as_deref(), limit)
                .await
            {
                Ok(answer) => answer,
                Err(e) if n == 0 && no_api(&e) => return Ok((None, false)),
                // A later page past the byte bound: what came so far is the list.
                Err(upstream::Error::BadResponse(why)) if n > 0 => {
                    tracing::warn!(repo = %name, %subject, why, "referrers answer cut short");
                    return Ok((Some(descriptors), true));
                }
                Err(e) => return Err(Error::from(e)),
            };
            bytes = bytes.saturating_add(answer.body.len());
            let Some(found) = index_descriptors(&answer.body) else {
                return Err(failure::invalid(
                    "the referrers API answered something that is no image index",
                ));
            };
            descriptors.extend(found);
            match answer.next {
                Some(next) => page = Some(next),
                None => return Ok((Some(descriptors), answer.refused)),
            }
        }
        tracing::warn!(repo = %name, %subject, pages = MAX_PAGES, "referrers answer cut at the page bound");
        Ok((Some(descriptors), true))
    }

    /// The index under the referrers tag schema: a HEAD, and a GET only when its digest is not
    /// `previous`'s (Docker Hub counts manifest GETs as pulls). `None` when there is no such
    /// tag upstream.
    async fn referrers_tag_index(
        self: &Arc<Self>,
        name: &RepoName,
        subject: &Digest,
        previous: Option<&TagIndex>,
    ) -> Result<Option<TagIndex>, Error> {
        let Some(tag) = referrers_tag(subject) else {
            return Ok(None);
        };
        let reference = Reference::Tag(tag);
        let head = match self.upstream.head_manifest(name, &reference).await {
            Ok(head) => head,
            Err(upstream::Error::NotFound { .. } | upstream::Error::Denied) => return Ok(None),
            Err(e) => return Err(failure::manifest(e)),
        };
        if let Some(previous) = previous {
            if head.digest.as_ref() == Some(&previous.digest) {
                return Ok(Some(previous.clone()));
            }
            if self.upstream.limits.below_reserve(self.reserve) {
                self.upstream.metrics.stale(StaleCause::Budget);
                return Ok(Some(previous.clone()));
            }
        }
        let manifest = match head.digest {
            Some(digest) => {
                // Upstream just showed it in this repository.
                self.manifests.grant(name, &digest);
                match self.manifests.get(&digest).await {
                    Some(m) => m,
                    None => self.fetch_digest(name, &digest).await?,
                }
            }
            None => {
                let m = self
                    .upstream
                    .get_manifest(name, &reference)
                    .await
                    .map_err(failure::manifest)?;
                self.manifests.grant(name, &m.digest);
                self.manifests.put(m).await
            }
        };
        Ok(Some(TagIndex {
            digest: manifest.digest.clone(),
            manifests: index_descriptors(&manifest.bytes).unwrap_or_default(),
        }))
    }
}

/// An upstream answer to the referrers API that means it has none: 404 (Docker Hub before
/// it had one, distribution 2.8), a refusal of the path (400, 405), or no access (then the
/// tag schema, asked with the same credential, says what there is).
fn no_api(e: &upstream::Error) -> bool {
    matches!(
        e,
        upstream::Error::NotFound { .. }
            | upstream::Error::Denied
            | upstream::Error::Rejected {
                status: 400 | 405,
                ..
            }
    )
}
