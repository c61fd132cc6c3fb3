//! Upstream authentication: `WWW-Authenticate` challenges (RFC 7235, distribution
//! `authchallenge.go`), the token request in its OAuth2 POST and GET forms (distribution
//! `spec/auth/oauth.md`, `token.md`), and a token cache keyed by realm, service, scope and
//! identity with concurrent requests coalesced.

use crate::config::Secret;
use moka::future::Cache;
use serde::Deserialize;
use std::collections::BTreeMap;
use std::fmt;
use std::sync::Arc;
use std::time::{Duration, Instant};
use url::Url;

/// One parsed challenge: the scheme (lower case) and its parameters (keys lower case).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Challenge {
    /// `bearer`, `basic`, ...
    pub scheme: String,
    /// `realm`, `service`, `scope`, `error`, ...
    pub params: BTreeMap<String, String>,
}

impl Challenge {
    /// A parameter's value.
    pub fn param(&self, key: &str) -> Option<&str> {
        self.params.get(key).map(String::as_str)
    }
}

/// Parses a `WWW-Authenticate` value, which may hold several challenges
/// (`Bearer realm="a",service="b", Basic realm="c"`).
pub fn parse_challenges(value: &str) -> Vec<Challenge> {
    let mut out: Vec<Challenge> = Vec::new();
    let mut p = Parser {
        s: value.as_bytes(),
        i: 0,
    };
    loop {
        p.skip(b" \t,");
        let Some(scheme) = p.token() else { break };
        let mut challenge = Challenge {
            scheme: scheme.to_ascii_lowercase(),
            params: BTreeMap::new(),
        };
        loop {
            p.skip(b" \t,");
            let save = p.i;
            let Some(key) = p.token() else { break };
            p.skip(b" \t");
            if !p.eat(b'=') {
                // A token not followed by '=' starts the next challenge.
                p.i = save;
                break;
            }
            p.skip(b" \t");
            let value = if p.peek() == Some(b'"') {
                p.quoted()
            } else {
                p.token().unwrap_or_default()
            };
            challenge.params.insert(key.to_ascii_lowercase(), value);
        }
        out.push(challenge);
    }
    out
}

struct Parser<'a> {
    s: &'a [u8],
    i: usize,
}

impl Parser<'_> {
    fn peek(&self) -> Option<u8> {
        self.s.get(self.i).copied()
    }
    fn skip(&mut self, set: &[u8]) {
        while self.peek().is_some_and(|b| set.contains(&b)) {
            self.i += 1;
        }
    }
    fn eat(&mut self, b: u8) -> bool {
        let hit = self.peek() == Some(b);
        if hit {
            self.i += 1;
        }
        hit
    }
    /// An RFC 7230 token (token68 characters `/` and `=` allowed at its end are not needed here).
    fn token(&mut self) -> Option<String> {
        let start = self.i;
        while self
            .peek()
            .is_some_and(|b| b > b' ' && b < 0x7f && !b" \t\"(),/:;<=>?@[]\\{}".contains(&b))
        {
            self.i += 1;
        }
        (self.i > start).then(|| String::from_utf8_lossy(&self.s[start..self.i]).into_owned())
    }
    fn quoted(&mut self) -> String {
        self.i += 1;
        let mut out = Vec::new();
        while let Some(b) = self.peek() {
            self.i += 1;
            match b {
                b'"' => break,
                b'\\' => {
                    if let Some(next) = self.peek() {
                        out.push(next);
                        self.i += 1;
                    }
                }
                _ => out.push(b),
            }
        }
        String::from_utf8_lossy(&out).into_owned()
    }
}

/// Upstream account credentials. `Debug` never shows the password.
#[derive(Clone)]
pub struct Credentials {
    /// Account name.
    pub username: String,
    /// Password or access token.
    pub password: Secret,
}

impl fmt::Debug for Credentials {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Credentials")
            .field("username", &self.username)
            .field("password", &self.password)
            .finish()
    }
}

/// A bearer token. `Debug` never shows it.
#[derive(Clone)]
pub struct Token {
    /// The opaque token.
    pub secret: Arc<str>,
    /// When pullthrough stops using it (receipt + lifetime - margin).
    pub expires_at: Instant,
}

impl fmt::Debug for Token {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Token")
            .field("secret", &"<redacted>")
            .field("expires_at", &self.expires_at)
            .finish()
    }
}

/// What a token is cached under.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct TokenKey {
    /// The realm URL from the challenge.
    pub realm: String,
    /// The `service` parameter.
    pub service: String,
    /// The scope requested, e.g. `repository:library/alpine:pull`.
    pub scope: String,
    /// Whether credentials were sent for it.
    pub authenticated: bool,
}

