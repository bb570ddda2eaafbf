//! Connection policy: which TCP connections the shim protects, and which peers they accept.
//!
//! The policy is written in tetherd's config and delivered to each process with its SVID.
//! Anything no rule matches passes through untouched (unless `default = "deny"`).

use std::fmt;
use std::net::{IpAddr, SocketAddr};
use std::str::FromStr;

use ipnet::IpNet;
use serde::{Deserialize, Deserializer, Serialize, Serializer};

use crate::spiffe::{IdPattern, SpiffeId};

/// How a matched rule is enforced.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
#[non_exhaustive]
pub enum Mode {
    /// Mutual TLS is required; anything else fails closed.
    #[default]
    Mutual,
    /// Inbound only: accept tether mTLS clients and plaintext clients on the same port.
    Permissive,
    /// Enforce and encrypt nothing; log and count what would have happened.
    Observe,
}

impl fmt::Display for Mode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::Mutual => "mutual",
            Self::Permissive => "permissive",
            Self::Observe => "observe",
        })
    }
}

/// What happens to TCP traffic no rule matches.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
#[non_exhaustive]
pub enum DefaultAction {
    #[default]
    Allow,
    Deny,
}

/// Protect connections accepted on these local ports.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct InboundRule {
    pub ports: Vec<u16>,
    /// Client IDs allowed to connect.
    pub allow: Vec<IdPattern>,
    #[serde(default)]
    pub mode: Mode,
    /// Accept a peer's TCP EOF without a TLS `close_notify` as a clean end of stream. Off by
    /// default: a missing close_notify (an on-path attacker can cut a close-delimited body
    /// short) reaches the program as ECONNRESET.
    #[serde(default)]
    pub allow_truncation: bool,
}

/// Protect connections to these destinations.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct OutboundRule {
    pub to: Vec<Destination>,
    /// Server IDs we accept at those destinations.
    pub allow: Vec<IdPattern>,
    #[serde(default)]
    pub mode: Mode,
    /// Accept a peer's TCP EOF without a TLS `close_notify` as a clean end of stream. Off by
    /// default: a missing close_notify (an on-path attacker can cut a close-delimited body
    /// short) reaches the program as ECONNRESET.
    #[serde(default)]
    pub allow_truncation: bool,
}

/// The whole connection policy.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Policy {
    #[serde(default)]
    pub inbound: Vec<InboundRule>,
    #[serde(default)]
    pub outbound: Vec<OutboundRule>,
    /// Unmatched outbound TCP: allow (default) or deny.
    #[serde(default)]
    pub default: DefaultAction,
}

impl Policy {
    /// The first inbound rule that covers `local_port`.
    pub fn inbound_rule(&self, local_port: u16) -> Option<&InboundRule> {
        self.inbound.iter().find(|r| r.ports.contains(&local_port))
    }

    /// The first outbound rule that covers `dest`. IPv4-mapped IPv6 addresses are matched
    /// as IPv4, so a v4 rule cannot be bypassed through an AF_INET6 socket.
    pub fn outbound_rule(&self, dest: SocketAddr) -> Option<&OutboundRule> {
        let dest = canonical(dest);
        self.outbound.iter().find(|r| r.to.iter().any(|d| d.contains(dest)))
    }
}

impl InboundRule {
    pub fn allows(&self, peer: &SpiffeId) -> bool {
        self.allow.iter().any(|p| p.matches(peer))
    }
}

impl OutboundRule {
    pub fn allows(&self, peer: &SpiffeId) -> bool {
        self.allow.iter().any(|p| p.matches(peer))
    }
}

/// Map `::ffff:a.b.c.d` to `a.b.c.d`.
pub fn canonical(addr: SocketAddr) -> SocketAddr {
    match addr {
        SocketAddr::V6(v6) => match v6.ip().to_ipv4_mapped() {
            Some(v4) => SocketAddr::new(IpAddr::V4(v4), v6.port()),
            None => addr,
        },
        SocketAddr::V4(_) => addr,
    }
}

/// `CIDR:PORT` or `CIDR:*`; IPv6 networks are bracketed: `[::1]/128:8443`.
/// A bare address means a single host (`/32` or `/128`).
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub struct Destination {
    pub net: IpNet,
    /// `None` is `*`: every port.
    pub port: Option<u16>,
}

