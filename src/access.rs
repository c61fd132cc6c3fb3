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
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::time::{Duration, Instant};

/// Failed logins one user name may cost from one address per window before it has to wait.
const MAX_FAILURES: u32 = 10;
/// Failed logins one address may make per window, over all user names (a guesser trying many
/// names), before every login from it waits.
const MAX_ADDRESS_FAILURES: u32 = 30;
/// The window of failed logins, and the wait.
const FAILURE_WINDOW: Duration = Duration::from_secs(60);
/// How long a verified password is remembered (bcrypt costs milliseconds on purpose).
const VERIFIED_FOR: Duration = Duration::from_secs(300);

/// Who a request is from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Identity {
    /// No credentials (or empty Basic ones, as skopeo and podman send without a login).
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
    /// Too many failed logins from this address (for this user name, or in all): 429.
    Braked {
        /// The address (an IPv6 client's /64), as the message names it.
        address: IpAddr,
        /// When the window ends.
        retry_after: Duration,
    },
}

/// Failed logins in one window, counted before each verification so concurrent guesses cannot
/// race past the limit.
#[derive(Debug)]
struct Strikes {
    since: Instant,
    count: AtomicU32,
    /// The address's braking was logged in this window.
    warned: AtomicBool,
}

impl Default for Strikes {
    fn default() -> Strikes {
        Strikes {
            since: Instant::now(),
            count: AtomicU32::new(0),
            warned: AtomicBool::new(false),
        }
    }
}

impl Strikes {
    /// Takes one attempt if fewer than `max` are counted; `false` when the limit is reached.
    fn take(&self, max: u32) -> bool {
        self.count
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| {
                (n < max).then_some(n + 1)
            })
            .is_ok()
    }

    /// Gives back an attempt that verified (a correct login is no failure).
    fn give_back(&self) {
        let _ = self
            .count
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| n.checked_sub(1));
    }

    /// What is left of the window, in whole seconds rounded up (a client that waits that
    /// long finds the window over).
    fn remaining(&self) -> Duration {
        let left = FAILURE_WINDOW.saturating_sub(self.since.elapsed());
        let secs = left.as_secs() + u64::from(left.subsec_nanos() > 0);
        Duration::from_secs(secs.max(1))
    }
}

/// How a braked address is named in the answer: an IPv6 network with its prefix length.
pub fn brake_label(address: IpAddr) -> String {
    match address {
        IpAddr::V6(_) => format!("{address}/64"),
        IpAddr::V4(_) => address.to_string(),
    }
}

/// The address a client is braked by: its own for IPv4, its /64 for IPv6 (one host's share
/// of a network, which it can change at will within).
fn brake_key(ip: IpAddr) -> IpAddr {
    match ip.to_canonical() {
        IpAddr::V6(v6) => {
            let prefix = u128::from(v6) & !((1u128 << 64) - 1);
            IpAddr::V6(prefix.into())
        }
        v4 => v4,
    }
}

