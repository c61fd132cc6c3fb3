//! Repository names, tags, references and digests: never panic; whatever parses displays as
//! the input (a Hub short name gains `library/`), stays within its length limit, and re-parses
//! to the same value. `Reference` agrees with `Tag` and `Digest`.
#![no_main]

use libfuzzer_sys::fuzz_target;
use pullthrough::registry::{Algorithm, Digest, Reference, RepoName, Tag};

fuzz_target!(|input: (bool, &str)| {
    let (docker_hub, s) = input;

    if let Ok(name) = RepoName::parse(s, docker_hub) {
        let shown = name.to_string();
        assert!(shown.len() <= 255, "{shown:?}");
        assert!(shown == s || (docker_hub && !s.contains('/') && shown == format!("library/{s}")));
        assert_eq!(RepoName::parse(&shown, docker_hub).as_ref(), Ok(&name));
        if shown.contains('/') {
            assert_eq!(RepoName::parse(&shown, !docker_hub).as_ref(), Ok(&name));
        }
    }

    let tag = Tag::parse(s);
    if let Ok(t) = &tag {
        assert_eq!(t.to_string(), s);
        assert!(!s.is_empty() && s.len() <= 128);
        assert_eq!(Tag::parse(t.as_str()).as_ref(), Ok(t));
    }

    let digest = s.parse::<Digest>();
    if let Ok(d) = &digest {
        assert_eq!(d.to_string(), s);
        let hex_len = match d.algorithm() {
            Algorithm::Sha256 => 64,
            Algorithm::Sha512 => 128,
        };
        assert_eq!(d.hex().len(), hex_len);
        assert_eq!(d.to_string().parse::<Digest>().as_ref(), Ok(d));
    }

    match Reference::parse(s) {
        Ok(r) => {
            assert_eq!(r.to_string(), s);
            match &r {
                Reference::Tag(t) => assert_eq!(tag.as_ref(), Ok(t)),
                Reference::Digest(d) => assert_eq!(digest.as_ref(), Ok(d)),
            }
            assert_eq!(Reference::parse(&r.to_string()), Ok(r));
        }
        Err(_) if s.contains(':') => assert!(digest.is_err()),
        Err(_) => assert!(tag.is_err()),
    }
});
