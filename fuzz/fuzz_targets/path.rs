//! `/v2/<tail>` → `RegistryPath`: never panics; what parses renders back to the same tail
//! (or to `library/<tail>` for a Docker Hub short name) and re-parses to the same value.
#![no_main]

use libfuzzer_sys::fuzz_target;
use pullthrough::http::path::RegistryPath;
use pullthrough::registry::{Digest, Reference, RepoName};

fuzz_target!(|input: (bool, &str)| {
    let (docker_hub, tail) = input;
    let Ok(path) = RegistryPath::parse(tail, docker_hub) else {
        return;
    };
    let name = path.name();
    assert_eq!(
        RepoName::parse(name.as_str(), docker_hub).as_ref(),
        Ok(name)
    );
    let rendered = match &path {
        RegistryPath::Manifest { name, reference } => {
            let again = Reference::parse(&reference.to_string());
            assert_eq!(again.as_ref(), Ok(reference));
            format!("{name}/manifests/{reference}")
        }
        RegistryPath::Blob { name, digest } => {
            let again = digest.to_string().parse::<Digest>();
            assert_eq!(again.as_ref(), Ok(digest));
            format!("{name}/blobs/{digest}")
        }
        RegistryPath::TagsList { name } => format!("{name}/tags/list"),
    };
    assert!(
        rendered == tail || (docker_hub && rendered == format!("library/{tail}")),
        "{tail:?} rendered as {rendered:?}"
    );
    assert_eq!(
        RegistryPath::parse(&rendered, docker_hub).as_ref().ok(),
        Some(&path)
    );
});