impl Destination {
    pub fn contains(&self, addr: SocketAddr) -> bool {
        self.net.contains(&addr.ip()) && self.port.is_none_or(|p| p == addr.port())
    }
}

/// Why a destination string does not parse.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DestinationError(pub String);

impl fmt::Display for DestinationError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "bad destination: {} (expected CIDR:PORT, CIDR:*, or [V6CIDR]:PORT)", self.0)
    }
}

impl std::error::Error for DestinationError {}

impl FromStr for Destination {
    type Err = DestinationError;

    fn from_str(s: &str) -> Result<Self, DestinationError> {
        let err = |why: &str| DestinationError(format!("{s:?}: {why}"));
        let (net_part, port_part) = s.rsplit_once(':').ok_or_else(|| err("missing ':PORT'"))?;
        let port = match port_part {
            "*" => None,
            p => Some(p.parse::<u16>().map_err(|_| err("port must be 0-65535 or *"))?),
        };
        let net_part = match net_part.strip_prefix('[') {
            Some(inner) => {
                // `[::1]/128` or `[::1/128]` or `[::1]`
                let (addr, rest) = inner.split_once(']').ok_or_else(|| err("missing ']'"))?;
                format!("{addr}{rest}")
            }
            None => {
                if net_part.contains(':') {
                    return Err(err("IPv6 networks must be bracketed, e.g. [::1]/128:8443"));
                }
                net_part.to_owned()
            }
        };
        let net = if net_part.contains('/') {
            net_part.parse::<IpNet>().map_err(|_| err("invalid CIDR"))?
        } else {
            IpNet::from(net_part.parse::<IpAddr>().map_err(|_| err("invalid IP address"))?)
        };
        if net.trunc() != net {
            return Err(err("CIDR has host bits set"));
        }
        Ok(Self { net, port })
    }
}

impl fmt::Display for Destination {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.net {
            IpNet::V4(n) => write!(f, "{n}")?,
            IpNet::V6(n) => write!(f, "[{}]/{}", n.addr(), n.prefix_len())?,
        }
        match self.port {
            Some(p) => write!(f, ":{p}"),
            None => f.write_str(":*"),
        }
    }
}

impl fmt::Debug for Destination {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Destination({self})")
    }
}

impl Serialize for Destination {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for Destination {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sa(s: &str) -> SocketAddr {
        s.parse().unwrap()
    }

    #[test]
    fn destinations_parse_and_match() {
        let d: Destination = "127.0.0.1/32:8443".parse().unwrap();
        assert!(d.contains(sa("127.0.0.1:8443")));
        assert!(!d.contains(sa("127.0.0.1:8444")));
        let any: Destination = "10.0.0.0/8:*".parse().unwrap();
        assert!(any.contains(sa("10.9.8.7:1")));
        assert!(!any.contains(sa("11.0.0.1:1")));
        let v6: Destination = "[::1]/128:443".parse().unwrap();
        assert!(v6.contains(sa("[::1]:443")));
        let bare: Destination = "192.168.1.5:80".parse().unwrap();
        assert_eq!(bare.to_string(), "192.168.1.5/32:80");
        for bad in ["10.0.0.0/8", "10.0.0.1/8:80", "::1:80", "1.2.3.4:99999", "x:1", "[::1:80"] {
            assert!(bad.parse::<Destination>().is_err(), "{bad}");
        }
    }

    #[test]
    fn mapped_v6_destinations_match_v4_rules() {
        let policy: Policy = serde_json::from_str(
            r#"{"outbound":[{"to":["127.0.0.0/8:8443"],"allow":["spiffe://a/*"]}]}"#,
        )
        .unwrap();
        assert!(policy.outbound_rule(sa("[::ffff:127.0.0.1]:8443")).is_some());
        assert!(policy.outbound_rule(sa("127.0.0.1:80")).is_none());
    }

    #[test]
    fn unknown_policy_fields_are_rejected() {
        let r: Result<Policy, _> =
            serde_json::from_str(r#"{"inbound":[{"ports":[1],"allow":[],"mod":"observe"}]}"#);
        assert!(r.is_err());
    }
}
