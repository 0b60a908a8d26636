//! Which addresses Herald may send webhooks to (an SSRF defence), judged on the resolved
//! address at connect time, so a name that resolves elsewhere later (DNS rebinding) gains
//! nothing.
//!
//! Always refused unless a CIDR of the allow-list covers them: link-local addresses (cloud
//! metadata services live there: 169.254.169.254, and AWS's fd00:ec2::254; also Alibaba's
//! 100.100.100.200), unspecified, multicast and broadcast addresses, and the IPv4-mapped,
//! NAT64 and 6to4 forms of those. Loopback and private ranges are allowed under
//! [`EndpointPolicy::AllowPrivate`] (the default: an internal broker's subscribers are internal
//! services) and refused under [`EndpointPolicy::PublicOnly`].

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::sync::Arc;

use hyper_util::client::legacy::connect::dns::Name;
use ipnet::IpNet;

/// The policy for webhook endpoint addresses.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, clap::ValueEnum)]
pub enum EndpointPolicy {
    /// Loopback and private addresses are allowed; link-local, metadata, unspecified,
    /// multicast and broadcast addresses are not.
    #[default]
    AllowPrivate,
    /// Only public addresses (and the allow-list).
    PublicOnly,
}

/// The policy with its allow-list: what the delivery client and Subscribe check.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct AddressRules {
    /// Which ranges are refused.
    pub policy: EndpointPolicy,
    /// Ranges allowed whatever the policy says.
    pub allow: Vec<IpNet>,
}

/// Why an address is refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error(
    "endpoint policy: {address} is {kind}, which {rule} (the endpoint allow-list can admit it)"
)]
pub struct Refused {
    /// The address refused.
    pub address: IpAddr,
    /// What kind of address it is.
    pub kind: &'static str,
    /// Which rule refuses it.
    pub rule: &'static str,
}

const ALWAYS: &str = "is never a webhook endpoint";
const PUBLIC_ONLY: &str = "--endpoint-policy public-only refuses";

impl AddressRules {
    /// Checks one address.
    pub fn check(&self, address: IpAddr) -> Result<(), Refused> {
        if self.allow.iter().any(|net| net.contains(&address)) {
            return Ok(());
        }
        // Judge an IPv4 address embedded in an IPv6 one by the IPv4 rules as well.
        if let IpAddr::V6(v6) = address
            && let Some(v4) = embedded_ipv4(v6)
        {
            self.check(IpAddr::V4(v4)).map_err(|refused| Refused {
                address,
                kind: refused.kind,
                rule: refused.rule,
            })?;
        }
        let refuse = |kind, rule| {
            Err(Refused {
                address,
                kind,
                rule,
            })
        };
        if let Some(kind) = never_allowed(address) {
            return refuse(kind, ALWAYS);
        }
        if self.policy == EndpointPolicy::PublicOnly
            && let Some(kind) = not_public(address)
        {
            return refuse(kind, PUBLIC_ONLY);
        }
        Ok(())
    }
}

/// The kind of an address that is never a webhook endpoint, if it is one.
fn never_allowed(address: IpAddr) -> Option<&'static str> {
    match address {
        IpAddr::V4(v4) => {
            if v4.is_link_local() {
                Some("link-local (cloud metadata services live there)")
            } else if v4 == Ipv4Addr::new(100, 100, 100, 200) {
                Some("a cloud metadata address")
            } else if v4.is_unspecified() || v4.octets()[0] == 0 {
                Some("unspecified")
            } else if v4.is_multicast() {
                Some("multicast")
            } else if v4.is_broadcast() {
                Some("broadcast")
            } else {
                None
            }
        }
        IpAddr::V6(v6) => {
            if (v6.segments()[0] & 0xffc0) == 0xfe80 {
                Some("link-local (cloud metadata services live there)")
            } else if v6 == Ipv6Addr::new(0xfd00, 0xec2, 0, 0, 0, 0, 0, 0x254) {
                Some("a cloud metadata address")
            } else if v6.is_unspecified() {
                Some("unspecified")
            } else if v6.is_multicast() {
                Some("multicast")
            } else {
                None
            }
        }
    }
}

