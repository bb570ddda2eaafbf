//! SPIFFE IDs, trust domains and `allow` patterns (proto/src/spiffe.rs).
//!
//! Input: `ID_OR_PATTERN '\n' OTHER_ID`. Properties: parsing never panics; whatever parses
//! prints back to exactly the input and re-parses to an equal value; an accepted ID meets the
//! spec's syntax (checked here independently of the parser); a pattern only ever matches IDs of
//! its own trust domain, an exact pattern only its ID, a prefix pattern only strict descendants.
#![no_main]

use libfuzzer_sys::fuzz_target;
use tether_proto::spiffe::{IdPattern, SpiffeId, TrustDomain, MAX_ID_LEN};

/// The spec's syntax, written out separately from `SpiffeId::from_str`.
fn meets_spec(s: &str) -> bool {
    let Some(rest) = s.strip_prefix("spiffe://") else { return false };
    let (td, path) = rest.split_at(rest.find('/').unwrap_or(rest.len()));
    let td_ok = !td.is_empty()
        && td.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b"._-".contains(&b));
    let path_ok = path.is_empty()
        || path[1..].split('/').all(|seg| {
            !seg.is_empty()
                && seg != "."
                && seg != ".."
                && seg.bytes().all(|b| b.is_ascii_alphanumeric() || b"._-".contains(&b))
        });
    s.len() <= MAX_ID_LEN && td_ok && path_ok
}

fn check_id(s: &str) -> Option<SpiffeId> {
    let parsed = s.parse::<SpiffeId>();
    assert_eq!(parsed.is_ok(), meets_spec(s), "parser and spec disagree on {s:?}: {parsed:?}");
    let id = parsed.ok()?;
    assert_eq!(id.to_string(), s);
    assert_eq!(id.as_str(), s);
    assert_eq!(id.to_string().parse::<SpiffeId>().unwrap(), id);
    let td = id.trust_domain();
    assert_eq!(td.to_string().parse::<TrustDomain>().unwrap(), td);
    assert!(id.path().is_empty() || id.path().starts_with('/'));
    assert_eq!(format!("{}{}", td.id_string(), id.path()), s);
    assert_eq!(SpiffeId::from_parts(&td, id.path()).unwrap(), id);
    // JSON (the wire) carries it unchanged.
    let json = serde_json::to_string(&id).unwrap();
    assert_eq!(serde_json::from_str::<SpiffeId>(&json).unwrap(), id);
    Some(id)
}

fn check_trust_domain(s: &str) {
    let Ok(td) = s.parse::<TrustDomain>() else { return };
    assert_eq!(td.as_str(), s);
    assert_eq!(td.to_string().parse::<TrustDomain>().unwrap(), td);
    let id = td.id_string();
    if id.len() <= MAX_ID_LEN {
        let id: SpiffeId = id.parse().expect("a trust domain's own ID must parse");
        assert_eq!(id.trust_domain(), td);
        assert!(id.path().is_empty());
    }
}

fn check_pattern(s: &str, other: Option<&SpiffeId>) {
    let Ok(p) = s.parse::<IdPattern>() else { return };
    assert_eq!(p.to_string(), s, "a pattern must print back as written");
    assert_eq!(p.to_string().parse::<IdPattern>().unwrap(), p);
    let json = serde_json::to_string(&p).unwrap();
    assert_eq!(serde_json::from_str::<IdPattern>(&json).unwrap(), p);
    let base = match &p {
        IdPattern::Exact(id) | IdPattern::Prefix(id) => id.clone(),
    };
    match &p {
        IdPattern::Exact(_) => assert!(p.matches(&base)),
        IdPattern::Prefix(_) => assert!(!p.matches(&base), "a prefix pattern matched its own base"),
    }
    if let Some(other) = other {
        if p.matches(other) {
            assert_eq!(other.trust_domain(), base.trust_domain(), "{p} matched a foreign ID {other}");
            match &p {
                IdPattern::Exact(_) => assert_eq!(*other, base),
                IdPattern::Prefix(_) => {
                    let want = format!("{}/", base.path());
                    assert!(other.path().starts_with(&want), "{p} matched {other}");
                }
            }
        }
    }
}

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        // Whatever the bytes, lossy text must not panic the parsers either.
        let lossy = String::from_utf8_lossy(data);
        let _ = lossy.parse::<SpiffeId>();
        let _ = lossy.parse::<IdPattern>();
        return;
    };
    let (first, second) = text.split_once('\n').unwrap_or((text, ""));
    let other = check_id(second);
    check_id(first);
    check_trust_domain(first);
    check_pattern(first, other.as_ref());
    // A prefix pattern built from any valid ID.
    if let Some(id) = other.as_ref() {
        check_pattern(&format!("{id}/*"), check_id(first).as_ref());
    }
});
