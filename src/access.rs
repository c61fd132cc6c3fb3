//! Client access control (optional, off unless `htpasswd` or `client_tokens_file` is set):
//! who a client is (HTTP Basic against bcrypt entries of an htpasswd file, or a static bearer
//! token), which repositories of which upstream they may pull (`[[access]]` rules by upstream
//! and repository prefix; anonymous access can stay open per rule), and a brake on guessing
//! (failed logins are counted per client address; past the limit the address waits).

use crate::config::{AccessRule, Config};
use moka::sync::Cache;
use sha2::Digest as _;
use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::Arc;
use std::time::Duration;

/// Failed logins an address may make per window before it has to wait.
const MAX_FAILURES: u32 = 10;
/// The window of failed logins, and the wait.
const FAILURE_WINDOW: Duration = Duration::from_secs(60);
/// How long a verified password is remembered (bcrypt costs milliseconds on purpose).
const VERIFIED_FOR: Duration = Duration::from_secs(300);

/// Who a request is from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Identity {
    /// No credentials.
    Anonymous,
    /// A user of the htpasswd file, or the name of a token.
    User(String),
}

/// Why a request may not go on.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Refusal {
    /// Credentials are missing or wrong: 401 with a Basic challenge.
    Unauthenticated(&'static str),
    /// Known, but not allowed this repository: 403.
    Denied,
    /// Too many failed logins from this address: 429.
    TooManyFailures,
}

/// The rules, the users and the tokens.
pub struct Access {
    users: HashMap<String, String>,
    /// sha256(token) → name.
    tokens: HashMap<[u8; 32], String>,
    rules: Vec<AccessRule>,
    /// sha256(user:password) of passwords that verified lately.
    verified: Cache<[u8; 32], String>,
    failures: Cache<IpAddr, Arc<std::sync::atomic::AtomicU32>>,
}

impl std::fmt::Debug for Access {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Access")
            .field("users", &self.users.len())
            .field("tokens", &self.tokens.len())
            .field("rules", &self.rules.len())
            .finish()
    }
}

/// Calls `entry(name, value)` for each `name:value` line of the file `path` (blank lines and
/// `#` comments skipped); any problem is one line naming `key`.
fn for_entries(
    path: &std::path::Path,
    key: &str,
    mut entry: impl FnMut(&str, &str) -> Result<(), String>,
) -> anyhow::Result<()> {
    let text = std::fs::read_to_string(path).map_err(|e| {
        anyhow::anyhow!(
            "invalid value for key {key:?}: cannot read {}: {e}",
            path.display()
        )
    })?;
    for (n, line) in text.lines().enumerate() {
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let why = match line.split_once(':') {
            Some((name, value)) if !name.is_empty() => match entry(name, value) {
                Ok(()) => continue,
                Err(why) => why,
            },
            _ => format!("line {} is not name:value", n + 1),
        };
        anyhow::bail!("invalid value for key {key:?}: {why}");
    }
    Ok(())
}

fn hash(bytes: &[u8]) -> [u8; 32] {
    sha2::Sha256::digest(bytes).into()
}

impl Access {
    /// The access control `config` asks for, or `None` when it is off. Fails with one line for
    /// an unreadable file or an entry that is not bcrypt.
    pub fn from_config(config: &Config) -> anyhow::Result<Option<Access>> {
        if config.htpasswd.is_none() && config.client_tokens_file.is_none() {
            return Ok(None);
        }
        let mut users = HashMap::new();
        if let Some(path) = &config.htpasswd {
            for_entries(path, "htpasswd", |user, hash| {
                if !(hash.starts_with("$2y$")
                    || hash.starts_with("$2b$")
                    || hash.starts_with("$2a$"))
                {
                    return Err(format!(
                        "the entry of {user:?} is not bcrypt (write it with htpasswd -B)"
                    ));
                }
                users.insert(user.to_owned(), hash.to_owned());
                Ok(())
            })?;
        }
        let mut tokens = HashMap::new();
        if let Some(path) = &config.client_tokens_file {
            for_entries(path, "client_tokens_file", |name, token| {
                if token.len() < 16 {
                    return Err(format!(
                        "the token of {name:?} is shorter than 16 characters"
                    ));
                }
                tokens.insert(hash(token.as_bytes()), name.to_owned());
                Ok(())
            })?;
        }
        Ok(Some(Access {
            users,
            tokens,
            rules: config.access.clone(),
            verified: Cache::builder()
                .time_to_live(VERIFIED_FOR)
                .max_capacity(10_000)
                .build(),
            failures: Cache::builder()
                .time_to_live(FAILURE_WINDOW)
                .max_capacity(100_000)
                .build(),
        }))
    }

