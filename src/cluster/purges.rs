//! Purges through one replica's cache API, announced to the others (a Redis stream).

use super::Cluster;
use std::sync::Arc;

/// The stream of purges, for the other replicas.
const PURGES: &str = "pullthrough:purges";

/// A purge done through one replica's cache API.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Purged {
    /// `tag`, `manifest`, `blob`, or `not_found` (remembered upstream 404s of a repository,
    /// or of one reference when `reference` is set).
    pub kind: String,
    /// The upstream (its host, as the cache API names it).
    pub upstream: String,
    /// The repository (empty for a blob).
    pub name: String,
    /// The tag or digest.
    pub reference: String,
}

/// Applies a purge another replica announced.
pub type ApplyPurge =
    Arc<dyn Fn(Purged) -> std::pin::Pin<Box<dyn Future<Output = ()> + Send>> + Send + Sync>;

impl Cluster {
    /// Tells the other replicas about a purge (they drop their copies within half a second).
    pub async fn announce(&self, purged: &Purged) {
        if !self.available() {
            return;
        }
        let mut add = redis::cmd("XADD");
        add.arg(PURGES)
            .arg("MAXLEN")
            .arg("~")
            .arg(10_000)
            .arg("*")
            .arg("origin")
            .arg(&self.me)
            .arg("kind")
            .arg(&purged.kind)
            .arg("upstream")
            .arg(&purged.upstream)
            .arg("name")
            .arg(&purged.name)
            .arg("reference")
            .arg(&purged.reference);
        if let Err(e) = self.query::<String>(&add).await {
            self.failed("announce", &e);
        }
    }

    /// Applies the purges other replicas announce, from now on, while this replica runs.
    pub fn follow_purges(self: &Arc<Self>, apply: ApplyPurge) {
        let cluster = Arc::downgrade(self);
        tokio::spawn(async move {
            let mut last: Option<String> = None;
            let mut first = true;
            loop {
                // The start of the stream is taken at once: purges announced from the moment
                // this replica serves apply to it.
                if !std::mem::take(&mut first) {
                    tokio::time::sleep(super::limits::LIMITS_EVERY).await;
                }
                let Some(cluster) = cluster.upgrade() else {
                    return;
                };
                if !cluster.available() {
                    continue;
                }
                let Some(from) = &last else {
                    // Start after whatever is in the stream now.
                    let newest: redis::RedisResult<redis::streams::StreamRangeReply> = cluster
                        .query(
                            redis::cmd("XREVRANGE")
                                .arg(PURGES)
                                .arg("+")
                                .arg("-")
                                .arg("COUNT")
                                .arg(1),
                        )
                        .await;
                    match newest {
                        Ok(reply) => {
                            last = Some(
                                reply
                                    .ids
                                    .first()
                                    .map_or_else(|| "0-0".to_owned(), |e| e.id.clone()),
                            );
                        }
                        Err(e) => cluster.failed("purges", &e),
                    }
                    continue;
                };
                let read: redis::RedisResult<Option<redis::streams::StreamReadReply>> = cluster
                    .query(
                        redis::cmd("XREAD")
                            .arg("COUNT")
                            .arg(1000)
                            .arg("STREAMS")
                            .arg(PURGES)
                            .arg(from),
                    )
                    .await;
                let entries = match read {
                    Ok(reply) => reply.map(|r| r.keys).unwrap_or_default(),
                    Err(e) => {
                        cluster.failed("purges", &e);
                        continue;
                    }
                };
                for entry in entries.into_iter().flat_map(|k| k.ids) {
                    last = Some(entry.id.clone());
                    let field = |f: &str| entry.get::<String>(f).unwrap_or_default();
                    if field("origin") == cluster.me {
                        continue;
                    }
                    apply(Purged {
                        kind: field("kind"),
                        upstream: field("upstream"),
                        name: field("name"),
                        reference: field("reference"),
                    })
                    .await;
                }
            }
        });
    }
}
