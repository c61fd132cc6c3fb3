//! What a pull of a reference would ask upstream right now, worked out from the cache alone.

use crate::clock::now_ms;
use crate::manifests::{Freshness, Missing};
use crate::proxy::Proxy;
use crate::registry::{
    Contents, Digest, Reference, RepoName, Tag, platform_matches, referrers_tag,
};
use serde::Serialize;

/// One upstream request a pull would make.
#[derive(Debug, Clone, Serialize)]
pub struct Step {
    /// `GET` or `HEAD`.
    pub method: &'static str,
    /// `manifest`, `blob` or `referrers`.
    pub kind: &'static str,
    /// Tag or digest.
    pub reference: String,
    /// Why.
    pub why: &'static str,
}

/// What a pull of a reference would cost upstream now.
#[derive(Debug, Clone, Serialize)]
pub struct Explain {
    /// The platform a pull resolves an index to (none for a referrers request).
    #[serde(skip_serializing_if = "String::is_empty")]
    pub platform: String,
    /// Why the pull would fail, from the cache alone (the index lacks the platform).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    /// The upstream requests, in order.
    pub upstream_requests: Vec<Step>,
    /// Manifest GETs among them (what Docker Hub counts as pulls).
    pub manifest_gets: usize,
    /// Blob GETs among them.
    pub blob_gets: usize,
    /// Referrers API GETs among them (a referrers request's).
    #[serde(skip_serializing_if = "is_zero")]
    pub referrers_gets: usize,
    /// Bytes those blob GETs would fetch (as the manifests declare them).
    pub blob_bytes: u64,
    /// Whether more requests may follow that cannot be known without upstream (a manifest not
    /// cached yet names blobs that are not known yet).
    pub more_unknown: bool,
    /// One line.
    pub summary: String,
}

/// The upstream requests a pull would make, gathered while walking the cache.
#[derive(Debug, Default)]
struct Plan {
    steps: Vec<Step>,
    /// Bytes the blob GETs would fetch.
    blob_bytes: u64,
    /// A manifest not cached yet names requests that cannot be known.
    more_unknown: bool,
    /// Why the pull would fail.
    error: Option<String>,
}

impl Plan {
    fn step(
        &mut self,
        method: &'static str,
        kind: &'static str,
        reference: String,
        why: &'static str,
    ) {
        self.steps.push(Step {
            method,
            kind,
            reference,
            why,
        });
    }

    /// The answer for `platform`: the requests, their counts and a one-line summary.
    /// `docker_hub`: the upstream is known to be Docker Hub, which counts manifest GETs as pulls.
    fn explain(self, platform: &str, docker_hub: bool) -> Explain {
        let manifest_gets = self
            .steps
            .iter()
            .filter(|s| s.method == "GET" && s.kind == "manifest")
            .count();
        let blob_gets = self.steps.iter().filter(|s| s.kind == "blob").count();
        let referrers_gets = self.steps.iter().filter(|s| s.kind == "referrers").count();
        let heads = self.steps.iter().filter(|s| s.method == "HEAD").count();
        let summary = if let Some(error) = &self.error {
            error.clone()
        } else if self.steps.is_empty() {
            "no upstream request: everything is cached and fresh".to_owned()
        } else {
            // Docker Hub counts manifest GETs as pulls; other registries say what they count.
            let pulls = if docker_hub {
                " (Docker Hub pulls)"
            } else {
                ""
            };
            let referrers = if referrers_gets > 0 {
                format!("{referrers_gets} referrers GET(s), ")
            } else {
                String::new()
            };
            format!(
                "{referrers}{manifest_gets} manifest GET(s){pulls}, {heads} HEAD(s), {blob_gets} blob GET(s) ({} bytes){}",
                self.blob_bytes,
                if self.more_unknown {
                    ", and more once the missing manifests are known"
                } else {
                    ""
                }
            )
        };
        Explain {
            platform: platform.to_owned(),
            error: self.error,
            upstream_requests: self.steps,
            manifest_gets,
            blob_gets,
            referrers_gets,
            blob_bytes: self.blob_bytes,
            more_unknown: self.more_unknown,
            summary,
        }
    }
}

impl Proxy {
    /// What a pull of `reference` for `platform` would ask upstream now, from the cache alone.
    pub async fn explain(&self, name: &RepoName, reference: &Reference, platform: &str) -> Explain {
        let mut plan = Plan::default();
        let digest = match reference {
            Reference::Digest(d) => Some(d.clone()),
            Reference::Tag(t) => self.plan_tag(name, t, &mut plan),
        };
        if let Some(digest) = digest {
            self.plan_manifests(digest, platform, &mut plan).await;
        }
        if self.offline() && !plan.steps.is_empty() && plan.error.is_none() {
            plan.error = Some(
                "pullthrough is offline: these requests are not made, and a pull that needs them fails with 503"
                    .to_owned(),
            );
        }
        plan.explain(platform, self.upstream.known_docker_hub())
    }

