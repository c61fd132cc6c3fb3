//! A referrers list as the cache API shows it.

use super::rfc3339;
use crate::clock::now_ms;
use crate::manifests::Freshness;
use crate::proxy::Proxy;
use crate::registry::{Digest, RepoName};
use serde::Serialize;

/// A cached referrers list.
#[derive(Debug, Clone, Serialize)]
pub struct ReferrersView {
    /// The upstream registry.
    pub upstream: String,
    /// Repository.
    pub repository: String,
    /// The subject's digest.
    pub subject: Digest,
    /// Whether a list is cached (the rest is absent when not).
    pub cached: bool,
    /// `fresh`, `stale` or `expired`, as for a tag.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub freshness: Option<&'static str>,
    /// When it was first fetched.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub fetched_at: Option<String>,
    /// When upstream last confirmed it.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub validated_at: Option<String>,
    /// Whether the upstream answered its referrers API (else only the tag schema counts).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub upstream_api: Option<bool>,
    /// The digest of the index under the referrers tag schema, when upstream has one.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub tag_index: Option<Digest>,
    /// The API's answer was cut at pullthrough's page or byte bound.
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    pub truncated: bool,
    /// The merged descriptors.
    pub manifests: Vec<serde_json::Value>,
}

impl Proxy {
    /// The cached referrers list of `subject` in `name`, for the cache API.
    pub async fn referrers_view(&self, name: &RepoName, subject: &Digest) -> ReferrersView {
        let cached = self.manifests.referrers(name, subject).await;
        let mut view = ReferrersView {
            upstream: self.upstream_name.clone(),
            repository: name.as_str().to_owned(),
            subject: subject.clone(),
            cached: cached.is_some(),
            freshness: None,
            fetched_at: None,
            validated_at: None,
            upstream_api: None,
            tag_index: None,
            truncated: false,
            manifests: Vec::new(),
        };
        if let Some(list) = cached {
            let entry = &list.entry;
            view.freshness = Some(match self.policy.by_age(entry.validated_at, now_ms()) {
                Freshness::Fresh => "fresh",
                Freshness::Stale => "stale",
                Freshness::Expired => "expired",
            });
            view.fetched_at = Some(rfc3339(entry.fetched_at));
            view.validated_at = Some(rfc3339(entry.validated_at));
            view.upstream_api = Some(entry.api.is_some());
            view.tag_index = entry.tag.as_ref().map(|t| t.digest.clone());
            view.truncated = entry.truncated;
            view.manifests = list.list.iter().map(|r| r.descriptor.clone()).collect();
        }
        view
    }
}
