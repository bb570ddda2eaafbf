//! Connection policy: which TCP connections the shim protects, and which peers they accept.
//!
//! The policy is written in tetherd's config and delivered to each process with its SVID.
//! Anything no rule matches passes through untouched (unless `default = "deny"`).

use std::fmt;
use std::net::{IpAddr, SocketAddr};
use std::str::FromStr;
use std::time::Duration;

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
    /// Rotate the connection's TLS 1.3 traffic keys (a KeyUpdate that asks the peer to rotate
    /// too) after this much time (`"1h"`) or this many bytes sent + received (`"64GiB"`). Off
    /// by default.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub key_update_after: Option<KeyUpdateAfter>,
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
    /// Rotate the connection's TLS 1.3 traffic keys (a KeyUpdate that asks the peer to rotate
    /// too) after this much time (`"1h"`) or this many bytes sent + received (`"64GiB"`). Off
    /// by default.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub key_update_after: Option<KeyUpdateAfter>,
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
    /// as IPv4, so a v4 rule cannot be bypassed through an AF_INET6 socket, and an unspecified
    /// address as the loopback address Linux connects it to ([`canonical`]).
    pub fn outbound_rule(&self, dest: SocketAddr) -> Option<&OutboundRule> {
        self.outbound_rule_reaching(dest, dest)
    }

    /// The first outbound rule that covers `dest` as the program wrote it or `reached`, where
    /// the kernel will connect it (for `0.0.0.0` on a bound socket: its source address; see
    /// [`canonical`] for the rest). Either one named by a rule protects the connection: never
    /// fail open.
    pub fn outbound_rule_reaching(&self, dest: SocketAddr, reached: SocketAddr) -> Option<&OutboundRule> {
        let reached = canonical(reached);
        self.outbound
            .iter()
            .find(|r| r.to.iter().any(|d| d.contains(dest) || d.contains(reached)))
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

/// `key_update_after`: when a connection rotates its own traffic keys. Written `"90s"`, `"30m"`,
/// `"1h"`, `"7d"` (time since the handshake or the last rotation) or `"1MiB"`, `"64GiB"`,
/// `"500MB"` (bytes sent plus received since then).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum KeyUpdateAfter {
    Elapsed(Duration),
    Bytes(u64),
}

impl KeyUpdateAfter {
    /// The shortest interval accepted: more often is a KeyUpdate storm, not key hygiene.
    pub const MIN_ELAPSED: Duration = Duration::from_secs(1);
    /// The smallest byte count accepted (64 KiB).
    pub const MIN_BYTES: u64 = 64 << 10;
}

/// Why a `key_update_after` value was refused.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KeyUpdateAfterError(String);

impl fmt::Display for KeyUpdateAfterError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "key_update_after: {}", self.0)
    }
}

impl std::error::Error for KeyUpdateAfterError {}

impl FromStr for KeyUpdateAfter {
    type Err = KeyUpdateAfterError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let bad = |why: &str| KeyUpdateAfterError(format!("{s:?}: {why}"));
        let digits = s.bytes().take_while(u8::is_ascii_digit).count();
        let (num, unit) = s.split_at(digits);
        let n: u64 = num
            .parse()
            .map_err(|_| bad("want a number and a unit, e.g. \"1h\" or \"64GiB\""))?;
        let secs = |mult: u64| {
            n.checked_mul(mult)
                .map(|v| Self::Elapsed(Duration::from_secs(v)))
        };
        let bytes = |mult: u64| n.checked_mul(mult).map(Self::Bytes);
        let v = match unit {
            "s" => secs(1),
            "m" => secs(60),
            "h" => secs(3600),
            "d" => secs(86_400),
            "B" => bytes(1),
            "KiB" => bytes(1 << 10),
            "MiB" => bytes(1 << 20),
            "GiB" => bytes(1 << 30),
            "TiB" => bytes(1 << 40),
            "KB" => bytes(1_000),
            "MB" => bytes(1_000_000),
            "GB" => bytes(1_000_000_000),
            "TB" => bytes(1_000_000_000_000),
            _ => return Err(bad(
                "unit must be s, m, h, d (time) or B, KiB, MiB, GiB, TiB, KB, MB, GB, TB (bytes)",
            )),
        }
        .ok_or_else(|| bad("too large"))?;
        match v {
            Self::Elapsed(d) if d < Self::MIN_ELAPSED => Err(bad("at least 1s")),
            Self::Bytes(b) if b < Self::MIN_BYTES => Err(bad("at least 64KiB")),
            v => Ok(v),
        }
    }
}

