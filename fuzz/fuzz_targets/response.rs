//! Every response kind the shim and the CLI decode (svid, status, error, policy, connections,
//! ok, policy_check): strict decoding never panics, and what decodes round-trips.
#![no_main]

use libfuzzer_sys::fuzz_target;
use tether_fuzz::response_round_trip;

fuzz_target!(|body: &[u8]| {
    response_round_trip(body);
});
