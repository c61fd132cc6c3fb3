//! Token requests: the OAuth2 password grant and the GET form (distribution `oauth.md`,
//! `token.md`), cached per realm, service, scope and identity.

use super::{Error, MAX_SMALL_BODY, Upstream, auth, read_limited};
use crate::metrics::UpstreamKind;
use auth::{Credentials, TokenKey, realm_trusted};
use reqwest::StatusCode;
use reqwest::header::{self, HeaderValue};
use std::sync::atomic::Ordering;
use std::time::Instant;
use url::Url;

impl Upstream {
    pub(super) async fn bearer_token(
        &self,
        realm: &str,
        service: &str,
        scope: &str,
    ) -> Result<(HeaderValue, Option<TokenKey>), Error> {
        let realm_url = Url::parse(realm)
            .map_err(|_| Error::BadResponse(format!("token realm {realm:?} is not a URL")))?;
        let credentials = self
            .credentials
            .as_ref()
            .filter(|_| realm_trusted(&self.base, &realm_url));
        if self.credentials.is_some()
            && credentials.is_none()
            && !self.warned_realm.swap(true, Ordering::Relaxed)
        {
            tracing::warn!(realm = %realm_url.host_str().unwrap_or_default(), "token realm is not on the upstream's domain; requesting tokens anonymously");
        }
        let mut key = TokenKey {
            realm: realm.to_owned(),
            service: service.to_owned(),
            scope: scope.to_owned(),
            authenticated: credentials.is_some(),
        };
        let mut fetched = self
            .tokens
            .get_or_fetch(
                key.clone(),
                self.fetch_token(realm_url.clone(), service, scope, credentials),
            )
            .await;
        if let Err(e) = &fetched
            && credentials.is_some()
            && matches!(**e, Error::CredentialsRefused)
        {
            // Wrong credentials must not take public images away: public content is fetched
            // anonymously, and the refusal is logged as an error each minute it goes on, so a
            // typo in a password is never silent.
            self.log_refused_credentials(&realm_url);
            key.authenticated = false;
            fetched = self
                .tokens
                .get_or_fetch(
                    key.clone(),
                    self.fetch_token(realm_url, service, scope, None),
                )
                .await;
        }
        let token = fetched.map_err(|e| (*e).clone())?;
        let mut value = HeaderValue::from_str(&format!("Bearer {}", token.secret))
            .map_err(|_| Error::Token("token has invalid characters".into()))?;
        value.set_sensitive(true);
        Ok((value, Some(key)))
    }

    /// OAuth2 password grant first when we have credentials (Docker's own flow), falling back
    /// to the GET form every token server supports (containerd does the same).
    async fn fetch_token(
        &self,
        realm: Url,
        service: &str,
        scope: &str,
        credentials: Option<&Credentials>,
    ) -> Result<auth::Token, Error> {
        // Before the realm check too: it resolves the realm's host name.
        self.check_online()?;
        self.check_realm(&realm).await?;
        if let Some(c) = credentials {
            let post_ok = !self.post_unsupported.lock().contains(realm.as_str());
            if post_ok {
                let body = {
                    let mut form = url::form_urlencoded::Serializer::new(String::new());
                    form.append_pair("grant_type", "password")
                        .append_pair("username", &c.username)
                        .append_pair("password", &c.password.0)
                        .append_pair("service", service)
                        .append_pair("client_id", "pullthrough")
                        .append_pair("access_type", "offline");
                    if !scope.is_empty() {
                        form.append_pair("scope", scope);
                    }
                    form.finish()
                };
                let started = Instant::now();
                let response = self
                    .token_http
                    .post(realm.clone())
                    .header(
                        header::CONTENT_TYPE,
                        "application/x-www-form-urlencoded; charset=utf-8",
                    )
                    .body(body)
                    .timeout(self.request_timeout)
                    .send()
                    .await;
                let response = self.counted(response, started)?;
                match response.status() {
                    s if s.is_success() => return parse_token(response).await,
                    s if s.is_redirection() => return Err(token_redirected(s)),
                    StatusCode::NOT_FOUND | StatusCode::METHOD_NOT_ALLOWED => {
                        self.post_unsupported.lock().insert(realm.to_string());
                    }
                    StatusCode::BAD_REQUEST | StatusCode::UNAUTHORIZED | StatusCode::FORBIDDEN => {}
                    other => {
                        return Err(Error::Token(format!(
                            "token endpoint answered HTTP {}",
                            other.as_u16()
                        )));
                    }
                }
            }
        }
        let mut url = realm;
        {
            let mut q = url.query_pairs_mut();
            if !service.is_empty() {
                q.append_pair("service", service);
            }
            for s in scope.split(' ').filter(|s| !s.is_empty()) {
                q.append_pair("scope", s);
            }
            if let Some(c) = credentials {
                q.append_pair("account", &c.username);
            }
        }
        let mut request = self.token_http.get(url).timeout(self.request_timeout);
        if let Some(c) = credentials {
            request = request.basic_auth(&c.username, Some(&c.password.0));
        }
        let started = Instant::now();
        let response = self.counted(request.send().await, started)?;
        match response.status() {
            s if s.is_success() => parse_token(response).await,
            s if s.is_redirection() => Err(token_redirected(s)),
            StatusCode::UNAUTHORIZED if credentials.is_some() => Err(Error::CredentialsRefused),
            other => Err(Error::Token(format!(
                "token endpoint answered HTTP {}",
                other.as_u16()
            ))),
        }
    }
}

