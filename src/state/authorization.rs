//! Who may see and pull what: the viewer of the cache API and the status page, and the
//! access rules applied to pulls and logins. Refusals become registry errors here.

use super::AppState;
use crate::error::Error;
use crate::proxy::Proxy;
use crate::registry::RepoName;
use std::sync::Arc;

/// Who is reading the cache API or the status page.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Viewer {
    /// Sees everything: the admin token, or no access control and no admin token.
    Admin,
    /// With access control: sees the repositories the rules let it pull.
    Client(crate::access::Identity),
    /// `admin_token` is set and was not given: sees no names.
    Nobody,
}

impl AppState {
    /// Who a request of the cache API or the status page is from: `admin` when it carries the
    /// admin token. With access control on, a client is identified as for a pull (and wrong
    /// credentials are refused as there).
    pub async fn viewer(
        &self,
        admin: bool,
        authorization: Option<&str>,
        peer: Option<std::net::IpAddr>,
    ) -> Result<Viewer, Error> {
        if admin {
            return Ok(Viewer::Admin);
        }
        match (&self.access, &self.admin_token) {
            (_, Some(_)) => Ok(Viewer::Nobody),
            (None, None) => Ok(Viewer::Admin),
            (Some(access), None) => Box::pin(access.identify(authorization, peer))
                .await
                .map(Viewer::Client)
                .map_err(refused),
        }
    }

    /// Whether `viewer` may see `repository` of `proxy`'s upstream: the same rule as pulling.
    pub fn may_see(&self, viewer: &Viewer, proxy: &Proxy, repository: &RepoName) -> bool {
        self.check_view(viewer, proxy, repository).is_ok()
    }

    /// [`Self::may_see`], with the error a refused viewer gets.
    pub fn check_view(
        &self,
        viewer: &Viewer,
        proxy: &Proxy,
        repository: &RepoName,
    ) -> Result<(), Error> {
        match (viewer, &self.access) {
            (Viewer::Admin, _) => Ok(()),
            (Viewer::Nobody, _) | (Viewer::Client(_), None) => Err(Error::AccessDenied),
            (Viewer::Client(identity), Some(access)) => access
                .allows(identity, self.rule_host(proxy), repository.as_str())
                .map_err(refused),
        }
    }

    /// How `[[access]]` rules name `proxy`'s upstream: `docker.io` for the default one.
    fn rule_host<'a>(&self, proxy: &'a Proxy) -> &'a str {
        if std::ptr::eq(proxy, Arc::as_ptr(&self.proxy)) {
            "docker.io"
        } else {
            proxy.name()
        }
    }

    /// Whether the client may pull `repository` from `proxy`'s upstream (always, without access
    /// control). Credentials are checked before anything is looked up or fetched, so private
    /// content, cached or downloading, is never served to a client that may not see it.
    pub async fn authorize(
        &self,
        authorization: Option<&str>,
        peer: Option<std::net::IpAddr>,
        proxy: &Proxy,
        repository: &str,
    ) -> Result<(), Error> {
        let Some(access) = &self.access else {
            return Ok(());
        };
        let identity = Box::pin(access.identify(authorization, peer))
            .await
            .map_err(refused)?;
        access
            .allows(&identity, self.rule_host(proxy), repository)
            .map_err(refused)
    }

    /// `GET /v2/` with access control: 200 for valid credentials, else 401 with the Basic
    /// challenge, so clients send the credentials they have.
    pub async fn check_login(
        &self,
        authorization: Option<&str>,
        peer: Option<std::net::IpAddr>,
    ) -> Result<(), Error> {
        use crate::access::Identity;
        let Some(access) = &self.access else {
            return Ok(());
        };
        match access
            .identify(authorization, peer)
            .await
            .map_err(refused)?
        {
            Identity::User(_) => Ok(()),
            Identity::Anonymous => Err(Error::Unauthenticated("authentication required")),
        }
    }
}

/// The registry error for an access refusal.
fn refused(refusal: crate::access::Refusal) -> Error {
    use crate::access::Refusal;
    match refusal {
        Refusal::Unauthenticated(why) => Error::Unauthenticated(why),
        Refusal::Denied => Error::AccessDenied,
        Refusal::Braked {
            address,
            retry_after,
        } => Error::LoginsBraked {
            address: crate::access::brake_label(address),
            retry_after,
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::access::Refusal;
    use std::time::Duration;

    #[test]
    fn refusals_become_registry_errors() {
        assert!(matches!(
            refused(Refusal::Unauthenticated("wrong password")),
            Error::Unauthenticated("wrong password")
        ));
        assert!(matches!(refused(Refusal::Denied), Error::AccessDenied));
        let braked = Refusal::Braked {
            address: "2001:db8::".parse().unwrap(),
            retry_after: Duration::from_secs(30),
        };
        match refused(braked) {
            Error::LoginsBraked {
                address,
                retry_after,
            } => assert_eq!(
                (address.as_str(), retry_after.as_secs()),
                ("2001:db8::/64", 30)
            ),
            other => panic!("{other:?}"),
        }
    }
}