impl fmt::Display for KeyUpdateAfter {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Elapsed(d) => write!(f, "{}s", d.as_secs()),
            Self::Bytes(b) => write!(f, "{b}B"),
        }
    }
}

impl Serialize for KeyUpdateAfter {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for KeyUpdateAfter {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}

/// The address a connect to `addr` reaches, as rules match it: `::ffff:a.b.c.d` is `a.b.c.d`,
/// and an unspecified address is loopback (Linux connects `0.0.0.0` to 127.0.0.1 when the
/// socket has no bound source address, and `::` to `::1`), so `0.0.0.0:8443` cannot slip past
/// a rule for `127.0.0.1/32:8443`. (The shim first puts in a bound socket's source address,
/// which is where the kernel sends `0.0.0.0` then.)
pub fn canonical(addr: SocketAddr) -> SocketAddr {
    let ip = match addr.ip() {
        IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
            Some(v4) => IpAddr::V4(v4),
            None if v6.is_unspecified() => IpAddr::V6(std::net::Ipv6Addr::LOCALHOST),
            None => return addr,
        },
        IpAddr::V4(v4) => IpAddr::V4(v4),
    };
    match ip {
        IpAddr::V4(v4) if v4.is_unspecified() => SocketAddr::new(IpAddr::V4(std::net::Ipv4Addr::LOCALHOST), addr.port()),
        _ => SocketAddr::new(ip, addr.port()),
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
    /// Does this destination cover `addr`? An IPv4 address and its IPv4-mapped IPv6 form
    /// (`::ffff:a.b.c.d`, what a dual-stack socket connects to) are one destination, so a network
    /// written in either notation covers both: `[::ffff:10.0.0.0]/104` covers `10.1.2.3`, and
    /// `[::]/0` (which holds the mapped range) covers every IPv4 address too. Fails closed: a
    /// destination a rule names in any notation is never left unprotected.
    pub fn contains(&self, addr: SocketAddr) -> bool {
        let ip = addr.ip();
        let other = match ip {
            IpAddr::V4(v4) => Some(IpAddr::V6(v4.to_ipv6_mapped())),
            IpAddr::V6(v6) => v6.to_ipv4_mapped().map(IpAddr::V4),
        };
        let covered = self.net.contains(&ip) || other.is_some_and(|o| self.net.contains(&o));
        covered && self.port.is_none_or(|p| p == addr.port())
    }
}

/// Why a destination string does not parse.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DestinationError(pub String);

impl fmt::Display for DestinationError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "bad destination: {} (expected CIDR:PORT, CIDR:*, or [V6CIDR]:PORT)",
            self.0
        )
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
            p => Some(
                p.parse::<u16>()
                    .map_err(|_| err("port must be 0-65535 or *"))?,
            ),
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
            IpNet::from(
                net_part
                    .parse::<IpAddr>()
                    .map_err(|_| err("invalid IP address"))?,
            )
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
#[allow(clippy::unwrap_used)] // reason: tests
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
        for bad in [
            "10.0.0.0/8",
            "10.0.0.1/8:80",
            "::1:80",
            "1.2.3.4:99999",
            "x:1",
            "[::1:80",
        ] {
            assert!(bad.parse::<Destination>().is_err(), "{bad}");
        }
    }

    /// Linux connects `0.0.0.0` to 127.0.0.1 and `::` to `::1`: rules for loopback cover them.
    #[test]
    fn unspecified_destinations_match_loopback_rules() {
        let policy: Policy = serde_json::from_str(
            r#"{"outbound":[{"to":["127.0.0.1/32:8443"],"allow":["spiffe://a/*"]},{"to":["[::1]/128:9443"],"allow":["spiffe://a/*"]}]}"#,
        )
        .unwrap();
        for to in ["0.0.0.0:8443", "[::ffff:0.0.0.0]:8443", "[::]:9443"] {
            assert!(policy.outbound_rule(sa(to)).is_some(), "{to}");
        }
        assert!(policy.outbound_rule(sa("0.0.0.0:9443")).is_none());
        // A rule naming the unspecified address itself still covers it (found by the policy
        // fuzz target: mapping 0.0.0.0 to loopback alone left it unprotected).
        let literal: Policy =
            serde_json::from_str(r#"{"outbound":[{"to":["0.0.0.0/24:*"],"allow":["spiffe://a/*"]}]}"#).unwrap();
        assert!(literal.outbound_rule(sa("0.0.0.0:0")).is_some());
        assert!(literal.outbound_rule_reaching(sa("0.0.0.0:80"), sa("10.1.2.3:80")).is_some());
        assert!(policy.outbound_rule_reaching(sa("0.0.0.0:8443"), sa("10.1.2.3:8443")).is_none());
    }

    #[test]
    fn mapped_v6_destinations_match_v4_rules() {
        let policy: Policy = serde_json::from_str(
            r#"{"outbound":[{"to":["127.0.0.0/8:8443"],"allow":["spiffe://a/*"]}]}"#,
        )
        .unwrap();
        assert!(policy
            .outbound_rule(sa("[::ffff:127.0.0.1]:8443"))
            .is_some());
        assert!(policy.outbound_rule(sa("127.0.0.1:80")).is_none());
    }

    /// Found by the `policy` fuzz target: a rule written in IPv4-mapped IPv6 notation covered
    /// nothing (the address was canonicalised to IPv4 first), so the connections it names went
    /// out in plaintext.
    #[test]
    fn mapped_v6_rules_protect_their_ipv4_destinations() {
        let policy: Policy = serde_json::from_str(
            r#"{"outbound":[{"to":["[::ffff:127.0.0.0]/104:8443"],"allow":["spiffe://a/*"]}]}"#,
        )
        .unwrap();
        assert!(policy.outbound_rule(sa("127.0.0.1:8443")).is_some());
        assert!(policy
            .outbound_rule(sa("[::ffff:127.0.0.1]:8443"))
            .is_some());
        assert!(policy.outbound_rule(sa("127.0.0.1:80")).is_none());
        assert!(policy.outbound_rule(sa("10.0.0.1:8443")).is_none());
        let all_v6: Policy =
            serde_json::from_str(r#"{"outbound":[{"to":["[::]/0:*"],"allow":["spiffe://a/*"]}]}"#)
                .unwrap();
        assert!(all_v6.outbound_rule(sa("[::ffff:0.0.0.0]:0")).is_some());
        assert!(all_v6.outbound_rule(sa("192.0.2.1:443")).is_some());
    }

    #[test]
    fn key_update_after_parses_time_and_bytes_and_refuses_nonsense() {
        let p = |s: &str| s.parse::<KeyUpdateAfter>();
        assert_eq!(
            p("1h"),
            Ok(KeyUpdateAfter::Elapsed(Duration::from_secs(3600)))
        );
        assert_eq!(
            p("90s"),
            Ok(KeyUpdateAfter::Elapsed(Duration::from_secs(90)))
        );
        assert_eq!(p("64GiB"), Ok(KeyUpdateAfter::Bytes(64 << 30)));
        assert_eq!(p("1MiB"), Ok(KeyUpdateAfter::Bytes(1 << 20)));
        assert_eq!(p("500MB"), Ok(KeyUpdateAfter::Bytes(500_000_000)));
        for bad in [
            "",
            "h",
            "1",
            "0s",
            "1KiB",
            "-1h",
            "1 h",
            "1hour",
            "99999999999999999999d",
            "18446744073709551615TiB",
        ] {
            assert!(p(bad).is_err(), "{bad:?} accepted");
        }
        for v in ["1h", "7d", "64GiB", "1MiB"] {
            let k = p(v).unwrap();
            assert_eq!(p(&k.to_string()), Ok(k), "round trip of {v}");
        }
        let rule: OutboundRule = serde_json::from_str(
            r#"{"to":["127.0.0.1/32:8443"],"allow":[],"key_update_after":"1MiB"}"#,
        )
        .unwrap();
        assert_eq!(rule.key_update_after, Some(KeyUpdateAfter::Bytes(1 << 20)));
        let rule: InboundRule = serde_json::from_str(r#"{"ports":[1],"allow":[]}"#).unwrap();
        assert_eq!(rule.key_update_after, None, "off by default");
        assert!(!serde_json::to_string(&rule)
            .unwrap()
            .contains("key_update_after"));
        assert!(serde_json::from_str::<InboundRule>(
            r#"{"ports":[1],"allow":[],"key_update_after":"1ms"}"#
        )
        .is_err());
    }

    #[test]
    fn unknown_policy_fields_are_rejected() {
        let r: Result<Policy, _> =
            serde_json::from_str(r#"{"inbound":[{"ports":[1],"allow":[],"mod":"observe"}]}"#);
        assert!(r.is_err());
    }
}