impl Upstream {
    /// Counts a token request and turns a transport failure into a token error.
    fn counted(
        &self,
        sent: reqwest::Result<reqwest::Response>,
        started: Instant,
    ) -> Result<reqwest::Response, Error> {
        let status = sent.as_ref().ok().map(|r| r.status().as_u16());
        self.metrics
            .upstream(UpstreamKind::Token, status, started.elapsed());
        let response = sent.map_err(|e| {
            let e = Error::Token(Error::from_reqwest(e.without_url()).to_string());
            self.metrics
                .upstream_failed(UpstreamKind::Token, None, e.to_string());
            e
        })?;
        if response.status().is_server_error() {
            self.metrics.upstream_failed(
                UpstreamKind::Token,
                status,
                format!(
                    "token endpoint answered HTTP {}",
                    response.status().as_u16()
                ),
            );
        }
        Ok(response)
    }

    /// Logs that the realm refused the configured credentials: at once, then at most once a
    /// minute while it goes on.
    fn log_refused_credentials(&self, realm: &Url) {
        let now = self.started.elapsed().as_secs().max(1);
        let last = self.refused_logged_at.load(Ordering::Relaxed);
        if (last == 0 || now.saturating_sub(last) >= 60)
            && self
                .refused_logged_at
                .compare_exchange(last, now, Ordering::Relaxed, Ordering::Relaxed)
                .is_ok()
        {
            tracing::error!(
                realm = %realm.host_str().unwrap_or_default(),
                username = self.credentials.as_ref().map(|c| c.username.as_str()),
                "the token realm refused the configured upstream credentials; private images cannot be pulled and public ones are fetched anonymously (check upstream_username and upstream_password)"
            );
        }
    }
}

/// A token endpoint answered with a redirect, which is not followed: its target was not
/// checked as the realm was, and a token server answers for itself.
fn token_redirected(status: StatusCode) -> Error {
    Error::Token(format!(
        "token endpoint redirected (HTTP {}); not followed",
        status.as_u16()
    ))
}

async fn parse_token(response: reqwest::Response) -> Result<auth::Token, Error> {
    let received = Instant::now();
    let body = read_limited(response, MAX_SMALL_BODY)
        .await
        .map_err(|e| Error::Token(e.to_string()))?;
    let parsed: auth::TokenResponse = serde_json::from_slice(&body)
        .map_err(|_| Error::Token("token response is not JSON".into()))?;
    parsed
        .into_token(received)
        .ok_or_else(|| Error::Token("token response has no token".into()))
}