/// The kind of a non-public address, if it is one.
fn not_public(address: IpAddr) -> Option<&'static str> {
    match address {
        IpAddr::V4(v4) => {
            let [a, b, ..] = v4.octets();
            if v4.is_loopback() {
                Some("loopback")
            } else if v4.is_private() {
                Some("private")
            } else if a == 100 && (64..128).contains(&b) {
                Some("shared address space (carrier-grade NAT)")
            } else if a == 198 && (b == 18 || b == 19) {
                Some("a benchmarking range")
            } else if a >= 240 {
                Some("reserved")
            } else {
                None
            }
        }
        IpAddr::V6(v6) => {
            if v6.is_loopback() {
                Some("loopback")
            } else if (v6.segments()[0] & 0xfe00) == 0xfc00 {
                Some("private (unique local)")
            } else {
                None
            }
        }
    }
}

/// The IPv4 address carried by an IPv4-mapped (`::ffff:a.b.c.d`), IPv4-compatible, NAT64
/// (`64:ff9b::/96`) or 6to4 (`2002:AABB:CCDD::/48`) address.
fn embedded_ipv4(v6: Ipv6Addr) -> Option<Ipv4Addr> {
    if let Some(v4) = v6.to_ipv4_mapped() {
        return Some(v4);
    }
    let segments = v6.segments();
    let low = || {
        Ipv4Addr::new(
            (segments[6] >> 8) as u8,
            segments[6] as u8,
            (segments[7] >> 8) as u8,
            segments[7] as u8,
        )
    };
    if segments[..6] == [0x64, 0xff9b, 0, 0, 0, 0] {
        return Some(low());
    }
    if segments[0] == 0x2002 {
        return Some(Ipv4Addr::new(
            (segments[1] >> 8) as u8,
            segments[1] as u8,
            (segments[2] >> 8) as u8,
            segments[2] as u8,
        ));
    }
    // IPv4-compatible (deprecated `::a.b.c.d`), but not `::` or `::1`.
    if segments[..6] == [0; 6] && (segments[6] != 0 || segments[7] > 1) {
        return Some(low());
    }
    None
}

/// A DNS resolver for the delivery client that resolves with the system resolver and keeps
/// only the addresses the rules allow; if none is left, the attempt fails with the reason
/// and no connection is made.
#[derive(Clone)]
pub struct PolicyResolver {
    rules: Arc<AddressRules>,
}

impl PolicyResolver {
    /// A resolver enforcing `rules`.
    pub fn new(rules: Arc<AddressRules>) -> Self {
        PolicyResolver { rules }
    }
}

/// The addresses a name resolved to that the rules allow.
pub type Allowed = std::vec::IntoIter<SocketAddr>;

/// Why a name gave no address to connect to: it did not resolve, or the rules refused all
/// of its addresses ([`Refused`], found with [`refusal_in`]).
pub type ResolveError = Box<dyn std::error::Error + Send + Sync>;

impl tower_service::Service<Name> for PolicyResolver {
    type Response = Allowed;
    type Error = ResolveError;
    type Future =
        std::pin::Pin<Box<dyn std::future::Future<Output = Result<Allowed, ResolveError>> + Send>>;

