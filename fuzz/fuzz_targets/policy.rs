//! The policy matcher (proto/src/policy.rs) on structured policies and addresses.
//!
//! Properties: the rule chosen for a destination is the first that covers it; the choice does
//! not depend on how the address is written (IPv4, or IPv4-mapped IPv6 through an AF_INET6
//! socket); a destination that a rule names is never left unprotected (fail closed);
//! destinations print and parse back; the policy survives the JSON wire unchanged; `allows`
//! is exactly "some pattern matches".
#![no_main]

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};

use arbitrary::Arbitrary;
use ipnet::IpNet;
use libfuzzer_sys::fuzz_target;
use tether_proto::policy::{canonical, DefaultAction, Destination, InboundRule, Mode, OutboundRule, Policy};
use tether_proto::{IdPattern, SpiffeId};

#[derive(Arbitrary, Debug)]
enum Addr {
    V4([u8; 4]),
    V6([u8; 16]),
    /// `::ffff:a.b.c.d`: what a dual-stack program connects to for an IPv4 host.
    Mapped([u8; 4]),
}

impl Addr {
    fn ip(&self) -> IpAddr {
        match *self {
            Self::V4(b) => Ipv4Addr::from(b).into(),
            Self::V6(b) => Ipv6Addr::from(b).into(),
            Self::Mapped(b) => Ipv4Addr::from(b).to_ipv6_mapped().into(),
        }
    }
}

#[derive(Arbitrary, Debug)]
struct Dest {
    addr: Addr,
    prefix: u8,
    port: Option<u16>,
}

impl Dest {
    fn build(&self) -> Destination {
        let ip = self.addr.ip();
        let max = if ip.is_ipv4() { 32 } else { 128 };
        let net = IpNet::new(ip, self.prefix % (max + 1)).expect("prefix in range").trunc();
        Destination { net, port: self.port }
    }
}

#[derive(Arbitrary, Debug)]
struct Input {
    outbound: Vec<(Vec<Dest>, u8)>,
    inbound: Vec<Vec<u16>>,
    deny_by_default: bool,
    to: Addr,
    port: u16,
    local_port: u16,
    /// `allow` patterns and a peer ID, as text (most will not parse: that is fine).
    patterns: Vec<String>,
    peer: String,
    /// A destination as written in a config file.
    dest_text: String,
}

fn mode(n: u8) -> Mode {
    match n % 3 {
        0 => Mode::Mutual,
        1 => Mode::Permissive,
        _ => Mode::Observe,
    }
}

/// The other way to write the same IPv4 destination, if there is one.
fn other_form(a: SocketAddr) -> Option<SocketAddr> {
    match a.ip() {
        IpAddr::V4(v4) => Some(SocketAddr::new(v4.to_ipv6_mapped().into(), a.port())),
        IpAddr::V6(v6) => v6.to_ipv4_mapped().map(|v4| SocketAddr::new(v4.into(), a.port())),
    }
}

fuzz_target!(|input: Input| {
    let allow: Vec<IdPattern> = input.patterns.iter().filter_map(|p| p.parse().ok()).collect();
    let policy = Policy {
        inbound: input
            .inbound
            .iter()
            .map(|ports| InboundRule { ports: ports.clone(), allow: allow.clone(), mode: Mode::Mutual, allow_truncation: false, key_update_after: None })
            .collect(),
        outbound: input
            .outbound
            .iter()
            .map(|(to, m)| OutboundRule { to: to.iter().map(Dest::build).collect(), allow: allow.clone(), mode: mode(*m), allow_truncation: false, key_update_after: None })
            .collect(),
        default: if input.deny_by_default { DefaultAction::Deny } else { DefaultAction::Allow },
    };

    // Every destination prints in the config syntax and parses back to itself.
    for d in policy.outbound.iter().flat_map(|r| &r.to) {
        let text = d.to_string();
        assert_eq!(text.parse::<Destination>().as_ref(), Ok(d), "{text}");
    }
    if let Ok(d) = input.dest_text.parse::<Destination>() {
        assert_eq!(d.to_string().parse::<Destination>(), Ok(d));
        assert_eq!(d.net.trunc(), d.net);
    }

    // The shim receives the policy as JSON: it must arrive unchanged.
    let json = serde_json::to_string(&policy).unwrap();
    assert_eq!(serde_json::from_str::<Policy>(&json).unwrap(), policy);

    // Outbound: first covering rule; same answer in either notation; never fail open.
    let dest = SocketAddr::new(input.to.ip(), input.port);
    let chosen = policy.outbound_rule(dest).map(|r| r as *const OutboundRule);
    let first = policy
        .outbound
        .iter()
        .find(|r| r.to.iter().any(|d| d.contains(dest) || d.contains(canonical(dest))))
        .map(|r| r as *const OutboundRule);
    assert_eq!(chosen, first, "outbound_rule is not the first covering rule");
    if let Some(other) = other_form(dest) {
        let alt = policy.outbound_rule(other).map(|r| r as *const OutboundRule);
        assert_eq!(chosen, alt, "{dest} and {other} are the same destination but get different rules");
    }
    let named = policy.outbound.iter().flat_map(|r| &r.to).find(|d| d.contains(dest));
    if let Some(d) = named {
        assert!(chosen.is_some(), "{dest} is named by rule destination {d} but left unprotected");
    }

    // Inbound: the first rule listing the port.
    let chosen = policy.inbound_rule(input.local_port).map(|r| r as *const InboundRule);
    let first =
        policy.inbound.iter().find(|r| r.ports.contains(&input.local_port)).map(|r| r as *const InboundRule);
    assert_eq!(chosen, first);

    // allows == some pattern matches.
    if let Ok(peer) = input.peer.parse::<SpiffeId>() {
        let want = allow.iter().any(|p| p.matches(&peer));
        for r in &policy.outbound {
            assert_eq!(r.allows(&peer), want);
        }
        for r in &policy.inbound {
            assert_eq!(r.allows(&peer), want);
        }
    }
});
