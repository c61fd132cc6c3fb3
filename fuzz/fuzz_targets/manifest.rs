//! `platform_child` over arbitrary manifest-list bytes: never panics; a digest it returns is
//! valid and appears in the input. (Valid JSON is not asserted: serde_json skips the strings of
//! fields nobody reads without checking their UTF-8, so `serde_json::Value` can refuse a list
//! `platform_child` reads; harmless, as manifests are digest-verified bytes.)
#![no_main]

use libfuzzer_sys::fuzz_target;
use pullthrough::registry::{Digest, platform_child};

fuzz_target!(|bytes: &[u8]| {
    if let Some(digest) = platform_child(bytes) {
        let shown = digest.to_string();
        assert_eq!(shown.parse::<Digest>().as_ref(), Ok(&digest));
        // The digest is one of the list's strings (JSON escapes aside, which a digest never needs
        // once parsed, but the input may still use them).
        let text = String::from_utf8_lossy(bytes);
        assert!(
            text.contains(&shown) || text.contains('\\'),
            "{shown} not in input"
        );
    }
});
