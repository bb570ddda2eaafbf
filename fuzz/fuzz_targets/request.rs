//! Every request kind tetherd accepts (fetch_svid, status, fetch_policy, report, connections,
//! reload, policy_check): strict decoding never panics, and what decodes round-trips.
#![no_main]

use libfuzzer_sys::fuzz_target;
use tether_fuzz::request_round_trip;

fuzz_target!(|body: &[u8]| {
    request_round_trip(body);
});
