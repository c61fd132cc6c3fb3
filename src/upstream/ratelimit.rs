//! Docker Hub's rate-limit headers (`ratelimit-limit: 100;w=21600`, `ratelimit-remaining`,
//! `docker-ratelimit-source`; protocol §2.4) and the `Retry-After` pause after a 429 (§2.7).

use parking_lot::Mutex;
use reqwest::header::HeaderMap;
use std::time::{Duration, Instant, SystemTime};

/// The last rate-limit state upstream reported for pullthrough's credential.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct RateLimit {
    /// Pulls allowed per window.
    pub limit: Option<u64>,
    /// Pulls left in the window.
    pub remaining: Option<u64>,
    /// Window length in seconds (`w=`).
    pub window_secs: Option<u64>,
    /// `docker-ratelimit-source`: the address or account upstream counts against.
    pub source: Option<String>,
    /// When the headers were last seen (seconds since the Unix epoch).
    pub observed_at: Option<u64>,
}

/// Parses `<count>;w=<seconds>` (other parameters ignored; several comma-separated policies
/// are allowed and the first is used).
pub fn parse_quota(value: &str) -> Option<(u64, Option<u64>)> {
    let first = value.split(',').next()?;
    let mut parts = first.split(';');
    let count = digits(parts.next()?)?;
    let window = parts.find_map(|p| p.trim().strip_prefix("w=").and_then(digits));
    Some((count, window))
}

/// A plain decimal number (digits only, surrounding spaces allowed), without overflow.
fn digits(s: &str) -> Option<u64> {
    let s = s.trim();
    (!s.is_empty() && s.bytes().all(|b| b.is_ascii_digit()))
        .then(|| s.parse().ok())
        .flatten()
}

/// Rate-limit state and the 429 pause for one upstream credential. The lock never poisons
/// (parking_lot), and nothing done under it can panic.
#[derive(Debug)]
pub struct RateLimits {
    state: Mutex<Inner>,
    /// The longest pause any 429 can impose (`max_upstream_pause`).
    max_pause: Duration,
}

impl Default for RateLimits {
    fn default() -> Self {
        RateLimits::new(Duration::from_secs(3600))
    }
}

#[derive(Debug, Default)]
struct Inner {
    last: RateLimit,
    /// No manifest GET goes out before this instant (after a 429).
    paused_until: Option<Instant>,
    /// The last pause was upstream's abuse limit: nothing at all goes out.
    pause_everything: bool,
}

impl RateLimits {
    /// No pause will exceed `max_pause`.
    pub fn new(max_pause: Duration) -> RateLimits {
        RateLimits {
            state: Mutex::default(),
            max_pause,
        }
    }

    /// Records whatever rate-limit headers a response carries.
    pub fn observe(&self, headers: &HeaderMap) {
        let get = |name: &str| headers.get(name).and_then(|v| v.to_str().ok());
        let limit = get("ratelimit-limit").and_then(parse_quota);
        let remaining = get("ratelimit-remaining").and_then(parse_quota);
        let source = get("docker-ratelimit-source");
        if limit.is_none() && remaining.is_none() && source.is_none() {
            return;
        }
        let mut s = self.state.lock();
        if let Some((count, window)) = limit {
            s.last.limit = Some(count);
            s.last.window_secs = window.or(s.last.window_secs);
        }
        if let Some((count, window)) = remaining {
            s.last.remaining = Some(count);
            s.last.window_secs = window.or(s.last.window_secs);
        }
        if let Some(source) = source {
            s.last.source = Some(source.to_owned());
        }
        s.last.observed_at = SystemTime::now()
            .duration_since(SystemTime::UNIX_EPOCH)
            .ok()
            .map(|d| d.as_secs());
    }

    /// `retry_after` as far as pullthrough honours it: at most `max_upstream_pause`.
    pub fn clamp(&self, retry_after: Option<Duration>) -> Option<Duration> {
        retry_after.map(|d| d.min(self.max_pause))
    }

