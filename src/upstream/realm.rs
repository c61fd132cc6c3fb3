//! Where a token request may go. The realm comes from upstream's `WWW-Authenticate`, so an
//! upstream that is hostile (or compromised) could aim pullthrough's token requests, and the
//! credentials they carry, at services only pullthrough's host can reach: its own loopback, a
//! cloud metadata endpoint (169.254.169.254), the private network. A realm is asked only when
//! every address its host resolves to is public, or of a kind the upstream's own host is on
//! (a registry on the private network has its token service there too). The connection then
//! goes to exactly the addresses checked (a pin in the token client's resolver), so a second
//! DNS answer cannot move it elsewhere.

use super::{Error, Upstream};
use parking_lot::Mutex;
use std::collections::HashMap;
use std::fmt;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::sync::Arc;
use url::{Host, Url};

/// What an address reaches, coarsely: a realm may be on any but `Public` only when the upstream
/// is on the same kind.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Reach {
    /// Routable on the internet.
    Public,
    /// This host: 127/8, ::1, and the unspecified 0.0.0.0/8 and :: (which connect here).
    ThisHost,
    /// 169.254/16 (cloud metadata services) and fe80::/10.
    LinkLocal,
    /// RFC 1918, fc00::/7 and every other range that is not routed on the internet (shared
    /// 100.64/10, benchmarking, documentation, reserved, multicast, site-local).
    Private,
}

impl fmt::Display for Reach {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Reach::Public => "public",
            Reach::ThisHost => "loopback",
            Reach::LinkLocal => "link-local",
            Reach::Private => "private",
        })
    }
}

/// Classifies an address; IPv4-mapped (`::ffff:a.b.c.d`) and NAT64 (`64:ff9b::/96`) forms as
/// the IPv4 address they lead to.
pub(super) fn reach(ip: IpAddr) -> Reach {
    match ip.to_canonical() {
        IpAddr::V4(v4) => reach_v4(v4),
        IpAddr::V6(v6) => reach_v6(v6),
    }
}

fn reach_v4(ip: Ipv4Addr) -> Reach {
    let [a, b, c, _] = ip.octets();
    if ip.is_loopback() || a == 0 {
        Reach::ThisHost
    } else if ip.is_link_local() {
        Reach::LinkLocal
    } else if ip.is_private()
        || (a == 100 && (64..128).contains(&b))
        || (a == 192 && b == 0 && (c == 0 || c == 2))
        || (a == 198 && (b == 18 || b == 19 || (b == 51 && c == 100)))
        || (a == 203 && b == 0 && c == 113)
        || a >= 224
    {
        Reach::Private
    } else {
        Reach::Public
    }
}

fn reach_v6(ip: Ipv6Addr) -> Reach {
    let s = ip.segments();
    if ip.is_loopback() || ip.is_unspecified() {
        Reach::ThisHost
    } else if s[0] & 0xffc0 == 0xfe80 {
        Reach::LinkLocal
    } else if s[..6] == [0x64, 0xff9b, 0, 0, 0, 0] {
        let [a, b] = s[6].to_be_bytes();
        let [c, d] = s[7].to_be_bytes();
        reach_v4(Ipv4Addr::new(a, b, c, d))
    } else if s[0] & 0xfe00 == 0xfc00
        || s[0] & 0xffc0 == 0xfec0
        || s[0] & 0xff00 == 0xff00
        || (s[0] == 0x2001 && s[1] == 0x0db8)
        || s[..4] == [0x100, 0, 0, 0]
        || s[..6] == [0; 6]
    {
        // ULA, site-local, multicast, documentation, discard, IPv4-compatible.
        Reach::Private
    } else {
        Reach::Public
    }
}

/// The first of `realm`'s addresses a token request must not go to, given the kinds of
/// address the upstream is on.
pub(super) fn first_refused(realm: &[IpAddr], upstream: &[Reach]) -> Option<(IpAddr, Reach)> {
    realm
        .iter()
        .map(|ip| (*ip, reach(*ip)))
        .find(|(_, r)| *r != Reach::Public && !upstream.contains(r))
}

/// Every address of `url`'s host: the literal one, or what DNS answers.
async fn addresses(url: &Url) -> Result<Vec<IpAddr>, String> {
    match url.host() {
        Some(Host::Ipv4(ip)) => Ok(vec![IpAddr::V4(ip)]),
        Some(Host::Ipv6(ip)) => Ok(vec![IpAddr::V6(ip)]),
        Some(Host::Domain(name)) => {
            let found: Vec<IpAddr> = tokio::net::lookup_host((name, 0))
                .await
                .map_err(|e| format!("{name} does not resolve: {e}"))?
                .map(|a| a.ip())
                .collect();
            if found.is_empty() {
                return Err(format!("{name} resolves to no address"));
            }
            Ok(found)
        }
        None => Err("no host".into()),
    }
}

impl Upstream {
    /// Refuses a token realm on a loopback, link-local or private address unless the upstream
    /// itself is on that kind of address, and pins the addresses checked for the connection.
    /// Runs before every token request, so a refused realm is sent nothing.
    pub(super) async fn check_realm(&self, realm: &Url) -> Result<(), Error> {
        let host = realm.host_str().unwrap_or_default();
        let found = addresses(realm)
            .await
            .map_err(|e| Error::Token(format!("token realm: {e}")))?;
        if found.iter().any(|ip| reach(*ip) != Reach::Public) {
            // Only now is the upstream's own host looked up: a public realm needs no lookup.
            let upstream: Vec<Reach> = addresses(&self.base)
                .await
                .map_err(|e| Error::Token(format!("checking the token realm: upstream {e}")))?
                .into_iter()
                .map(reach)
                .collect();
            if let Some((ip, kind)) = first_refused(&found, &upstream) {
                return Err(Error::Token(format!(
                    "token realm {host} is on {kind} address {ip} and the upstream is not; refused"
                )));
            }
        }
        if let Some(Host::Domain(name)) = realm.host() {
            self.realm_pins.pin(name, &found);
        }
        Ok(())
    }
}

