//! Checking what the store holds: the background scrub, which re-hashes every stored blob at
//! `scrub_rate` once per `scrub_interval`, and `verify_on_serve`, which hashes a blob as it is
//! served and holds back its last chunk until the digest matched.

use super::BlobStore;
use crate::registry::{Digest, Verifier};
use bytes::Bytes;
use futures_util::{Stream, StreamExt};
use std::pin::Pin;
use std::sync::{Arc, Weak};

/// A blob body stream.
pub(super) type BoxStream = Pin<Box<dyn Stream<Item = std::io::Result<Bytes>> + Send>>;

/// Re-hashes every stored blob once per `scrub_interval`, at most `scrub_rate` bytes a second,
/// dropping those that no longer match their digest.
pub(super) fn spawn_scrub(store: Weak<BlobStore>) {
    tokio::spawn(async move {
        loop {
            let Some(interval) = store.upgrade().map(|s| s.limits.scrub_interval) else {
                return;
            };
            tokio::time::sleep(interval).await;
            let pass = store.clone();
            let _ = tokio::task::spawn_blocking(move || scrub_pass(&pass)).await;
        }
    });
}

/// One pass over the store; stops early when the store is gone.
fn scrub_pass(store: &Weak<BlobStore>) {
    let Some(digests) = store
        .upgrade()
        .map(|s| s.index.lock().keys().cloned().collect::<Vec<Digest>>())
    else {
        return;
    };
    let (mut checked, mut dropped) = (0usize, 0usize);
    for digest in digests {
        let Some(store) = store.upgrade() else { return };
        checked += 1;
        if !store.rehash_at(&digest, store.limits.scrub_rate) {
            dropped += 1;
        }
    }
    tracing::info!(checked, dropped, "blob store scrub finished");
}

/// `stream` (a whole stored blob) hashed as it passes; its last chunk is sent only once the
/// digest matched. On a mismatch the stream ends in an error and the blob is dropped.
pub(super) fn verified(
    stream: impl Stream<Item = std::io::Result<Bytes>> + Send + 'static,
    store: Arc<BlobStore>,
    digest: Digest,
) -> impl Stream<Item = std::io::Result<Bytes>> + Send {
    let verifier = Verifier::new(digest.algorithm());
    let state = (Box::pin(stream), verifier, None::<Bytes>, false);
    futures_util::stream::unfold(state, move |(mut stream, mut verifier, held, done)| {
        let (store, digest) = (Arc::clone(&store), digest.clone());
        async move {
            if done {
                return None;
            }
            match stream.next().await {
                Some(Ok(chunk)) => {
                    verifier.update(&chunk);
                    match held {
                        Some(previous) => {
                            Some((Ok(previous), (stream, verifier, Some(chunk), false)))
                        }
                        None => {
                            // Nothing to send yet: hold this one and ask for the next.
                            Some((Ok(Bytes::new()), (stream, verifier, Some(chunk), false)))
                        }
                    }
                }
                Some(Err(e)) => Some((Err(e), (stream, verifier, None, true))),
                None => {
                    let got = verifier.clone().finish();
                    if got == digest {
                        held.map(|last| (Ok(last), (stream, verifier, None, true)))
                    } else {
                        tracing::warn!(%digest, %got, "a stored blob no longer matches its digest; dropping it");
                        store.remove_async(&digest).await;
                        Some((
                            Err(std::io::Error::other("stored blob failed verification")),
                            (stream, verifier, None, true),
                        ))
                    }
                }
            }
        }
    })
}