/// Shortest lifetime assumed for a token (`token.md`: defaults and minimum are 60 s).
const MIN_TOKEN_LIFETIME: Duration = Duration::from_secs(60);
/// Longest lifetime believed, in seconds: a day.
const MAX_TOKEN_LIFETIME_SECS: u64 = 24 * 3600;

/// Parses a token response body (both the GET and the OAuth2 POST forms) into a token
/// received now; `None` when it is not JSON or carries no token.
pub fn parse_token_response(body: &[u8]) -> Option<Token> {
    serde_json::from_slice::<TokenResponse>(body)
        .ok()?
        .into_token(Instant::now())
}

/// The token fields of both the GET and the OAuth2 POST responses.
#[derive(Deserialize)]
pub(crate) struct TokenResponse {
    token: Option<String>,
    access_token: Option<String>,
    expires_in: Option<u64>,
}

impl TokenResponse {
    /// The token and when to stop using it, counted from local receipt time (issued_at is
    /// ignored: a skewed clock must not make tokens look expired or eternal).
    pub(crate) fn into_token(self, received: Instant) -> Option<Token> {
        let secret = self
            .token
            .filter(|t| !t.is_empty())
            .or(self.access_token.filter(|t| !t.is_empty()))?;
        // At most a day: a lifetime from outside must not overflow the clock.
        let lifetime =
            Duration::from_secs(self.expires_in.unwrap_or(0).min(MAX_TOKEN_LIFETIME_SECS))
                .max(MIN_TOKEN_LIFETIME);
        // Renew early: a tenth of the lifetime, at most 30 s, so in-flight requests never carry
        // a token that expires on the way.
        let margin = (lifetime / 10).min(Duration::from_secs(30));
        Some(Token {
            secret: secret.into(),
            expires_at: received + lifetime - margin,
        })
    }
}

/// Tokens per [`TokenKey`], each living until its own expiry.
#[derive(Clone)]
pub struct TokenCache {
    tokens: Cache<TokenKey, Token>,
}

impl fmt::Debug for TokenCache {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("TokenCache")
            .field("entries", &self.tokens.entry_count())
            .finish()
    }
}

struct ExpireTokens;

impl moka::Expiry<TokenKey, Token> for ExpireTokens {
    fn expire_after_create(&self, _: &TokenKey, token: &Token, now: Instant) -> Option<Duration> {
        Some(token.expires_at.saturating_duration_since(now))
    }
}

impl Default for TokenCache {
    fn default() -> Self {
        TokenCache {
            tokens: Cache::builder()
                .max_capacity(10_000)
                .expire_after(ExpireTokens)
                .build(),
        }
    }
}

impl TokenCache {
    /// The cached token for `key`, or the result of `fetch`; concurrent callers share one fetch
    /// and failures are not cached.
    pub async fn get_or_fetch<E: Send + Sync + 'static>(
        &self,
        key: TokenKey,
        fetch: impl Future<Output = Result<Token, E>>,
    ) -> Result<Token, Arc<E>> {
        self.tokens.try_get_with(key, fetch).await
    }

    /// Forgets a token the registry refused.
    pub async fn invalidate(&self, key: &TokenKey) {
        self.tokens.invalidate(key).await;
    }
}

