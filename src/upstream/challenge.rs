//! Learning how the upstream authenticates: the one-time `/v2/` ping, the credentials a first
//! attempt carries, and the answer to a 401 challenge.

use super::auth::{TokenKey, parse_challenges};
use super::{DOCKER_HUB_HOSTS, Error, Ping, Upstream};
use reqwest::header::{self, HeaderMap, HeaderValue};
use std::sync::atomic::Ordering;

impl Upstream {
    /// Whether the upstream is Docker Hub: by host name, or by the token service its challenge
    /// names (`registry.docker.io`), which also covers emulators and Hub-compatible mirrors.
    pub async fn is_docker_hub(&self) -> Result<bool, Error> {
        if self.known_docker_hub() {
            return Ok(true);
        }
        self.pinged().await.map(|p| p.docker_hub)
    }

    /// Whether the upstream is Docker Hub, as far as is known without asking it: by host
    /// name, or from a ping already answered.
    pub fn known_docker_hub(&self) -> bool {
        self.base
            .host_str()
            .is_some_and(|h| DOCKER_HUB_HOSTS.contains(&h))
            || self.ping.get().is_some_and(|p| p.docker_hub)
    }

    /// Asks the upstream's `/v2/` now (the one ping it costs, done early): whether it answered
    /// as a registry.
    pub async fn check(&self) -> Result<(), Error> {
        self.pinged().await.map(|_| ())
    }

    /// Pings `/v2/` once (like distribution's proxy) to learn the auth scheme and realm, so
    /// every later request carries its credentials up front instead of collecting a 401.
    async fn pinged(&self) -> Result<Ping, Error> {
        self.ping
            .get_or_try_init(|| self.send_ping())
            .await
            .copied()
    }

    async fn send_ping(&self) -> Result<Ping, Error> {
        self.check_online()?;
        let url = self
            .base
            .join("/v2/")
            .map_err(|e| Error::BadResponse(e.to_string()))?;
        let started = std::time::Instant::now();
        let sent = self
            .clients
            .here()
            .api
            .get(url)
            .timeout(self.request_timeout)
            .send()
            .await;
        let status = sent.as_ref().ok().map(|r| r.status().as_u16());
        self.metrics.upstream(
            crate::metrics::UpstreamKind::Ping,
            status,
            started.elapsed(),
        );
        let response = sent.map_err(Error::from_reqwest)?;
        self.limits.observe(response.headers());
        // Only 200 and 401 say something lasting; anything else is asked again next time.
        let status = response.status().as_u16();
        if status != 200 && status != 401 {
            return Err(Error::Status(status));
        }
        let challenges: Vec<_> = response
            .headers()
            .get_all(header::WWW_AUTHENTICATE)
            .iter()
            .filter_map(|v| v.to_str().ok())
            .flat_map(parse_challenges)
            .collect();
        let mut docker_hub = false;
        if let Some(bearer) = challenges.iter().find(|c| c.scheme == "bearer")
            && let Some(realm) = bearer.param("realm")
        {
            let service = bearer.param("service").unwrap_or_default();
            docker_hub = service == "registry.docker.io";
            *self.bearer.write() = Some((realm.to_owned(), service.to_owned()));
        } else if challenges.iter().any(|c| c.scheme == "basic") {
            self.basic.store(true, Ordering::Relaxed);
        }
        Ok(Ping { docker_hub })
    }

    /// Authorization for a first attempt, from what earlier challenges taught us.
    pub(super) async fn preemptive_auth(
        &self,
        scope: &str,
    ) -> Result<Option<(HeaderValue, Option<TokenKey>)>, Error> {
        // A failed ping is asked again next time; this request goes without credentials and
        // answers a challenge if it gets one.
        let _ = self.pinged().await;
        if self.basic.load(Ordering::Relaxed) {
            return Ok(self.basic_header().map(|h| (h, None)));
        }
        let known = self.bearer.read().clone();
        match known {
            Some((realm, service)) => self.bearer_token(&realm, &service, scope).await.map(Some),
            None => Ok(None),
        }
    }

    /// Reacts to a 401: fetch a token for the challenge (after dropping the one refused) or
    /// switch to Basic. `None` means there is nothing more to try.
    pub(super) async fn answer_challenge(
        &self,
        headers: &HeaderMap,
        default_scope: &str,
        refused: Option<TokenKey>,
    ) -> Result<Option<(HeaderValue, Option<TokenKey>)>, Error> {
        if let Some(key) = &refused {
            self.tokens.invalidate(key).await;
        }
        let challenges: Vec<_> = headers
            .get_all(header::WWW_AUTHENTICATE)
            .iter()
            .filter_map(|v| v.to_str().ok())
            .flat_map(parse_challenges)
            .collect();
        if let Some(bearer) = challenges.iter().find(|c| c.scheme == "bearer") {
            let Some(realm) = bearer.param("realm") else {
                return Err(Error::BadResponse(
                    "Bearer challenge without a realm".into(),
                ));
            };
            let service = bearer.param("service").unwrap_or_default();
            *self.bearer.write() = Some((realm.to_owned(), service.to_owned()));
            // Upstream's own scope wins when given; several scopes are space-separated.
            let scope = bearer.param("scope").unwrap_or(default_scope);
            return self.bearer_token(realm, service, scope).await.map(Some);
        }
        if challenges.iter().any(|c| c.scheme == "basic") {
            self.basic.store(true, Ordering::Relaxed);
            return Ok(self.basic_header().map(|h| (h, None)));
        }
        Ok(None)
    }

    fn basic_header(&self) -> Option<HeaderValue> {
        use base64::Engine as _;
        let c = self.credentials.as_ref()?;
        let raw = format!("{}:{}", c.username, c.password.0);
        let mut value = HeaderValue::from_str(&format!(
            "Basic {}",
            base64::engine::general_purpose::STANDARD.encode(raw)
        ))
        .ok()?;
        value.set_sensitive(true);
        Some(value)
    }
}