    /// Records a 429: pause for `retry_after` (clamped to `max_upstream_pause`).
    pub fn pause(&self, retry_after: Option<Duration>, abuse: bool) {
        // A pull-limit 429 without Retry-After gives no time to wait for: the next GET asks
        // again (429s are not pulls). The abuse limit means "back off", 60 s unless told.
        let wait = match (self.clamp(retry_after), abuse) {
            (Some(wait), _) => wait,
            (None, true) => Duration::from_secs(60).min(self.max_pause),
            (None, false) => return,
        };
        let now = Instant::now();
        let Some(until) = now.checked_add(wait) else {
            return;
        };
        let mut s = self.state.lock();
        s.paused_until = Some(s.paused_until.map_or(until, |u| u.max(until)));
        s.pause_everything |= abuse;
    }

    /// How long manifest GETs (or, after an abuse 429, all requests) must still wait.
    pub fn paused_for(&self, is_manifest_get: bool) -> Option<Duration> {
        let mut s = self.state.lock();
        let until = s.paused_until?;
        let left = until.saturating_duration_since(Instant::now());
        if left.is_zero() {
            s.paused_until = None;
            s.pause_everything = false;
            return None;
        }
        (is_manifest_get || s.pause_everything).then_some(left)
    }

    /// True while the remaining budget is below `reserve` (a fraction of the limit).
    pub fn below_reserve(&self, reserve: f64) -> bool {
        let s = self.state.lock();
        match (s.last.limit, s.last.remaining) {
            (Some(limit), Some(remaining)) => (remaining as f64) < (limit as f64) * reserve,
            _ => false,
        }
    }

    /// The last state seen.
    pub fn snapshot(&self) -> RateLimit {
        self.state.lock().last.clone()
    }

    /// The pause in force: its end (ms since the Unix epoch) and whether it stops everything.
    pub fn pause_deadline(&self) -> Option<(u64, bool)> {
        let s = self.state.lock();
        let left = s.paused_until?.saturating_duration_since(Instant::now());
        let end = SystemTime::now().checked_add(left)?;
        let ms = end.duration_since(SystemTime::UNIX_EPOCH).ok()?.as_millis();
        Some((u64::try_from(ms).ok()?, s.pause_everything))
    }

    /// Takes a pause another replica recorded (its end in ms since the Unix epoch), clamped to
    /// `max_upstream_pause`; a shorter one than this replica's changes nothing.
    pub fn adopt_pause(&self, until_ms: u64, abuse: bool) {
        // From Redis: an absurd time must not overflow (the pause is clamped below anyway).
        let Some(end) = SystemTime::UNIX_EPOCH.checked_add(Duration::from_millis(until_ms)) else {
            return;
        };
        let Ok(left) = end.duration_since(SystemTime::now()) else {
            return;
        };
        let Some(until) = Instant::now().checked_add(left.min(self.max_pause)) else {
            return;
        };
        let mut s = self.state.lock();
        if s.paused_until.is_none_or(|u| u < until) {
            s.paused_until = Some(until);
            s.pause_everything |= abuse;
        }
    }

    /// Takes rate-limit headers another replica saw, when they are newer than this one's.
    pub fn adopt(&self, seen: RateLimit) {
        let mut s = self.state.lock();
        if seen.observed_at > s.last.observed_at {
            s.last = seen;
        }
    }
}

/// `Retry-After` in seconds or as an HTTP date.
pub fn retry_after(headers: &HeaderMap) -> Option<Duration> {
    let value = headers
        .get(reqwest::header::RETRY_AFTER)?
        .to_str()
        .ok()?
        .trim();
    if !value.is_empty() && value.bytes().all(|b| b.is_ascii_digit()) {
        // More seconds than a u64 holds is still "very long": clamped later, not ignored.
        return Some(Duration::from_secs(value.parse().unwrap_or(u64::MAX)));
    }
    let when = httpdate(value)?;
    Some(when.duration_since(SystemTime::now()).unwrap_or_default())
}

