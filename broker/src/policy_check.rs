//! `tether policy check`: which rules decide a connection from a SPIFFE ID to `ADDR:PORT`, and why.
//!
//! [`explain`] is pure. Outbound rules apply to every process on this host whatever its ID; their
//! `allow` lists the *server* IDs the client accepts. When the destination is an address of this
//! host, the inbound rule of its port decides too, and its `allow` lists *client* IDs: that is
//! where `from` is checked.

use std::net::{IpAddr, SocketAddr, UdpSocket};
use std::path::Path;

use tether_proto::policy::{canonical, DefaultAction};
use tether_proto::wire::PolicyCheckResponse;
use tether_proto::{IdPattern, Mode, Policy, SpiffeId};

use crate::client::{Client, DEFAULT_TIMEOUT};
use crate::error::Error;

/// What the client side does with the connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum ClientSide {
    /// mTLS handshake (mutual, or permissive written on an outbound rule).
    Tls,
    /// Plaintext: no rule (default allow), or an observe rule.
    Plain,
    /// Refused before connecting (default deny).
    Refused,
}

fn list(patterns: &[IdPattern]) -> String {
    let v: Vec<String> = patterns.iter().map(ToString::to_string).collect();
    format!("[{}]", v.join(", "))
}

/// Parse `ADDR:PORT` (`[V6]:PORT` for IPv6).
pub fn parse_target(s: &str) -> Result<SocketAddr, String> {
    s.trim()
        .parse::<SocketAddr>()
        .map_err(|_| format!("bad destination {s:?}: expected IP:PORT, e.g. 127.0.0.1:8443 or [::1]:8443 (no host names)"))
}

/// Is `ip` an address of this host? Loopback and unspecified are; otherwise binding a UDP socket
/// to it succeeds only for a local address (no packet is sent).
pub fn is_local_address(ip: IpAddr) -> bool {
    ip.is_loopback() || ip.is_unspecified() || UdpSocket::bind(SocketAddr::new(ip, 0)).is_ok()
}