/// The rules, the users and the tokens.
pub struct Access {
    users: HashMap<String, String>,
    /// sha256(token) → name.
    tokens: HashMap<[u8; 32], String>,
    rules: Vec<AccessRule>,
    /// sha256(user:password) of passwords that verified lately.
    verified: Cache<[u8; 32], String>,
    /// Failed logins by address and sha256(user name) (a fixed-size key whatever the name).
    failures: Cache<(IpAddr, [u8; 32]), Arc<Strikes>>,
    /// Failed logins by address, over all user names.
    address_failures: Cache<IpAddr, Arc<Strikes>>,
    /// A hash of the users' cost that an unknown user's password is checked against, so an
    /// unknown name takes as long as a wrong password.
    dummy: Option<String>,
    /// bcrypt verifications at once: they run off the async workers and never take every core.
    verifying: Arc<tokio::sync::Semaphore>,
    /// bcrypt verifications started so far.
    verifications: std::sync::atomic::AtomicU64,
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

/// The cost of a bcrypt hash (`$2y$12$...` → 12).
fn bcrypt_cost(hash: &str) -> Option<u32> {
    hash.split('$').nth(2)?.parse().ok()
}

/// What an `Authorization` header offers.
enum Offered<'a> {
    /// Nothing usable as a login: no header, or Basic with an empty user and password.
    Nothing,
    Token(&'a str),
    /// `user:password`, as sent (the key of remembered logins).
    Basic {
        text: String,
    },
    /// A scheme or encoding that cannot be a login.
    Malformed,
}

fn offered(authorization: Option<&str>) -> Offered<'_> {
    let Some(value) = authorization else {
        return Offered::Nothing;
    };
    let Some((scheme, credentials)) = value.split_once(' ') else {
        return Offered::Malformed;
    };
    let credentials = credentials.trim();
    if scheme.eq_ignore_ascii_case("bearer") {
        return Offered::Token(credentials);
    }
    if !scheme.eq_ignore_ascii_case("basic") {
        return Offered::Malformed;
    }
    use base64::Engine as _;
    let text = base64::engine::general_purpose::STANDARD
        .decode(credentials)
        .ok()
        .and_then(|d| String::from_utf8(d).ok());
    match text {
        // skopeo and podman send `Basic Og==` (":") when they have no credentials.
        Some(text) if text.is_empty() || text == ":" => Offered::Nothing,
        Some(text) if text.contains(':') => Offered::Basic { text },
        _ => Offered::Malformed,
    }
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
                    || bcrypt_cost(hash).is_none()
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
        let costs: Vec<u32> = users.values().filter_map(|h| bcrypt_cost(h)).collect();
        if costs.iter().min() != costs.iter().max() {
            tracing::warn!(
                "htpasswd entries have different bcrypt costs: a user with a cheaper hash answers faster than an unknown name, which tells names apart; write every entry with the same cost (htpasswd -B -C)"
            );
        }
        // The dearest cost in the file: an unknown name then never answers faster than a
        // known one.
        let dummy = costs
            .iter()
            .max()
            .map(|cost| bcrypt::hash("pullthrough: no such user", (*cost).clamp(4, 31)))
            .transpose()
            .map_err(|e| anyhow::anyhow!("invalid value for key \"htpasswd\": {e}"))?;
        let cores = std::thread::available_parallelism().map_or(1, std::num::NonZero::get);
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
            address_failures: Cache::builder()
                .time_to_live(FAILURE_WINDOW)
                .max_capacity(100_000)
                .build(),
            dummy,
            // Half the cores: the other half keeps serving while a guesser keeps these busy.
            verifying: Arc::new(tokio::sync::Semaphore::new((cores / 2).max(1))),
            verifications: std::sync::atomic::AtomicU64::new(0),
        }))
    }

    /// Who the `Authorization` header says the client is. Anonymous requests are never braked;
    /// credentials that verified lately are accepted without a check; any other login takes
    /// one attempt of its address and user name before it is verified (wrong ones keep it).
    pub async fn identify(
        &self,
        authorization: Option<&str>,
        peer: Option<IpAddr>,
    ) -> Result<Identity, Refusal> {
        const WRONG: Refusal = Refusal::Unauthenticated("wrong user name, password or token");
        let text = match offered(authorization) {
            Offered::Nothing => return Ok(Identity::Anonymous),
            Offered::Token(token) => {
                if let Some(name) = self.tokens.get(&hash(token.as_bytes())) {
                    return Ok(Identity::User(name.clone()));
                }
                // A wrong token costs no bcrypt, but guessing is braked all the same.
                self.strike(peer, "")?;
                return Err(WRONG);
            }
            Offered::Malformed => {
                self.strike(peer, "")?;
                return Err(WRONG);
            }
            Offered::Basic { text } => text,
        };
        let key = hash(text.as_bytes());
        if let Some(user) = self.verified.get(&key) {
            return Ok(Identity::User(user));
        }
        // `offered` made sure of the colon.
        let (user, password) = text.split_once(':').unwrap_or_default();
        let attempt = self.attempt(peer, user)?;
        if self.verify(user, password.to_owned(), attempt).await {
            self.verified.insert(key, user.to_owned());
            return Ok(Identity::User(user.to_owned()));
        }
        Err(WRONG)
    }

    /// bcrypt verifications started so far (known users and unknown ones alike).
    pub fn verifications(&self) -> u64 {
        self.verifications.load(Ordering::Relaxed)
    }

    /// Counts a failure that needed no verification; refuses when the address is braked.
    fn strike(&self, peer: Option<IpAddr>, user: &str) -> Result<(), Refusal> {
        if let Some(attempt) = self.attempt(peer, user)? {
            attempt.keep();
        }
        Ok(())
    }

    /// Takes one attempt for `user` from `peer`, within both limits (the address's first, so
    /// a braked address adds no entry per name it tries). The attempt is given back when it is
    /// dropped without [`Attempt::keep`]: a login that verified, or one whose client went away
    /// before it was checked.
    fn attempt(&self, peer: Option<IpAddr>, user: &str) -> Result<Option<Attempt>, Refusal> {
        let Some(address) = peer.map(brake_key) else {
            return Ok(None);
        };
        let all = self.address_failures.get_with(address, Default::default);
        let braked = |strikes: &Strikes| {
            if !all.warned.swap(true, Ordering::Relaxed) {
                tracing::warn!(address = %brake_label(address), "too many failed logins from this address; its logins wait for the window to end");
            }
            Refusal::Braked {
                address,
                retry_after: strikes.remaining(),
            }
        };
        if !all.take(MAX_ADDRESS_FAILURES) {
            return Err(braked(&all));
        }
        let mine = self
            .failures
            .get_with((address, hash(user.as_bytes())), Default::default);
        if !mine.take(MAX_FAILURES) {
            all.give_back();
            return Err(braked(&mine));
        }
        Ok(Some(Attempt {
            mine,
            all,
            kept: false,
        }))
    }

    /// Checks `password` against `user`'s hash, or an unknown user's against the dummy hash
    /// (the same work, and always false); off the async workers, a bounded number at once.
    /// `attempt` goes with the work: kept when the check fails, given back when it succeeds or
    /// never started (a client gone while it waited), so a guesser who hangs up once the hash
    /// is being computed still pays for it.
    async fn verify(&self, user: &str, password: String, attempt: Option<Attempt>) -> bool {
        let (stored, known) = match self.users.get(user) {
            Some(stored) => (stored.clone(), true),
            None => match &self.dummy {
                Some(dummy) => (dummy.clone(), false),
                None => {
                    // No users at all: nothing to check, and a failure all the same.
                    if let Some(attempt) = attempt {
                        attempt.keep();
                    }
                    return false;
                }
            },
        };
        let Ok(permit) = Arc::clone(&self.verifying).acquire_owned().await else {
            return false;
        };
        self.verifications.fetch_add(1, Ordering::Relaxed);
        // The permit goes with the work: a client that hangs up does not free its place while
        // its hash is still being computed.
        tokio::task::spawn_blocking(move || {
            let _permit = permit;
            let ok = bcrypt::verify(password, &stored).unwrap_or(false) && known;
            if !ok && let Some(attempt) = attempt {
                attempt.keep();
            }
            ok
        })
        .await
        .unwrap_or(false)
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

/// An attempt taken from both of an address's counts, given back on drop unless kept.
struct Attempt {
    mine: Arc<Strikes>,
    all: Arc<Strikes>,
    kept: bool,
}

impl Attempt {
    /// The login failed: the attempt stays counted.
    fn keep(mut self) {
        self.kept = true;
    }
}

impl Drop for Attempt {
    fn drop(&mut self) {
        if !self.kept {
            self.mine.give_back();
            self.all.give_back();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn basic(user: &str, password: &str) -> String {
        use base64::Engine as _;
        format!(
            "Basic {}",
            base64::engine::general_purpose::STANDARD.encode(format!("{user}:{password}"))
        )
    }

    /// Access control with alice (bcrypt cost `cost`) and bob (cost 4).
    fn access(cost: u32) -> (tempfile::TempDir, Access) {
        let dir = tempfile::tempdir().unwrap();
        let htpasswd = dir.path().join("htpasswd");
        let alice = bcrypt::hash("alice-pw", cost).unwrap();
        let bob = bcrypt::hash("bob-pw", 4).unwrap();
        std::fs::write(&htpasswd, format!("alice:{alice}\nbob:{bob}\n")).unwrap();
        let config = Config {
            htpasswd: Some(htpasswd),
            ..Config::default()
        };
        let access = Access::from_config(&config).unwrap().unwrap();
        (dir, access)
    }

    const HOME: Option<IpAddr> = Some(IpAddr::V4(std::net::Ipv4Addr::LOCALHOST));

    #[test]
    fn ipv6_clients_are_braked_by_their_64() {
        let a: IpAddr = "2001:db8:1:2:aaaa::1".parse().unwrap();
        let b: IpAddr = "2001:db8:1:2:bbbb::9".parse().unwrap();
        let other: IpAddr = "2001:db8:1:3::1".parse().unwrap();
        assert_eq!(brake_key(a), brake_key(b));
        assert_ne!(brake_key(a), brake_key(other));
        let mapped: IpAddr = "::ffff:192.0.2.7".parse().unwrap();
        assert_eq!(brake_key(mapped), "192.0.2.7".parse::<IpAddr>().unwrap());
    }

    #[tokio::test]
    async fn empty_basic_credentials_are_anonymous() {
        let (_dir, access) = access(4);
        for empty in ["Basic Og==", "Basic "] {
            assert_eq!(
                access.identify(Some(empty), HOME).await,
                Ok(Identity::Anonymous),
                "{empty}"
            );
        }
        assert!(matches!(
            access.identify(Some(&basic("", "pw")), HOME).await,
            Err(Refusal::Unauthenticated(_))
        ));
        assert_eq!(
            access.verifications(),
            1,
            "only the non-empty login is checked"
        );
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn concurrent_guesses_run_at_most_the_limit_of_verifications() {
        let (_dir, access) = access(6);
        let access = Arc::new(access);
        let guesses = (0..300).map(|i| {
            let access = Arc::clone(&access);
            tokio::spawn(async move {
                access
                    .identify(Some(&basic("alice", &format!("guess-{i}"))), HOME)
                    .await
            })
        });
        let answers = futures_util::future::join_all(guesses).await;
        let wrong = answers
            .iter()
            .filter(|a| matches!(a, Ok(Err(Refusal::Unauthenticated(_)))))
            .count();
        let braked = answers
            .iter()
            .filter(|a| matches!(a, Ok(Err(Refusal::Braked { .. }))))
            .count();
        assert_eq!(access.verifications(), u64::from(MAX_FAILURES));
        assert_eq!((wrong, braked), (10, 290));
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_correct_login_cut_short_keeps_no_strike() {
        let (_dir, access) = access(8);
        let access = Arc::new(access);
        // Many at once: most wait for the one verification place and are cut off there.
        let logins = (0..20).map(|_| {
            let access = Arc::clone(&access);
            tokio::spawn(async move {
                let login = basic("alice", "alice-pw");
                let _ = tokio::time::timeout(
                    Duration::from_millis(1),
                    access.identify(Some(&login), HOME),
                )
                .await;
            })
        });
        futures_util::future::join_all(logins).await;
        assert_eq!(
            access
                .identify(Some(&basic("alice", "alice-pw")), HOME)
                .await,
            Ok(Identity::User("alice".into()))
        );
    }

    #[tokio::test]
    async fn a_braked_address_adds_no_entry_per_name_it_tries() {
        let (_dir, access) = access(4);
        for i in 0..200 {
            let name = format!("{i}-{}", "x".repeat(10_000));
            let _ = access.identify(Some(&basic(&name, "x")), HOME).await;
        }
        access.failures.run_pending_tasks();
        assert_eq!(
            access.failures.entry_count(),
            u64::from(MAX_ADDRESS_FAILURES)
        );
        assert_eq!(access.verifications(), u64::from(MAX_ADDRESS_FAILURES));
    }

    #[tokio::test]
    async fn unknown_users_cost_a_verification_of_the_same_cost() {
        let (_dir, access) = access(6);
        let dummy = access.dummy.as_deref().unwrap();
        assert_eq!(bcrypt_cost(dummy), Some(6), "the dearest cost in the file");
        assert!(
            access
                .identify(Some(&basic("mallory", "x")), HOME)
                .await
                .is_err()
        );
        assert_eq!(access.verifications(), 1);
    }

    #[tokio::test]
    async fn the_brake_is_per_user_name_with_a_ceiling_per_address() {
        let (_dir, access) = access(4);
        assert!(
            access
                .identify(Some(&basic("bob", "bob-pw")), HOME)
                .await
                .is_ok()
        );
        for i in 0..MAX_FAILURES {
            let answer = access
                .identify(Some(&basic("alice", &format!("guess-{i}"))), HOME)
                .await;
            assert!(matches!(answer, Err(Refusal::Unauthenticated(_))));
        }
        let Err(Refusal::Braked {
            address,
            retry_after,
        }) = access
            .identify(Some(&basic("alice", "alice-pw")), HOME)
            .await
        else {
            panic!("alice is braked");
        };
        assert_eq!(Some(address), HOME);
        assert!(retry_after <= FAILURE_WINDOW && retry_after >= Duration::from_secs(1));
        // Others at the same address are not.
        assert_eq!(access.identify(None, HOME).await, Ok(Identity::Anonymous));
        assert!(
            access
                .identify(Some(&basic("bob", "bob-pw")), HOME)
                .await
                .is_ok()
        );
        // A guesser going through names meets the address's ceiling.
        for i in MAX_FAILURES..MAX_ADDRESS_FAILURES {
            let _ = access
                .identify(Some(&basic(&format!("user-{i}"), "x")), HOME)
                .await;
        }
        assert!(matches!(
            access.identify(Some(&basic("carol", "x")), HOME).await,
            Err(Refusal::Braked { .. })
        ));
        // bob's login verified before: still accepted.
        assert!(
            access
                .identify(Some(&basic("bob", "bob-pw")), HOME)
                .await
                .is_ok()
        );
    }
}
