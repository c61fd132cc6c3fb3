//! `[[access]]`: who may pull what once clients authenticate (`htpasswd`,
//! `client_tokens_file`), and whether upstream credentials are left open to every client.

use super::Config;
use super::validate::Invalid;
use serde::{Deserialize, Serialize};

/// Who may pull what: the rule with the longest matching `prefix` (for the request's upstream,
/// or `*`) decides. Without a matching rule, authenticated clients may pull and anonymous ones
/// may not.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AccessRule {
    /// The registry: `docker.io` (the default upstream), an `[[upstreams]]` host, or `*`.
    #[serde(default = "any_upstream")]
    pub upstream: String,
    /// Repository prefix, e.g. `team/` (empty: every repository).
    #[serde(default)]
    pub prefix: String,
    /// Users (or token names) allowed; `*` for any authenticated client.
    #[serde(default)]
    pub users: Vec<String>,
    /// Clients without credentials are allowed too.
    #[serde(default)]
    pub anonymous: bool,
}

fn any_upstream() -> String {
    "*".to_owned()
}

impl Config {
    /// Whether clients authenticate and `[[access]]` rules apply (`htpasswd` or
    /// `client_tokens_file` set). Then cached content reaches a repository only where its own
    /// upstream shows it, whoever fetched it.
    pub fn access_control(&self) -> bool {
        self.htpasswd.is_some() || self.client_tokens_file.is_some()
    }

    /// Whether any upstream has credentials (then cached content may be private).
    pub fn has_credentials(&self) -> bool {
        self.upstream_username.is_some() || self.upstreams.iter().any(|u| u.username.is_some())
    }

    /// Upstream credentials without client access control: every client reads what they can.
    pub fn credentials_open_to_all(&self) -> bool {
        self.has_credentials() && !self.access_control()
    }

    /// Every `[[access]]` rule names a registry clients can reach: a rule that matches nothing
    /// would silently leave open what it meant to close.
    pub(super) fn validate_access(&self) -> Result<(), Invalid> {
        for rule in &self.access {
            let known = rule.upstream == "*"
                || rule.upstream.eq_ignore_ascii_case("docker.io")
                || self
                    .upstreams
                    .iter()
                    .any(|u| u.host.eq_ignore_ascii_case(&rule.upstream));
            if !known {
                let accepted: Vec<String> = ["docker.io", "*"]
                    .into_iter()
                    .map(str::to_owned)
                    .chain(self.upstreams.iter().map(|u| u.host.clone()))
                    .map(|h| format!("{h:?}"))
                    .collect();
                return Err((
                    "access",
                    format!(
                        "upstream {:?} is not a registry mirrored here; a rule names {} (the top-level upstream is \"docker.io\", whatever its URL)",
                        rule.upstream,
                        accepted.join(", ")
                    ),
                ));
            }
        }
        Ok(())
    }
}
