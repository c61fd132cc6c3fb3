//! Token responses (`{"token": ..., "access_token": ..., "expires_in": ...}`): never panic; a
//! token, when there is one, is non-empty and expires in the future (at least after the 60 s
//! floor less its margin).
//! The lifetime is clamped to a day, so an absurd `expires_in` cannot overflow the clock.
#![no_main]

use libfuzzer_sys::fuzz_target;
use pullthrough::upstream::auth::parse_token_response;
use std::time::{Duration, Instant};

fuzz_target!(|body: &[u8]| {
    let before = Instant::now();
    if let Some(token) = parse_token_response(body) {
        assert!(!token.secret.is_empty());
        assert!(token.expires_at >= before + Duration::from_secs(54));
        assert!(token.expires_at <= Instant::now() + Duration::from_secs(24 * 3600));
    }
});
