//! Hostile and unlucky clients each get a clear error, and tetherd keeps serving.
#![allow(clippy::unwrap_used)]

mod common;

use std::io::Write;
use std::sync::{Arc, Barrier};
use std::time::{Duration, Instant};

use common::{assert_closed, read_response, send, Daemon};
use tether_proto::wire::{self, ErrorCode, Request, Response};

fn expect_error(r: Response, code: ErrorCode) -> String {
    match r {
        Response::Error(e) => {
            assert_eq!(e.code, code, "{}", e.message);
            e.message
        }
        other => panic!("wanted {code:?}, got {other:?}"),
    }
}

fn frame(version: u16, len: u32, body: &[u8]) -> Vec<u8> {
    let mut f = b"TT".to_vec();
    f.extend_from_slice(&version.to_be_bytes());
    f.extend_from_slice(&len.to_be_bytes());
    f.extend_from_slice(body);
    f
}

#[test]
fn garbage_bytes_get_bad_request() {
    let mut d = Daemon::start(&[]);
    let mut s = d.raw();
    send(&mut s, b"GET / HTTP/1.1\r\nHost: x\r\n\r\n");
    expect_error(read_response(&mut s), ErrorCode::BadRequest);
    assert_closed(&mut s);
    d.assert_serving();
}

#[test]
fn malformed_json_in_a_valid_frame_gets_bad_request() {
    let mut d = Daemon::start(&[]);
    let mut s = d.raw();
    let body = br#"{"type":"fetch_svid","extra":1}"#;
    send(&mut s, &frame(wire::VERSION, body.len() as u32, body));
    expect_error(read_response(&mut s), ErrorCode::BadRequest);
    assert_closed(&mut s);
    d.assert_serving();
}

#[test]
fn wrong_version_gets_unsupported_version() {
    let mut d = Daemon::start(&[]);
    let mut s = d.raw();
    let body = br#"{"type":"status"}"#;
    send(&mut s, &frame(wire::VERSION + 1, body.len() as u32, body));
    let msg = expect_error(read_response(&mut s), ErrorCode::UnsupportedVersion);
    assert!(msg.contains("version 2"), "{msg}");
    assert_closed(&mut s);
    d.assert_serving();
}

#[test]
fn oversize_length_gets_too_large_without_reading_the_body() {
    let mut d = Daemon::start(&[]);
    let mut s = d.raw();
    send(&mut s, &frame(wire::VERSION, u32::MAX, b""));
    expect_error(read_response(&mut s), ErrorCode::TooLarge);
    assert_closed(&mut s);
    d.assert_serving();
}

#[test]
fn stalled_client_mid_message_gets_timeout_while_others_are_served() {
    let mut d = Daemon::start(&["--client-timeout-ms", "400"]);
    let mut s = d.raw();
    let start = Instant::now();
    send(&mut s, &frame(wire::VERSION, 100, b"{\"type\":"));
    // Served while the other connection stalls.
    d.assert_serving();
    expect_error(read_response(&mut s), ErrorCode::Timeout);
    let took = start.elapsed();
    assert!(took >= Duration::from_millis(350) && took < Duration::from_secs(3), "{took:?}");
    assert_closed(&mut s);
    d.assert_serving();
}

#[test]
fn slow_drip_client_hits_the_whole_frame_deadline() {
    let mut d = Daemon::start(&["--client-timeout-ms", "400"]);
    let mut s = d.raw();
    let f = frame(wire::VERSION, 17, br#"{"type":"status"}"#);
    // One byte every 100 ms: each read is quick, but the whole frame would take 2.5 s.
    for b in &f {
        if s.write_all(std::slice::from_ref(b)).is_err() {
            break; // tetherd gave up on us and closed
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    expect_error(read_response(&mut s), ErrorCode::Timeout);
    d.assert_serving();
}

#[test]
fn three_hundred_concurrent_clients_all_get_svids() {
    let d = Daemon::start(&[]);
    let n = 300;
    let barrier = Arc::new(Barrier::new(n));
    let socket = d.socket.clone();
    let threads: Vec<_> = (0..n)
        .map(|_| {
            let (b, socket) = (barrier.clone(), socket.clone());
            std::thread::spawn(move || {
                let mut c = tether_broker::client::Client::connect(&socket, Duration::from_secs(30)).unwrap();
                b.wait();
                c.fetch_svid().unwrap().spiffe_id
            })
        })
        .collect();
    let ids: Vec<_> = threads.into_iter().map(|t| t.join().unwrap()).collect();
    assert_eq!(ids.len(), n);
    assert!(ids.windows(2).all(|w| w[0] == w[1]));
}

#[test]
fn client_disconnecting_mid_request_is_dropped_quietly() {
    let mut d = Daemon::start(&[]);
    for partial in [&b"TT\0"[..], &frame(wire::VERSION, 50, b"{\"type\":\"fet")[..]] {
        let mut s = d.raw();
        send(&mut s, partial);
        drop(s);
    }
    // Disconnect before reading the answer, too.
    let mut s = d.raw();
    send(&mut s, &wire::encode(&Request::FetchSvid {}).unwrap());
    drop(s);
    std::thread::sleep(Duration::from_millis(100));
    d.assert_serving();
}

#[test]
fn unknown_request_type_gets_unknown_request_and_the_connection_continues() {
    let mut d = Daemon::start(&[]);
    let mut s = d.raw();
    let body = br#"{"type":"launch_missiles","target":"moon"}"#;
    send(&mut s, &frame(wire::VERSION, body.len() as u32, body));
    expect_error(read_response(&mut s), ErrorCode::UnknownRequest);
    send(&mut s, &wire::encode(&Request::FetchSvid {}).unwrap());
    assert!(matches!(read_response(&mut s), Response::Svid(_)));
    d.assert_serving();
}

#[test]
fn several_requests_share_one_connection() {
    let d = Daemon::start(&[]);
    let mut c = d.client();
    assert_eq!(c.status().unwrap().trust_domain.as_str(), "tether.internal");
    let a = c.fetch_svid().unwrap();
    let b = c.fetch_svid().unwrap();
    assert_eq!(a.serial, b.serial);
    assert_eq!(c.status().unwrap().live_identities, 1);
}

#[test]
fn connections_over_the_cap_get_busy() {
    let mut d = Daemon::start(&["--max-connections", "2"]);
    // Each held connection is proven live (served) before the next one is opened. The
    // readiness probe's connection may still be winding down, so a busy answer (sent in
    // place of the greeting) is retried.
    let held: Vec<_> = (0..2)
        .map(|_| {
            for _ in 0..100 {
                let mut s = d.raw_ungreeted();
                match wire::io::read_greeting(&mut s).unwrap() {
                    None => {
                        s.write_all(&wire::encode(&Request::Status {}).unwrap()).unwrap();
                        assert!(matches!(read_response(&mut s), Response::Status(_)));
                        return s;
                    }
                    Some(e) if e.code == ErrorCode::Busy => std::thread::sleep(Duration::from_millis(20)),
                    Some(e) => panic!("{e:?}"),
                }
            }
            panic!("never served");
        })
        .collect();
    let mut s = d.raw_ungreeted();
    let e = wire::io::read_greeting(&mut s).unwrap().expect("busy in place of the greeting");
    assert_eq!(e.code, ErrorCode::Busy, "{}", e.message);
    drop(held);
    std::thread::sleep(Duration::from_millis(100));
    d.assert_serving();
}
