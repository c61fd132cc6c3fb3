//! How far a cached tag answer can be trusted: the TTL policy, a pure function of the tag, the
//! time it was last validated and now (so tests call it directly; moka's clock is not involved).

use crate::registry::Tag;
use regex::RegexSet;
use std::time::Duration;

/// How far a tag answer can be trusted right now.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Freshness {
    /// Serve it without asking upstream.
    Fresh,
    /// Serve it, and revalidate in the background.
    Stale,
    /// Too old to serve without upstream's word.
    Expired,
}

/// The tag freshness rule: fresh for `ttl` after validation, then servable while revalidating
/// (or while upstream fails) for `max_stale` more; immutable tags are always fresh.
#[derive(Debug, Clone)]
pub struct TagPolicy {
    /// Freshness lifetime.
    pub ttl: Duration,
    /// Staleness allowed past `ttl`.
    pub max_stale: Duration,
    /// Tags that never move.
    pub immutable: RegexSet,
}

impl TagPolicy {
    /// Classifies an entry validated at `validated_at` (ms) as seen at `now` (ms).
    pub fn freshness(&self, tag: &Tag, validated_at: u64, now: u64) -> Freshness {
        if !self.immutable.is_empty() && self.immutable.is_match(tag.as_str()) {
            return Freshness::Fresh;
        }
        self.by_age(validated_at, now)
    }

    /// The same rule for what has no immutable form (a referrers list): by age alone.
    pub fn by_age(&self, validated_at: u64, now: u64) -> Freshness {
        let age = Duration::from_millis(now.saturating_sub(validated_at));
        if age < self.ttl {
            Freshness::Fresh
        } else if age - self.ttl < self.max_stale {
            Freshness::Stale
        } else {
            Freshness::Expired
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tag_freshness_follows_ttl_and_max_stale() {
        let policy = TagPolicy {
            ttl: Duration::from_secs(60),
            max_stale: Duration::from_secs(3600),
            immutable: RegexSet::new([r"^v\d+\.\d+\.\d+$"]).unwrap(),
        };
        let tag = |t: &str| Tag::parse(t).unwrap();
        let s = 1000;
        let cases = [
            ("latest", 0, Freshness::Fresh),
            ("latest", 59 * s, Freshness::Fresh),
            ("latest", 60 * s, Freshness::Stale),
            ("latest", 3659 * s, Freshness::Stale),
            ("latest", 3660 * s, Freshness::Expired),
            ("v1.2.3", 999_999 * s, Freshness::Fresh),
            ("v1.2", 999_999 * s, Freshness::Expired),
        ];
        for (t, age, want) in cases {
            assert_eq!(
                policy.freshness(&tag(t), 1_000_000_000, 1_000_000_000 + age),
                want,
                "{t} {age}"
            );
        }
        let blocking = TagPolicy {
            max_stale: Duration::ZERO,
            ..policy
        };
        assert_eq!(
            blocking.freshness(&tag("latest"), 0, 60 * s),
            Freshness::Expired
        );
    }
}