    fn poll_ready(
        &mut self,
        _: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Result<(), ResolveError>> {
        std::task::Poll::Ready(Ok(()))
    }

    fn call(&mut self, name: Name) -> Self::Future {
        let rules = self.rules.clone();
        Box::pin(async move {
            let resolved: Vec<SocketAddr> =
                tokio::net::lookup_host((name.as_str(), 0)).await?.collect();
            let mut refusal = None;
            let allowed: Vec<SocketAddr> = resolved
                .into_iter()
                .filter(|address| match rules.check(address.ip()) {
                    Ok(()) => true,
                    Err(refused) => {
                        refusal.get_or_insert(refused);
                        false
                    }
                })
                .collect();
            match (allowed.is_empty(), refusal) {
                (true, Some(refused)) => Err(Box::new(refused) as ResolveError),
                _ => Ok(allowed.into_iter()),
            }
        })
    }
}

/// Checks an endpoint URL's host: a literal address against the rules, a name by resolving it
/// now (a name that does not resolve yet is accepted: every attempt checks again).
pub async fn check_endpoint(rules: &AddressRules, host: &url::Host<&str>) -> Result<(), Refused> {
    match host {
        url::Host::Ipv4(v4) => rules.check(IpAddr::V4(*v4)),
        url::Host::Ipv6(v6) => rules.check(IpAddr::V6(*v6)),
        url::Host::Domain(name) => {
            let Ok(addresses) = tokio::net::lookup_host((*name, 0)).await else {
                return Ok(());
            };
            for address in addresses {
                rules.check(address.ip())?;
            }
            Ok(())
        }
    }
}

/// Finds a policy refusal in an error's chain of causes.
pub fn refusal_in<'a>(error: &'a (dyn std::error::Error + 'static)) -> Option<&'a Refused> {
    let mut current = Some(error);
    while let Some(error) = current {
        if let Some(refused) = error.downcast_ref::<Refused>() {
            return Some(refused);
        }
        current = error.source();
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rules(policy: EndpointPolicy, allow: &[&str]) -> AddressRules {
        AddressRules {
            policy,
            allow: allow.iter().map(|net| net.parse().unwrap()).collect(),
        }
    }

    fn refused(rules: &AddressRules, address: &str) -> bool {
        rules.check(address.parse().unwrap()).is_err()
    }

    #[test]
    fn metadata_link_local_and_special_addresses_are_always_refused() {
        let default = rules(EndpointPolicy::AllowPrivate, &[]);
        for address in [
            "169.254.169.254",
            "169.254.0.1",
            "100.100.100.200",
            "fe80::1",
            "fd00:ec2::254",
            "0.0.0.0",
            "0.1.2.3",
            "::",
            "224.0.0.1",
            "ff02::1",
            "255.255.255.255",
            // The IPv4-mapped, IPv4-compatible, NAT64 and 6to4 forms of the metadata address.
            "::ffff:169.254.169.254",
            "::169.254.169.254",
            "64:ff9b::a9fe:a9fe",
            "2002:a9fe:a9fe::1",
        ] {
            assert!(refused(&default, address), "{address} should be refused");
        }
        let error = default.check("::ffff:169.254.169.254".parse().unwrap());
        assert!(error.unwrap_err().to_string().contains("link-local"));
    }

    #[test]
    fn private_ranges_depend_on_the_policy_and_the_allow_list_wins() {
        let default = rules(EndpointPolicy::AllowPrivate, &[]);
        let public_only = rules(EndpointPolicy::PublicOnly, &[]);
        for address in [
            "127.0.0.1",
            "::1",
            "10.1.2.3",
            "172.16.0.1",
            "192.168.1.1",
            "100.64.0.1",
            "fd12::1",
            "::ffff:10.0.0.1",
        ] {
            assert!(!refused(&default, address), "{address} allowed by default");
            assert!(
                refused(&public_only, address),
                "{address} refused when public-only"
            );
        }
        for address in ["93.184.216.34", "2606:2800:220:1::1", "8.8.8.8"] {
            assert!(!refused(&public_only, address), "{address} is public");
        }
        let excepted = rules(
            EndpointPolicy::PublicOnly,
            &["10.0.0.0/8", "169.254.169.254/32"],
        );
        assert!(!refused(&excepted, "10.9.9.9"));
        assert!(!refused(&excepted, "169.254.169.254"));
        assert!(refused(&excepted, "192.168.1.1"));
    }
}