/// Explain the decision for a connection from a process holding `from` to `to`. `local` says
/// whether `to` is an address of this host (so that its inbound rules apply).
pub fn explain(policy: &Policy, from: &SpiffeId, to: SocketAddr, local: bool) -> PolicyCheckResponse {
    let to = canonical(to);
    let mut why = Vec::new();
    let outbound = policy.outbound.iter().enumerate().find(|(_, r)| r.to.iter().any(|d| d.contains(to)));
    let client = match outbound {
        Some((i, r)) => {
            let dest = r.to.iter().find(|d| d.contains(to)).map(ToString::to_string).unwrap_or_default();
            match r.mode {
                Mode::Observe => {
                    why.push(format!(
                        "outbound rule #{i} (to {dest}, mode observe) matches {to}: it only logs, and connects in plaintext"
                    ));
                    ClientSide::Plain
                }
                mode => {
                    why.push(format!(
                        "outbound rule #{i} (to {dest}, mode {mode}) protects {to}: the client requires mTLS and \
                         accepts a server ID matching {}",
                        list(&r.allow)
                    ));
                    ClientSide::Tls
                }
            }
        }
        None => match policy.default {
            DefaultAction::Deny => {
                why.push(format!("no outbound rule matches {to}, and default = \"deny\" refuses it"));
                ClientSide::Refused
            }
            _ => {
                why.push(format!("no outbound rule matches {to}; default = \"allow\" passes it in plaintext"));
                ClientSide::Plain
            }
        },
    };
    let mut decision = match client {
        ClientSide::Tls => "protect",
        ClientSide::Plain => "pass",
        ClientSide::Refused => "deny",
    };
    let mut mode = outbound.map(|(_, r)| r.mode);

    if !local {
        why.push(format!(
            "{} is not an address of this host, so its inbound rules are decided by the server's own tetherd",
            to.ip()
        ));
    } else {
        let port = to.port();
        match policy.inbound.iter().enumerate().find(|(_, r)| r.ports.contains(&port)) {
            None => {
                if client == ClientSide::Tls {
                    why.push(format!(
                        "no inbound rule covers port {port} on this host, so the server side does not terminate \
                         mTLS and the handshake fails (unless the server speaks SPIFFE mTLS itself)"
                    ));
                    decision = "deny";
                } else {
                    why.push(format!("no inbound rule covers port {port} on this host"));
                }
            }
            Some((j, r)) => {
                mode = mode.or(Some(r.mode));
                let ports: Vec<String> = r.ports.iter().map(u16::to_string).collect();
                let rule = format!("inbound rule #{j} (ports [{}], mode {})", ports.join(", "), r.mode);
                let verdict = match r.allow.iter().find(|p| p.matches(from)) {
                    Some(p) => format!("allows {from} via pattern {p}"),
                    None => format!("does not allow {from} (it allows {})", list(&r.allow)),
                };
                let allowed = r.allows(from);
                match (r.mode, client) {
                    (_, ClientSide::Refused) => why.push(format!("{rule} {verdict}")),
                    (Mode::Observe, ClientSide::Tls) => {
                        why.push(format!(
                            "{rule} would {} {from}, but observe mode does not terminate TLS, so the client's \
                             handshake fails",
                            if allowed { "allow" } else { "refuse" }
                        ));
                        decision = "deny";
                    }
                    (Mode::Observe, _) => why.push(format!(
                        "{rule} would {} {from}; observe mode only logs it",
                        if allowed { "allow" } else { "refuse" }
                    )),
                    (Mode::Permissive, ClientSide::Plain) => {
                        why.push(format!("{rule} accepts plaintext clients (it {verdict} when it uses mTLS)"));
                    }
                    (_, ClientSide::Plain) => {
                        why.push(format!(
                            "{rule} requires mTLS, and this client connects in plaintext, so the server refuses it"
                        ));
                        decision = "deny";
                    }
                    (_, ClientSide::Tls) => {
                        why.push(format!("{rule} {verdict}"));
                        if !allowed {
                            decision = "deny";
                        }
                    }
                }
            }
        }
    }
    PolicyCheckResponse {
        decision: decision.to_owned(),
        mode,
        rule: outbound.map(|(i, _)| i),
        explanation: why.join("; "),
    }
}

