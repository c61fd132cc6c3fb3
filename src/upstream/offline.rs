//! The offline switch (`offline`, `PUT /_pullthrough/offline`): one value shared by every
//! upstream client, read where a request would leave the process (`Upstream::send`, the
//! `/v2/` ping, token requests, blob redirects), so while it is on nothing reaches a registry,
//! a token realm or a CDN, whatever path asked.

use std::sync::atomic::{AtomicBool, Ordering};

/// Whether pullthrough may ask upstream. Cheap to read on every upstream request.
#[derive(Debug, Default)]
pub struct Offline(AtomicBool);

impl Offline {
    /// A switch, on or off.
    pub fn new(on: bool) -> Offline {
        Offline(AtomicBool::new(on))
    }

    /// Whether pullthrough is offline now.
    pub fn is_on(&self) -> bool {
        self.0.load(Ordering::SeqCst)
    }

    /// Turns offline mode on or off; returns whether it was on.
    pub fn set(&self, on: bool) -> bool {
        self.0.swap(on, Ordering::SeqCst)
    }
}
