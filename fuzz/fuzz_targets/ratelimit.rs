//! Rate-limit headers and `Retry-After`: `parse_quota` and `retry_after` never panic, and neither
//! does feeding any header values through `RateLimits` (observe, pause, paused_for).
//!
//! Input: one flag byte (bit 0: abuse-limit 429), then lines: a quota for `parse_quota`, then
//! the `Retry-After`, `ratelimit-limit`, `ratelimit-remaining` and `docker-ratelimit-source`
//! values (a missing line means no such header; a value `HeaderValue` rejects is skipped).
#![no_main]

use libfuzzer_sys::fuzz_target;
use pullthrough::upstream::ratelimit::{RateLimits, parse_quota, retry_after};
use reqwest::header::{HeaderMap, HeaderName, HeaderValue};

fuzz_target!(|data: &[u8]| {
    let Some((&flags, rest)) = data.split_first() else {
        return;
    };
    let abuse = flags & 1 == 1;
    let mut lines = rest.split(|b| *b == b'\n');
    let quota = String::from_utf8_lossy(lines.next().unwrap_or_default());
    if let Some((count, window)) = parse_quota(&quota) {
        let canonical = match window {
            Some(w) => format!("{count};w={w}"),
            None => count.to_string(),
        };
        assert_eq!(parse_quota(&canonical), Some((count, window)));
    }

    let mut headers = HeaderMap::new();
    for name in [
        "retry-after",
        "ratelimit-limit",
        "ratelimit-remaining",
        "docker-ratelimit-source",
    ] {
        if let Some(v) = lines.next().and_then(|v| HeaderValue::from_bytes(v).ok()) {
            headers.insert(HeaderName::from_static(name), v);
        }
    }

    let limits = RateLimits::default();
    limits.observe(&headers);
    let wait = retry_after(&headers);
    limits.pause(wait, abuse);
    if let (Some(left), Some(wait)) = (limits.paused_for(true), wait) {
        assert!(left <= wait);
    }
    let _ = limits.paused_for(false);
    let _ = limits.below_reserve(f64::from(flags) / 255.0);
    let _ = limits.snapshot();
});
