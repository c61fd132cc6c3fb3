//! Repository names (distribution-spec §Pulling manifests; distribution/reference
//! `regexp.go`), with Docker Hub's implied `library/` namespace (protocol §2.9).

use std::fmt;
use std::sync::Arc;

/// Longest accepted repository name (distribution/reference `RepositoryNameTotalLengthMax`).
const MAX_NAME_LEN: usize = 255;

/// A validated repository path such as `library/alpine` or `a/b/c`.
#[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct RepoName(Arc<str>);

/// Why a string is not a repository name.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum NameError {
    /// Empty name or empty path component.
    #[error("repository name has an empty path component")]
    EmptyComponent,
    /// Longer than 255 characters.
    #[error("repository name is longer than {MAX_NAME_LEN} characters")]
    TooLong,
    /// Upper-case letters are not allowed in the path.
    #[error("repository name must be lower case")]
    Uppercase,
    /// A component breaks `[a-z0-9]+((\.|_|__|-+)[a-z0-9]+)*`.
    #[error("repository name component {0:?} is invalid")]
    BadComponent(String),
}

impl RepoName {
    /// Parses `s`; when `docker_hub` is set a one-component name gets the `library/` prefix,
    /// as Docker clients do before they talk to Hub.
    pub fn parse(s: &str, docker_hub: bool) -> Result<RepoName, NameError> {
        if s.len() > MAX_NAME_LEN {
            return Err(NameError::TooLong);
        }
        for component in s.split('/') {
            check_component(component)?;
        }
        if docker_hub && !s.contains('/') {
            let full = format!("library/{s}");
            if full.len() > MAX_NAME_LEN {
                return Err(NameError::TooLong);
            }
            return Ok(RepoName(full.into()));
        }
        Ok(RepoName(s.into()))
    }

    /// The name as it appears in URLs.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

fn check_component(c: &str) -> Result<(), NameError> {
    if c.is_empty() {
        return Err(NameError::EmptyComponent);
    }
    if c.bytes().any(|b| b.is_ascii_uppercase()) {
        return Err(NameError::Uppercase);
    }
    let bad = || NameError::BadComponent(c.to_owned());
    let bytes = c.as_bytes();
    let alnum = |b: u8| b.is_ascii_lowercase() || b.is_ascii_digit();
    if !alnum(bytes[0]) || !alnum(bytes[bytes.len() - 1]) {
        return Err(bad());
    }
    // Between alphanumeric runs: one '.', one or two '_', or any number of '-'.
    let mut i = 0;
    while i < bytes.len() {
        if alnum(bytes[i]) {
            i += 1;
            continue;
        }
        let start = i;
        while i < bytes.len() && !alnum(bytes[i]) {
            i += 1;
        }
        let sep = &c[start..i];
        let ok = sep == "." || sep == "_" || sep == "__" || sep.bytes().all(|b| b == b'-');
        if !ok {
            return Err(bad());
        }
    }
    Ok(())
}

impl fmt::Display for RepoName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl fmt::Debug for RepoName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(self, f)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_names() {
        let long = "a".repeat(256);
        let cases: &[(&str, bool, Result<&str, NameError>)] = &[
            ("library/alpine", true, Ok("library/alpine")),
            ("alpine", true, Ok("library/alpine")),
            ("alpine", false, Ok("alpine")),
            ("a/b/c", true, Ok("a/b/c")),
            ("my-org/my_app.v2", true, Ok("my-org/my_app.v2")),
            ("a__b/c---d", true, Ok("a__b/c---d")),
            ("", true, Err(NameError::EmptyComponent)),
            ("a//b", true, Err(NameError::EmptyComponent)),
            ("a/", true, Err(NameError::EmptyComponent)),
            ("Library/alpine", true, Err(NameError::Uppercase)),
            ("..", true, Err(NameError::BadComponent("..".into()))),
            ("a/../b", true, Err(NameError::BadComponent("..".into()))),
            ("a___b", true, Err(NameError::BadComponent("a___b".into()))),
            ("a..b", true, Err(NameError::BadComponent("a..b".into()))),
            ("-a", true, Err(NameError::BadComponent("-a".into()))),
            ("a.", true, Err(NameError::BadComponent("a.".into()))),
            ("a%2fb", true, Err(NameError::BadComponent("a%2fb".into()))),
            ("a b", true, Err(NameError::BadComponent("a b".into()))),
            (&long, true, Err(NameError::TooLong)),
        ];
        for (input, hub, want) in cases {
            let got = RepoName::parse(input, *hub);
            assert_eq!(
                got.as_ref().map(RepoName::as_str),
                want.as_ref().map(|s| *s),
                "{input}"
            );
        }
    }
}
