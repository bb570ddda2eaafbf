//! tetherd's config parser (broker/src/config.rs): `Config::parse` on arbitrary text, plus the
//! derived-identity builder on arbitrary executable paths.
//!
//! Properties: no panic on any input; every error names its origin; an accepted config keeps
//! its promises (entries in our trust domain, at least one selector each, a TTL in range);
//! selectors and the metrics address print back to what parses to them; the policy, read from
//! TOML, crosses the JSON wire to the shims unchanged; `derived_id` yields the executable's path
//! exactly, as a valid ID in our trust domain, whenever every segment can be carried as it is and
//! the result fits the spec's length limit, and no ID otherwise (never a rewritten path).
#![no_main]

use std::ffi::OsStr;
use std::os::unix::ffi::OsStrExt;
use std::path::Path;

use libfuzzer_sys::fuzz_target;
use tether_broker::config::{
    derived_id, Config, MapAccounts, MetricsListen, ProcessFacts, Selector, MAX_SVID_TTL, MIN_SVID_TTL,
};
use tether_proto::spiffe::MAX_ID_LEN;
use tether_proto::{Policy, TrustDomain};

const ORIGIN: &str = "fuzz.toml";

fn accounts() -> MapAccounts {
    let mut a = MapAccounts::default();
    a.users.insert("alice".into(), 1000);
    a.users.insert("root".into(), 0);
    a.groups.insert("staff".into(), 50);
    a
}

fn check_config(src: &str, facts: &ProcessFacts) {
    let accounts = accounts();
    let c = match Config::parse(src, ORIGIN, &accounts) {
        Ok(c) => c,
        Err(e) => {
            assert_eq!(e.origin, ORIGIN);
            assert!(!e.message.is_empty());
            return;
        }
    };
    assert!(c.svid_ttl >= MIN_SVID_TTL && c.svid_ttl <= MAX_SVID_TTL);
    for e in &c.entries {
        assert_eq!(e.spiffe_id.trust_domain(), c.trust_domain, "entry outside the trust domain");
        assert!(!e.selectors.is_empty(), "an entry without selectors matches every process");
        for s in &e.selectors {
            let text = s.to_string();
            assert_eq!(Selector::parse(&text, &accounts).as_ref(), Ok(s), "{text}");
        }
    }
    if let Some(m) = &c.metrics {
        assert_eq!(m.to_string().parse::<MetricsListen>().as_ref(), Ok(m));
    }
    let json = serde_json::to_string(&c.policy).unwrap();
    assert_eq!(serde_json::from_str::<Policy>(&json).unwrap(), c.policy, "policy changed on the wire");
    if let Ok(id) = c.identity_for(facts) {
        assert_eq!(id.trust_domain(), c.trust_domain);
        if let Some(e) = c.matching_entry(facts) {
            assert!(e.selectors.iter().all(|s| s.matches(facts)));
        }
    }
}

fn check_derived(td: &TrustDomain, uid: u32, exe: &Path) {
    // A derived ID is the path exactly (so two executables never share one), or there is none.
    let bound = "spiffe://".len() + td.as_str().len() + "/uid/4294967295/exe/".len() + exe.as_os_str().len();
    let segments: Option<Vec<&str>> = exe.to_str().map(|t| t.split('/').filter(|s| !s.is_empty()).collect());
    let clean = segments.as_ref().is_some_and(|segs| {
        segs.iter().all(|s| *s != "." && *s != ".." && s.bytes().all(|b| b.is_ascii_alphanumeric() || b"._-".contains(&b)))
    });
    match derived_id(td, uid, exe) {
        Ok(id) => {
            assert!(clean, "a derived ID for {exe:?}, whose path an ID cannot carry exactly");
            assert_eq!(&id.trust_domain(), td);
            let want: String = segments.unwrap_or_default().iter().map(|s| format!("/{s}")).collect();
            assert_eq!(id.path(), format!("/uid/{uid}/exe{want}"), "not the path exactly");
        }
        Err(why) => assert!(!clean || bound > MAX_ID_LEN, "no derived ID for {exe:?} although it fits: {why}"),
    }
}

fuzz_target!(|data: &[u8]| {
    // The first line is an executable path and uid for the identity checks; the rest is the file.
    let (head, body) = match data.iter().position(|&b| b == b'\n') {
        Some(i) => (&data[..i], &data[i + 1..]),
        None => (&data[..0], data),
    };
    let uid = head.get(..4).map_or(1000, |b| u32::from_le_bytes(b.try_into().unwrap()));
    let exe = Path::new(OsStr::from_bytes(head.get(4..).unwrap_or_default()));
    let td: TrustDomain = "example.org".parse().unwrap();
    check_derived(&td, uid, exe);

    let Ok(src) = std::str::from_utf8(body) else { return };
    let facts = ProcessFacts {
        pid: 1,
        uid,
        gid: 50,
        supplementary_gids: vec![50, 27],
        exe: exe.to_path_buf(),
        exe_sha256: Some([0xab; 32]),
    };
    check_config(src, &facts);
});
