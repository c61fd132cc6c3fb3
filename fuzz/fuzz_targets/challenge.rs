//! `WWW-Authenticate` parsing: total (never panics, always returns), schemes and keys are
//! non-empty lower-case tokens, and rendering the result back re-parses to the same challenges.
#![no_main]

use libfuzzer_sys::fuzz_target;
use pullthrough::upstream::auth::{Challenge, parse_challenges};

fn render(challenges: &[Challenge]) -> String {
    let mut out = Vec::new();
    for c in challenges {
        let params: Vec<String> = c
            .params
            .iter()
            .map(|(k, v)| format!("{k}=\"{}\"", v.replace('\\', "\\\\").replace('"', "\\\"")))
            .collect();
        if params.is_empty() {
            out.push(c.scheme.clone());
        } else {
            out.push(format!("{} {}", c.scheme, params.join(", ")));
        }
    }
    out.join(", ")
}

fuzz_target!(|value: &str| {
    let challenges = parse_challenges(value);
    assert!(challenges.len() <= value.len());
    for c in &challenges {
        assert!(!c.scheme.is_empty() && c.scheme.is_ascii());
        assert_eq!(c.scheme, c.scheme.to_ascii_lowercase());
        for k in c.params.keys() {
            assert!(!k.is_empty() && k.is_ascii());
            assert_eq!(*k, k.to_ascii_lowercase());
        }
    }
    let rendered = render(&challenges);
    assert_eq!(parse_challenges(&rendered), challenges, "{rendered:?}");
});