    /// Who the `Authorization` header says the client is. A failure counts against `peer`.
    pub async fn identify(
        &self,
        authorization: Option<&str>,
        peer: Option<IpAddr>,
    ) -> Result<Identity, Refusal> {
        // A lookup only: an address's entry is made by its first failure (get_with allocates).
        let failures = peer.and_then(|ip| self.failures.get(&ip));
        if failures
            .as_ref()
            .is_some_and(|f| f.load(std::sync::atomic::Ordering::Relaxed) >= MAX_FAILURES)
        {
            return Err(Refusal::TooManyFailures);
        }
        let Some(value) = authorization else {
            return Ok(Identity::Anonymous);
        };
        let identity = self.check(value).await;
        if identity.is_none()
            && let Some(ip) = peer
        {
            let f = failures.unwrap_or_else(|| self.failures.get_with(ip, Default::default));
            f.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        }
        identity.ok_or(Refusal::Unauthenticated(
            "wrong user name, password or token",
        ))
    }

    async fn check(&self, value: &str) -> Option<Identity> {
        let (scheme, credentials) = value.split_once(' ')?;
        let credentials = credentials.trim();
        if scheme.eq_ignore_ascii_case("bearer") {
            return self
                .tokens
                .get(&hash(credentials.as_bytes()))
                .cloned()
                .map(Identity::User);
        }
        if !scheme.eq_ignore_ascii_case("basic") {
            return None;
        }
        use base64::Engine as _;
        let decoded = base64::engine::general_purpose::STANDARD
            .decode(credentials)
            .ok()?;
        let text = String::from_utf8(decoded).ok()?;
        let (user, password) = text.split_once(':')?;
        let key = hash(text.as_bytes());
        if let Some(user) = self.verified.get(&key) {
            return Some(Identity::User(user));
        }
        let stored = self.users.get(user)?.clone();
        let password = password.to_owned();
        let ok =
            tokio::task::spawn_blocking(move || bcrypt::verify(password, &stored).unwrap_or(false))
                .await
                .unwrap_or(false);
        ok.then(|| {
            self.verified.insert(key, user.to_owned());
            Identity::User(user.to_owned())
        })
    }

    /// Whether `identity` may pull `repository` from `upstream`: the rule with the longest
    /// matching prefix decides; without one, any authenticated client may and anonymous ones
    /// may not.
    pub fn allows(
        &self,
        identity: &Identity,
        upstream: &str,
        repository: &str,
    ) -> Result<(), Refusal> {
        let rule = self
            .rules
            .iter()
            .filter(|r| r.upstream == "*" || r.upstream.eq_ignore_ascii_case(upstream))
            .filter(|r| repository.starts_with(&r.prefix))
            .max_by_key(|r| (r.prefix.len(), r.upstream != "*"));
        let (anonymous, users): (bool, &[String]) = match rule {
            Some(r) => (r.anonymous, &r.users),
            None => (false, &[]),
        };
        match identity {
            Identity::Anonymous if anonymous => Ok(()),
            Identity::Anonymous => Err(Refusal::Unauthenticated("authentication required")),
            Identity::User(_) if rule.is_none() || anonymous && users.is_empty() => Ok(()),
            Identity::User(name) if users.iter().any(|u| u == "*" || u == name) => Ok(()),
            Identity::User(_) => Err(Refusal::Denied),
        }
    }
}
