//! Rate limits shared by the replicas: one 429 pause and one budget per upstream.

use super::Cluster;
use crate::clock::now_ms;
use std::sync::Arc;
use std::time::Duration;

/// How often a replica shares its upstream budget and 429 pause, and takes the others'.
pub(super) const LIMITS_EVERY: Duration = Duration::from_millis(500);

impl Cluster {
    /// Shares `upstream`'s rate-limit state with the other replicas while this one runs: a
    /// 429 pause (and its `Retry-After`) and the budget upstream last reported apply to every
    /// replica, within half a second.
    pub fn share_limits(self: &Arc<Self>, host: &str, upstream: Arc<crate::upstream::Upstream>) {
        let (pause_key, budget_key) = (
            format!("pullthrough:pause:{host}"),
            format!("pullthrough:budget:{host}"),
        );
        let cluster = Arc::downgrade(self);
        tokio::spawn(async move {
            let mut shared_seen = None;
            loop {
                tokio::time::sleep(LIMITS_EVERY).await;
                let Some(cluster) = cluster.upgrade() else {
                    return;
                };
                if !cluster.available() {
                    continue;
                }
                cluster
                    .sync_limits(&pause_key, &budget_key, &upstream, &mut shared_seen)
                    .await;
            }
        });
    }

    async fn sync_limits(
        &self,
        pause_key: &str,
        budget_key: &str,
        upstream: &crate::upstream::Upstream,
        shared_seen: &mut Option<u64>,
    ) {
        let limits = &upstream.limits;
        // The later pause wins: this replica's goes out, or the others' comes in.
        let theirs: Option<(u64, bool)> = match self
            .query::<Option<String>>(redis::cmd("GET").arg(pause_key))
            .await
        {
            Ok(value) => value.and_then(|v| {
                let mut parts = v.split(' ');
                let until = parts.next()?.parse::<u64>().ok()?;
                Some((until, parts.next() == Some("1")))
            }),
            Err(e) => return self.failed("pause", &e),
        };
        match (limits.pause_deadline(), theirs) {
            (Some((until, abuse)), theirs) if theirs.is_none_or(|(t, _)| t < until) => {
                let ttl = until.saturating_sub(now_ms()).max(1);
                let mut set = redis::cmd("SET");
                set.arg(pause_key)
                    .arg(format!("{until} {}", u8::from(abuse)))
                    .arg("PX")
                    .arg(ttl);
                if let Err(e) = self.query::<()>(&set).await {
                    self.failed("pause", &e);
                }
            }
            (_, Some((until, abuse))) => limits.adopt_pause(until, abuse),
            _ => {}
        }
        // The budget: the newest observation wins, in both directions.
        let mine = limits.snapshot();
        let theirs: Option<crate::upstream::ratelimit::RateLimit> = self
            .query::<Option<String>>(redis::cmd("GET").arg(budget_key))
            .await
            .ok()
            .flatten()
            .and_then(|v| serde_json::from_str(&v).ok());
        match theirs {
            Some(theirs) if theirs.observed_at > mine.observed_at => limits.adopt(theirs),
            _ if mine.observed_at.is_some() && mine.observed_at != *shared_seen => {
                if let Ok(json) = serde_json::to_string(&mine) {
                    let mut set = redis::cmd("SET");
                    set.arg(budget_key).arg(json).arg("EX").arg(24 * 3600);
                    if self.query::<()>(&set).await.is_ok() {
                        *shared_seen = mine.observed_at;
                    }
                }
            }
            _ => {}
        }
    }
}
