//! Purging tags, manifests, referrers lists and blobs, here and (in a cluster) on the other replicas.

use crate::manifests::{Missing, TagEntry};
use crate::proxy::Proxy;
use crate::registry::{Digest, Reference, RepoName, Tag};
use serde::Serialize;

/// What a purge removes (or, in a dry run, would remove).
#[derive(Debug, Clone, Default, Serialize)]
pub struct Purge {
    /// `repository:tag` entries.
    pub tags: Vec<String>,
    /// Manifest digests.
    pub manifests: Vec<Digest>,
    /// Blob digests.
    pub blobs: Vec<Digest>,
    /// Referrers lists, as `repository@subject`.
    pub referrers: Vec<String>,
    /// Upstream 404s the negative cache remembered (`repository:tag`, `repository@digest`):
    /// forgotten, so the next request asks upstream.
    pub not_found: Vec<String>,
}

impl Proxy {
    /// Purges every tag of a repository, and the manifests no other tag points to.
    pub async fn purge_repository(&self, name: &RepoName, dry_run: bool) -> Purge {
        let all = self.manifests.all_tags();
        let (gone, kept): (Vec<_>, Vec<_>) = all.into_iter().partition(|(n, _, _)| n == name);
        let manifests = orphaned(&gone, &kept);
        let tags = gone.into_iter().map(|(n, t, _)| (n, t)).collect();
        let mut purge = self
            .purge_tags_and_manifests(tags, manifests, dry_run)
            .await;
        purge.not_found = self.forget_missing(name, None, dry_run).await;
        for subject in self.manifests.referrers_subjects(name).await {
            let more = self.purge_referrers(name, &subject, dry_run).await;
            purge.referrers.extend(more.referrers);
        }
        purge
    }

    /// Purges the referrers list of `subject` in `name`.
    pub async fn purge_referrers(&self, name: &RepoName, subject: &Digest, dry_run: bool) -> Purge {
        let mut purge = Purge::default();
        if self.manifests.referrers(name, subject).await.is_some() {
            purge.referrers.push(format!("{}@{subject}", name.as_str()));
            if !dry_run {
                self.manifests.remove_referrers(name, subject).await;
                self.announce("referrers", name.as_str(), &subject.to_string())
                    .await;
            }
        }
        purge
    }

    /// Purges a tag (the manifest stays for other tags and digest pulls), or a manifest by
    /// digest with the tags of `name` that point to it.
    pub async fn purge_manifest(
        &self,
        name: &RepoName,
        reference: &Reference,
        dry_run: bool,
    ) -> Purge {
        let (tags, manifests) = match reference {
            Reference::Tag(t) => (self.known_tag(name, t).await, Vec::new()),
            Reference::Digest(d) => {
                let cached = self.manifests.has_manifest(d).await;
                let tags = self
                    .manifests
                    .all_tags()
                    .into_iter()
                    .filter(|(n, _, e)| n == name && e.digest == *d)
                    .map(|(n, t, _)| (n, t))
                    .collect();
                (tags, cached.then(|| d.clone()).into_iter().collect())
            }
        };
        let mut purge = self
            .purge_tags_and_manifests(tags, manifests, dry_run)
            .await;
        purge.not_found = self.forget_missing(name, Some(reference), dry_run).await;
        purge
    }

    /// Forgets the upstream 404s remembered for `reference` of `name` (a digest's referrers
    /// too), or (`None`) for the whole repository, here and on the other replicas.
    async fn forget_missing(
        &self,
        name: &RepoName,
        reference: Option<&Reference>,
        dry_run: bool,
    ) -> Vec<String> {
        let forgotten = self.forget_missing_here(name, reference, dry_run);
        if !dry_run {
            let reference = reference.map(Reference::to_string).unwrap_or_default();
            self.announce("not_found", name.as_str(), &reference).await;
        }
        forgotten
    }

    fn forget_missing_here(
        &self,
        name: &RepoName,
        reference: Option<&Reference>,
        dry_run: bool,
    ) -> Vec<String> {
        let negative = &self.manifests.negative;
        match reference {
            None => negative.forget(name, None, dry_run),
            Some(Reference::Tag(t)) => {
                negative.forget(name, Some(&Missing::Tag(t.clone())), dry_run)
            }
            Some(Reference::Digest(d)) => {
                [Missing::Manifest(d.clone()), Missing::Referrers(d.clone())]
                    .iter()
                    .flat_map(|what| negative.forget(name, Some(what), dry_run))
                    .collect()
            }
        }
    }

    /// Tag `tag` of `name`, if it is known here or (with object storage) to another replica.
    async fn known_tag(&self, name: &RepoName, tag: &Tag) -> Vec<(RepoName, Tag)> {
        if self.manifests.tag(name, tag).is_some()
            || self.manifests.shared_tag(name, tag).await.is_some()
        {
            vec![(name.clone(), tag.clone())]
        } else {
            Vec::new()
        }
    }