fn httpdate(value: &str) -> Option<SystemTime> {
    humantime::parse_rfc3339_weak(value).ok().or_else(|| {
        // IMF-fixdate: "Sun, 06 Nov 1994 08:49:37 GMT"
        let rest = value.split_once(", ")?.1;
        let mut it = rest.split(' ');
        let (day, mon, year, time) = (it.next()?, it.next()?, it.next()?, it.next()?);
        let months = [
            "Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec",
        ];
        let m = months.iter().position(|x| *x == mon)? + 1;
        humantime::parse_rfc3339_weak(&format!("{year}-{m:02}-{day:0>2} {time}")).ok()
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_pause_from_another_replica_is_clamped_and_never_overflows() {
        let r = RateLimits::new(Duration::from_secs(60));
        r.adopt_pause(u64::MAX, false);
        let left = r.paused_for(true).unwrap();
        assert!(left <= Duration::from_secs(60) && left > Duration::from_secs(50));
        assert!(
            r.paused_for(false).is_none(),
            "a pull-limit pause spares HEADs"
        );
        r.adopt_pause(0, true);
        assert!(
            r.paused_for(false).is_none(),
            "a pause in the past changes nothing"
        );
    }
    use reqwest::header::{HeaderName, HeaderValue};

    #[test]
    fn parses_quotas() {
        assert_eq!(parse_quota("100;w=21600"), Some((100, Some(21600))));
        assert_eq!(parse_quota(" 76 ; w=21600"), Some((76, Some(21600))));
        assert_eq!(parse_quota("5"), Some((5, None)));
        assert_eq!(
            parse_quota("100;w=21600, 2500;w=86400"),
            Some((100, Some(21600)))
        );
        assert_eq!(parse_quota("lots"), None);
        assert_eq!(parse_quota("+5;w=+1"), None);
    }

    fn headers(pairs: &[(&'static str, &str)]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for (k, v) in pairs {
            h.insert(
                HeaderName::from_static(k),
                HeaderValue::from_str(v).unwrap(),
            );
        }
        h
    }

    #[test]
    fn tracks_budget_and_pause() {
        let r = RateLimits::default();
        r.observe(&headers(&[
            ("ratelimit-limit", "100;w=21600"),
            ("ratelimit-remaining", "5;w=21600"),
            ("docker-ratelimit-source", "192.0.2.1"),
        ]));
        let s = r.snapshot();
        assert_eq!(
            (s.limit, s.remaining, s.window_secs, s.source.as_deref()),
            (Some(100), Some(5), Some(21600), Some("192.0.2.1"))
        );
        assert!(r.below_reserve(0.1));
        assert!(!r.below_reserve(0.01));
        assert_eq!(r.paused_for(true), None);
        r.pause(Some(Duration::from_secs(2)), false);
        assert!(r.paused_for(true).is_some());
        assert!(r.paused_for(false).is_none());
    }

    #[test]
    fn absurd_retry_after_values_are_clamped_not_panics() {
        let r = RateLimits::new(Duration::from_secs(3600));
        for value in [
            "18446744073709551615",
            "99999999999",
            "Fri, 31 Dec 9999 23:59:59 GMT",
        ] {
            let wait = retry_after(&headers(&[("retry-after", value)]));
            assert!(wait.is_some(), "{value}");
            r.pause(wait, false);
            let left = r.paused_for(true).unwrap();
            assert!(left <= Duration::from_secs(3600), "{value}: {left:?}");
            assert_eq!(r.clamp(wait), Some(Duration::from_secs(3600)), "{value}");
        }
        r.pause(Some(Duration::MAX), true);
        assert!(r.paused_for(false).unwrap() <= Duration::from_secs(3600));
    }

    #[test]
    fn parses_retry_after() {
        assert_eq!(
            retry_after(&headers(&[("retry-after", "60")])),
            Some(Duration::from_secs(60))
        );
        assert_eq!(
            retry_after(&headers(&[(
                "retry-after",
                "Sun, 06 Nov 1994 08:49:37 GMT"
            )])),
            Some(Duration::ZERO)
        );
        assert_eq!(retry_after(&headers(&[("retry-after", "soon")])), None);
    }
}