/// `tether policy check --from ID --to ADDR:PORT [--json]`, asked of tetherd (the policy in force).
pub fn command(socket: &Path, from: SpiffeId, to: &str, json: bool) -> Result<String, Error> {
    parse_target(to).map_err(Error::Cli)?;
    let r = Client::connect(socket, DEFAULT_TIMEOUT)?.policy_check(from.clone(), to.to_owned())?;
    if json {
        return serde_json::to_string_pretty(&r).map(|s| s + "\n").map_err(|e| Error::Cli(e.to_string()));
    }
    let mut out = format!("{}: {from} -> {to}\n", r.decision);
    for part in r.explanation.split("; ") {
        out.push_str(&format!("  - {part}\n"));
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    fn policy(toml_text: &str) -> Policy {
        toml::from_str(toml_text).unwrap()
    }

    fn demo() -> Policy {
        policy(
            r#"
[[inbound]]
ports = [8443]
allow = ["spiffe://x/*"]
[[inbound]]
ports = [9000]
allow = ["spiffe://x/only"]
mode = "permissive"
[[inbound]]
ports = [9100]
allow = ["spiffe://x/*"]
mode = "observe"
[[outbound]]
to = ["127.0.0.0/8:8443", "127.0.0.0/8:9000", "127.0.0.0/8:9100"]
allow = ["spiffe://x/server"]
[[outbound]]
to = ["10.0.0.0/8:*"]
allow = ["spiffe://x/*"]
mode = "observe"
"#,
        )
    }

    fn id(s: &str) -> SpiffeId {
        s.parse().unwrap()
    }

    fn sa(s: &str) -> SocketAddr {
        s.parse().unwrap()
    }

    #[test]
    fn protected_and_allowed() {
        let r = explain(&demo(), &id("spiffe://x/y"), sa("127.0.0.1:8443"), true);
        assert_eq!(r.decision, "protect");
        assert_eq!(r.rule, Some(0));
        assert_eq!(r.mode, Some(Mode::Mutual));
        assert_eq!(
            r.explanation,
            "outbound rule #0 (to 127.0.0.0/8:8443, mode mutual) protects 127.0.0.1:8443: the client requires \
             mTLS and accepts a server ID matching [spiffe://x/server]; inbound rule #0 (ports [8443], mode \
             mutual) allows spiffe://x/y via pattern spiffe://x/*"
        );
    }

    #[test]
    fn unlisted_client_is_denied_by_the_inbound_rule() {
        let r = explain(&demo(), &id("spiffe://other/y"), sa("[::ffff:127.0.0.1]:8443"), true);
        assert_eq!(r.decision, "deny");
        assert!(r.explanation.contains("does not allow spiffe://other/y (it allows [spiffe://x/*])"), "{}", r.explanation);
        let p = explain(&demo(), &id("spiffe://x/nope"), sa("127.0.0.1:9000"), true);
        assert_eq!(p.decision, "deny", "permissive still checks mTLS clients: {}", p.explanation);
    }

    #[test]
    fn remote_destinations_skip_inbound_rules() {
        let r = explain(&demo(), &id("spiffe://other/y"), sa("127.0.0.1:8443"), false);
        assert_eq!(r.decision, "protect");
        assert!(r.explanation.contains("not an address of this host"));
        let o = explain(&demo(), &id("spiffe://x/y"), sa("10.1.2.3:5432"), false);
        assert_eq!((o.decision.as_str(), o.rule, o.mode), ("pass", Some(1), Some(Mode::Observe)));
    }

    #[test]
    fn unmatched_follows_the_default() {
        let mut p = demo();
        let r = explain(&p, &id("spiffe://x/y"), sa("192.0.2.1:80"), false);
        assert_eq!((r.decision.as_str(), r.rule), ("pass", None));
        p.default = DefaultAction::Deny;
        let r = explain(&p, &id("spiffe://x/y"), sa("192.0.2.1:80"), false);
        assert_eq!(r.decision, "deny");
        assert!(r.explanation.contains("default = \"deny\""));
    }

    #[test]
    fn plaintext_to_a_mutual_port_is_refused_and_permissive_passes_it() {
        let mut p = demo();
        p.outbound.clear();
        let r = explain(&p, &id("spiffe://x/y"), sa("127.0.0.1:8443"), true);
        assert_eq!(r.decision, "deny");
        assert_eq!(r.mode, Some(Mode::Mutual));
        let r = explain(&p, &id("spiffe://x/y"), sa("127.0.0.1:9000"), true);
        assert_eq!(r.decision, "pass");
        assert!(r.explanation.contains("accepts plaintext clients"));
    }

    #[test]
    fn tls_client_to_an_unterminated_local_port_fails() {
        let r = explain(&demo(), &id("spiffe://x/y"), sa("127.0.0.1:9100"), true);
        assert_eq!(r.decision, "deny");
        assert!(r.explanation.contains("observe mode does not terminate TLS"));
        let mut p = demo();
        p.inbound.clear();
        let r = explain(&p, &id("spiffe://x/y"), sa("127.0.0.1:8443"), true);
        assert_eq!(r.decision, "deny");
        assert!(r.explanation.contains("no inbound rule covers port 8443"));
    }

    #[test]
    fn targets_and_locality() {
        assert_eq!(parse_target("[::1]:8443").unwrap(), sa("[::1]:8443"));
        assert!(parse_target("localhost:8443").unwrap_err().contains("no host names"));
        assert!(is_local_address("127.0.0.1".parse().unwrap()));
        assert!(!is_local_address("192.0.2.1".parse().unwrap()));
    }
}