/// Most realm hosts pinned at once. An upstream names one or two; a hostile one naming more
/// only evicts pins of its own realms.
const MAX_PINS: usize = 256;

/// The token client's resolver: a realm host resolves to the addresses its check allowed;
/// any other name (an HTTP proxy's) through the system resolver.
#[derive(Debug, Default)]
pub(super) struct PinnedResolver {
    pins: Mutex<HashMap<String, Arc<[SocketAddr]>>>,
}

impl PinnedResolver {
    /// Pins `name` to `ips` (port 0: reqwest puts the URL's port in).
    fn pin(&self, name: &str, ips: &[IpAddr]) {
        let addrs: Arc<[SocketAddr]> = ips.iter().map(|ip| SocketAddr::new(*ip, 0)).collect();
        let mut pins = self.pins.lock();
        if pins.len() >= MAX_PINS && !pins.contains_key(name) {
            pins.clear();
        }
        pins.insert(name.to_ascii_lowercase(), addrs);
    }
}

impl reqwest::dns::Resolve for PinnedResolver {
    fn resolve(&self, name: reqwest::dns::Name) -> reqwest::dns::Resolving {
        let host = name.as_str().to_ascii_lowercase();
        let pinned = self.pins.lock().get(&host).cloned();
        Box::pin(async move {
            let addrs: Vec<SocketAddr> = match pinned {
                Some(pinned) => pinned.to_vec(),
                None => tokio::net::lookup_host((host.as_str(), 0)).await?.collect(),
            };
            Ok(Box::new(addrs.into_iter()) as reqwest::dns::Addrs)
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use reqwest::dns::Resolve as _;

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    #[test]
    fn classifies_addresses() {
        let cases = [
            ("127.0.0.1", Reach::ThisHost),
            ("127.8.9.10", Reach::ThisHost),
            ("0.0.0.0", Reach::ThisHost),
            ("::1", Reach::ThisHost),
            ("::", Reach::ThisHost),
            ("::ffff:127.0.0.1", Reach::ThisHost),
            ("169.254.169.254", Reach::LinkLocal),
            ("::ffff:169.254.169.254", Reach::LinkLocal),
            ("64:ff9b::a9fe:a9fe", Reach::LinkLocal),
            ("fe80::1", Reach::LinkLocal),
            ("febf::1", Reach::LinkLocal),
            ("10.0.0.1", Reach::Private),
            ("172.16.0.1", Reach::Private),
            ("172.31.255.255", Reach::Private),
            ("192.168.1.1", Reach::Private),
            ("::ffff:192.168.1.1", Reach::Private),
            ("100.100.100.200", Reach::Private),
            ("198.18.0.1", Reach::Private),
            ("255.255.255.255", Reach::Private),
            ("fd00:ec2::254", Reach::Private),
            ("fc00::1", Reach::Private),
            ("::10.0.0.1", Reach::Private),
            ("2001:db8::1", Reach::Private),
            ("172.32.0.1", Reach::Public),
            ("100.128.0.1", Reach::Public),
            ("8.8.8.8", Reach::Public),
            ("::ffff:8.8.8.8", Reach::Public),
            ("64:ff9b::808:808", Reach::Public),
            ("2606:4700::1111", Reach::Public),
        ];
        for (text, want) in cases {
            assert_eq!(reach(ip(text)), want, "{text}");
        }
    }

    #[test]
    fn a_realm_may_be_only_where_the_upstream_is() {
        use Reach::*;
        let cases: [(&[&str], &[Reach], bool); 9] = [
            (&["54.1.2.3"], &[Public], true),
            (&["54.1.2.3", "10.0.0.1"], &[Public], false),
            (&["127.0.0.1"], &[Public], false),
            (&["169.254.169.254"], &[Public, Private], false),
            (&["10.0.0.7"], &[Private], true),
            (&["127.0.0.1"], &[Private], false),
            (&["127.0.0.1", "::1"], &[ThisHost], true),
            (&["10.0.0.1"], &[ThisHost], false),
            (&["::ffff:169.254.169.254"], &[ThisHost], false),
        ];
        for (realm, upstream, allowed) in cases {
            let realm: Vec<IpAddr> = realm.iter().map(|s| ip(s)).collect();
            assert_eq!(
                first_refused(&realm, upstream).is_none(),
                allowed,
                "{realm:?} {upstream:?}"
            );
        }
    }

    #[tokio::test]
    async fn a_pinned_name_resolves_only_to_its_checked_addresses() {
        let resolver = PinnedResolver::default();
        resolver.pin("Realm.Example", &[ip("203.0.114.9")]);
        let name = |s: &str| s.parse::<reqwest::dns::Name>().unwrap();
        let pinned: Vec<SocketAddr> = resolver
            .resolve(name("realm.example"))
            .await
            .unwrap()
            .collect();
        assert_eq!(pinned, vec!["203.0.114.9:0".parse().unwrap()]);
        let other: Vec<IpAddr> = resolver
            .resolve(name("localhost"))
            .await
            .unwrap()
            .map(|a| a.ip())
            .collect();
        assert!(
            other.iter().all(IpAddr::is_loopback) && !other.is_empty(),
            "{other:?}"
        );
    }
}