    /// What a referrers request for `subject` would ask upstream now: nothing while its list
    /// is fresh, else the referrers API (every page: one counted) and a HEAD of the tag-schema
    /// tag, and a GET of that tag's index when it is new or moved (not known without upstream).
    pub async fn explain_referrers(&self, name: &RepoName, subject: &Digest) -> Explain {
        let mut plan = Plan::default();
        let tag = referrers_tag(subject).map_or_else(String::new, |t| t.to_string());
        let why = match self.manifests.referrers(name, subject).await {
            None => Some((
                "referrers list not cached",
                "referrers tag schema: is there an index",
            )),
            Some(list) => match self.policy.by_age(list.entry.validated_at, now_ms()) {
                Freshness::Fresh => None,
                Freshness::Stale
                    if self
                        .referrers_backoff
                        .contains_key(&(name.clone(), subject.clone())) =>
                {
                    None
                }
                Freshness::Stale => Some((
                    "list past tag_ttl: refreshed in the background (the request does not wait)",
                    "the tag-schema index revalidated in the same refresh",
                )),
                Freshness::Expired => Some((
                    "list past max_stale: the request waits for this refresh",
                    "the tag-schema index revalidated in the same refresh",
                )),
            },
        };
        if let Some((list_why, tag_why)) = why {
            plan.step("GET", "referrers", subject.to_string(), list_why);
            plan.step("HEAD", "manifest", tag, tag_why);
            plan.more_unknown = true;
        }
        plan.explain("", self.upstream.known_docker_hub())
    }

    /// The digest tag `tag` points to in the index, with the request its age calls for; a tag
    /// not cached is fetched, and what it points to is not known yet.
    fn plan_tag(&self, name: &RepoName, tag: &Tag, plan: &mut Plan) -> Option<Digest> {
        let Some(entry) = self.manifests.tag(name, tag) else {
            if self
                .manifests
                .negative
                .contains(name, &Missing::Tag(tag.clone()))
            {
                plan.error = Some(
                    "upstream answered 404 for this tag within negative_ttl: a pull is answered MANIFEST_UNKNOWN without asking upstream"
                        .to_owned(),
                );
                return None;
            }
            plan.step("GET", "manifest", tag.to_string(), "tag not cached");
            plan.more_unknown = true;
            return None;
        };
        match self.freshness(tag, entry.validated_at) {
            Freshness::Fresh => {}
            // Offline, nothing revalidates: the stale tag is served as it is.
            Freshness::Stale if self.offline() => {}
            // A revalidation that failed lately is not retried before its backoff ends.
            Freshness::Stale if self.backoff.contains_key(&(name.clone(), tag.clone())) => {}
            Freshness::Stale => plan.step(
                "HEAD",
                "manifest",
                tag.to_string(),
                "tag past tag_ttl: revalidated in the background (the pull does not wait)",
            ),
            Freshness::Expired => plan.step(
                "HEAD",
                "manifest",
                tag.to_string(),
                "tag past max_stale: the pull waits for this revalidation",
            ),
        }
        Some(entry.digest)
    }

    /// Walks from manifest `digest` to the blobs a pull fetches (an index resolves to one
    /// platform's manifest, whose blobs are then pulled), planning whatever is not cached.
    async fn plan_manifests(&self, digest: Digest, platform: &str, plan: &mut Plan) {
        let mut current = Some(digest);
        while let Some(d) = current.take() {
            let Some(manifest) = self.manifests.get(&d).await else {
                plan.step("GET", "manifest", d.to_string(), "manifest not cached");
                plan.more_unknown = true;
                break;
            };
            match Contents::parse(&manifest.bytes) {
                Some(Contents::Index(children)) => {
                    current = children
                        .into_iter()
                        .find(|c| {
                            c.platform
                                .as_deref()
                                .is_some_and(|p| platform_matches(p, platform))
                        })
                        .map(|c| c.digest);
                    if current.is_none() {
                        plan.error = Some(format!(
                            "the index has no manifest for {platform}: a pull for it fails"
                        ));
                    }
                }
                Some(Contents::Image(descriptors)) => {
                    for blob in descriptors {
                        if !self.blobs.contains(&blob.digest) {
                            // Sizes come from manifest JSON: never wrap.
                            plan.blob_bytes = plan.blob_bytes.saturating_add(blob.size);
                            plan.step("GET", "blob", blob.digest.to_string(), "blob not cached");
                        }
                    }
                }
                None => {}
            }
        }
    }
}

fn is_zero(n: &usize) -> bool {
    *n == 0
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_summary_counts_the_requests_by_kind() {
        let mut plan = Plan::default();
        assert_eq!(
            Plan::default().explain("linux/amd64", true).summary,
            "no upstream request: everything is cached and fresh"
        );
        plan.step("GET", "manifest", "latest".into(), "tag not cached");
        plan.step("HEAD", "manifest", "3.20".into(), "tag past tag_ttl");
        plan.step("GET", "blob", "sha256:ab".into(), "blob not cached");
        plan.step("GET", "blob", "sha256:cd".into(), "blob not cached");
        plan.blob_bytes = 30;
        plan.more_unknown = true;
        let explained = plan.explain("linux/amd64", true);
        assert_eq!(
            (
                explained.manifest_gets,
                explained.blob_gets,
                explained.blob_bytes
            ),
            (1, 2, 30)
        );
        assert_eq!(
            explained.summary,
            "1 manifest GET(s) (Docker Hub pulls), 1 HEAD(s), 2 blob GET(s) (30 bytes), and more \
             once the missing manifests are known"
        );
        let failing = Plan {
            error: Some("the index has no manifest for linux/s390x".into()),
            ..Plan::default()
        };
        let explained = failing.explain("linux/s390x", false);
        assert_eq!(
            explained.summary,
            "the index has no manifest for linux/s390x"
        );
    }
}