/// Whether credentials may be sent to `realm`: only over https (or when the upstream itself is
/// plain http), and only to the upstream's own host or its registrable domain. distribution
/// adopted this rule in 2026 after its proxy sent credentials to any realm (`proxyauth.go`).
pub fn realm_trusted(upstream: &Url, realm: &Url) -> bool {
    let (Some(up), Some(rh)) = (upstream.host_str(), realm.host_str()) else {
        return false;
    };
    let scheme_ok = realm.scheme() == "https" || upstream.scheme() == "http";
    if !scheme_ok {
        return false;
    }
    if up.eq_ignore_ascii_case(rh) {
        return true;
    }
    let is_ip = |h: &str| h.parse::<std::net::IpAddr>().is_ok() || h.starts_with('[');
    if is_ip(up) || is_ip(rh) {
        return false;
    }
    let (up, rh) = (up.to_ascii_lowercase(), rh.to_ascii_lowercase());
    match (psl::domain_str(&up), psl::domain_str(&rh)) {
        (Some(a), Some(b)) => a == b,
        _ => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn params(c: &Challenge) -> Vec<(&str, &str)> {
        c.params
            .iter()
            .map(|(k, v)| (k.as_str(), v.as_str()))
            .collect()
    }

    #[test]
    fn parses_docker_hub_challenge() {
        let c = parse_challenges(
            r#"Bearer realm="https://auth.docker.io/token",service="registry.docker.io",scope="repository:library/redis:pull""#,
        );
        assert_eq!(c.len(), 1);
        assert_eq!(c[0].scheme, "bearer");
        assert_eq!(
            params(&c[0]),
            vec![
                ("realm", "https://auth.docker.io/token"),
                ("scope", "repository:library/redis:pull"),
                ("service", "registry.docker.io")
            ]
        );
    }

    #[test]
    fn parses_edge_cases() {
        type Parsed<'a> = Vec<(&'a str, Vec<(&'a str, &'a str)>)>;
        let cases: &[(&str, Parsed)] = &[
            (
                r#"Basic realm="Registry Realm""#,
                vec![("basic", vec![("realm", "Registry Realm")])],
            ),
            (
                r#"BEARER Realm="x", Service = "y" ,error="insufficient_scope""#,
                vec![(
                    "bearer",
                    vec![
                        ("error", "insufficient_scope"),
                        ("realm", "x"),
                        ("service", "y"),
                    ],
                )],
            ),
            (
                r#"Bearer realm=plain,scope="a:b:pull b:c:pull""#,
                vec![(
                    "bearer",
                    vec![("realm", "plain"), ("scope", "a:b:pull b:c:pull")],
                )],
            ),
            (
                r#"Bearer slashed="he\"\l\lo""#,
                vec![("bearer", vec![("slashed", "he\"llo")])],
            ),
            (
                r#"Bearer realm="a", Basic realm="b""#,
                vec![
                    ("bearer", vec![("realm", "a")]),
                    ("basic", vec![("realm", "b")]),
                ],
            ),
            ("Basic", vec![("basic", vec![])]),
            ("", vec![]),
            (
                r#"Bearer realm="unterminated"#,
                vec![("bearer", vec![("realm", "unterminated")])],
            ),
        ];
        for (input, want) in cases {
            let got = parse_challenges(input);
            let got: Parsed = got.iter().map(|c| (c.scheme.as_str(), params(c))).collect();
            assert_eq!(&got, want, "{input}");
        }
    }

    #[test]
    fn trusts_only_related_realms() {
        let hub = Url::parse("https://registry-1.docker.io").unwrap();
        let local = Url::parse("http://127.0.0.1:5000").unwrap();
        let cases = [
            (&hub, "https://auth.docker.io/token", true),
            (&hub, "https://registry-1.docker.io/token", true),
            (&hub, "http://auth.docker.io/token", false),
            (&hub, "https://evil.example/token", false),
            (&hub, "https://docker.io.evil.example/token", false),
            (&local, "http://127.0.0.1:6000/token", true),
            (&local, "http://127.0.0.2/token", false),
            (
                &Url::parse("https://foo.github.io").unwrap(),
                "https://bar.github.io/t",
                false,
            ),
        ];
        for (up, realm, want) in cases {
            assert_eq!(
                realm_trusted(up, &Url::parse(realm).unwrap()),
                want,
                "{up} {realm}"
            );
        }
    }

    #[test]
    fn token_lifetime_has_a_floor_and_a_margin() {
        let now = Instant::now();
        let t = TokenResponse {
            token: None,
            access_token: Some("a".into()),
            expires_in: Some(2),
        }
        .into_token(now)
        .unwrap();
        assert_eq!(t.expires_at - now, Duration::from_secs(54));
        let t = TokenResponse {
            token: Some("t".into()),
            access_token: None,
            expires_in: Some(300),
        }
        .into_token(now)
        .unwrap();
        assert_eq!(t.expires_at - now, Duration::from_secs(270));
        let t = TokenResponse {
            token: Some("t".into()),
            access_token: None,
            expires_in: Some(u64::MAX),
        }
        .into_token(now)
        .unwrap();
        assert_eq!(t.expires_at - now, Duration::from_secs(24 * 3600 - 30));
        assert!(
            TokenResponse {
                token: Some(String::new()),
                access_token: None,
                expires_in: None
            }
            .into_token(now)
            .is_none()
        );
    }

    #[test]
    fn debug_output_never_shows_secrets() {
        let token = TokenResponse {
            token: Some("tok-s3cr3t".into()),
            access_token: None,
            expires_in: None,
        }
        .into_token(Instant::now())
        .unwrap();
        let credentials = Credentials {
            username: "alice".into(),
            password: Secret("pa55-s3cr3t".into()),
        };
        let shown = format!("{token:?} {credentials:?}");
        assert!(!shown.contains("s3cr3t"), "{shown}");
        assert!(
            shown.contains("alice") && shown.contains("<redacted>"),
            "{shown}"
        );
    }
}