    /// Removes `tags` and then `manifests` (unless `dry_run`), here and on the other replicas.
    async fn purge_tags_and_manifests(
        &self,
        tags: Vec<(RepoName, Tag)>,
        manifests: Vec<Digest>,
        dry_run: bool,
    ) -> Purge {
        let purge = Purge {
            tags: tags
                .iter()
                .map(|(n, t)| format!("{}:{}", n.as_str(), t.as_str()))
                .collect(),
            manifests,
            blobs: Vec::new(),
            referrers: Vec::new(),
            not_found: Vec::new(),
        };
        if !dry_run {
            for (n, t) in &tags {
                self.manifests.remove_tag(n, t).await;
                self.announce("tag", n.as_str(), t.as_str()).await;
            }
            for d in &purge.manifests {
                self.manifests.remove_manifest(d).await;
                self.announce("manifest", "", &d.to_string()).await;
            }
        }
        purge
    }

    /// Tells the other replicas, in a cluster, to drop what this purge removed here.
    async fn announce(&self, kind: &str, name: &str, reference: &str) {
        if let Some(cluster) = self.replicas.cluster() {
            let purged = crate::cluster::Purged {
                kind: kind.to_owned(),
                upstream: self.name().to_owned(),
                name: name.to_owned(),
                reference: reference.to_owned(),
            };
            cluster.announce(&purged).await;
        }
    }

    /// Applies a purge another replica announced (its upstream is this proxy's): drops the
    /// copies here only, since the announcing replica deleted the shared ones itself.
    pub async fn apply_purge(&self, purged: &crate::cluster::Purged) {
        match purged.kind.as_str() {
            "tag" => {
                if let (Ok(name), Ok(tag)) = (
                    RepoName::parse(&purged.name, false),
                    Tag::parse(&purged.reference),
                ) {
                    self.manifests.forget_tag(&name, &tag).await;
                }
            }
            "manifest" => {
                if let Ok(digest) = purged.reference.parse::<Digest>() {
                    self.manifests.forget_manifest(&digest).await;
                }
            }
            "blob" => {
                if let Ok(digest) = purged.reference.parse::<Digest>() {
                    self.blobs.purge(&digest).await;
                }
            }
            "referrers" => {
                if let (Ok(name), Ok(subject)) = (
                    RepoName::parse(&purged.name, false),
                    purged.reference.parse::<Digest>(),
                ) {
                    self.manifests.remove_referrers(&name, &subject).await;
                }
            }
            "not_found" => {
                if let Ok(name) = RepoName::parse(&purged.name, false) {
                    let reference = match purged.reference.as_str() {
                        "" => None,
                        r => match Reference::parse(r) {
                            Ok(reference) => Some(reference),
                            Err(_) => return,
                        },
                    };
                    self.forget_missing_here(&name, reference.as_ref(), false);
                }
            }
            _ => {}
        }
    }

    /// Purges a blob from the store.
    pub async fn purge_blob(&self, digest: &Digest, dry_run: bool) -> Purge {
        let mut purge = Purge::default();
        if self.blobs.contains(digest) {
            purge.blobs.push(digest.clone());
            if !dry_run {
                self.drop_blob(digest).await;
                self.announce("blob", "", &digest.to_string()).await;
            }
        }
        purge
    }
}

/// The manifests the `gone` tags point to that no `kept` tag does, each once.
fn orphaned(gone: &[(RepoName, Tag, TagEntry)], kept: &[(RepoName, Tag, TagEntry)]) -> Vec<Digest> {
    let mut orphans: Vec<Digest> = Vec::new();
    for (_, _, entry) in gone {
        if !kept.iter().any(|(_, _, e)| e.digest == entry.digest)
            && !orphans.contains(&entry.digest)
        {
            orphans.push(entry.digest.clone());
        }
    }
    orphans
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::registry::MediaType;

    #[test]
    fn a_manifest_another_tag_still_points_to_is_kept() {
        let media_type = MediaType::from_content_type(MediaType::OCI_INDEX);
        let (shared, own) = (Digest::sha256(b"shared"), Digest::sha256(b"own"));
        let tag = |repository: &str, tag: &str, digest: &Digest| {
            (
                RepoName::parse(repository, true).unwrap(),
                Tag::parse(tag).unwrap(),
                TagEntry::new(digest, &media_type, 1),
            )
        };
        let gone = [
            tag("team/app", "1", &own),
            tag("team/app", "latest", &own),
            tag("team/app", "base", &shared),
        ];
        let kept = [tag("team/other", "base", &shared)];
        assert_eq!(orphaned(&gone, &kept), [own]);
    }
}
