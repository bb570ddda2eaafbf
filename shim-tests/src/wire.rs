//! What actually crossed the wire: the proof a test of protection needs.
//!
//! Two tools, both independent of the shim's own log:
//! - [`Capture`]: `tcpdump` on `lo` filtered to one TCP port, written to a pcap file in the
//!   test's scratch directory, then reassembled per direction ([`Wire`]). A protected flow must
//!   be a well-formed sequence of TLS records from its first byte to its last, carry at least
//!   one application-data record, and never contain the test's plaintext marker.
//! - [`Observer`]: a plain (unshimmed) listener standing in for a protected destination. It
//!   records every byte each client sent. A protected client must send nothing but a TLS
//!   ClientHello there (its handshake then fails), never the marker.
//!
//! Both work on the host (userspace relay) and in UML (kTLS): neither looks at which data path
//! the shim chose, only at the bytes.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::fs;
use std::io::Read as _;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, TcpListener};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::{Duration, Instant};

/// TLS record content types.
pub const CHANGE_CIPHER_SPEC: u8 = 20;
pub const ALERT: u8 = 21;
pub const HANDSHAKE: u8 = 22;
pub const APPLICATION_DATA: u8 = 23;

// ---------------------------------------------------------------------------------------------
// Capture (tcpdump on lo)

/// A running `tcpdump -i lo 'tcp port PORT'`. [`finish`](Self::finish) stops it and parses
/// what it saw. Dropped unfinished, it is killed.
#[derive(Debug)]
pub struct Capture {
    child: Option<Child>,
    pcap: PathBuf,
    port: u16,
}

impl Capture {
    /// Start capturing TCP port `port` on loopback into `dir/capture-PORT.pcap`; returns once
    /// tcpdump says it is listening (so no packet of the test is missed).
    pub fn start(dir: &Path, port: u16) -> Self {
        let pcap = dir.join(format!("capture-{port}.pcap"));
        let errf = dir.join(format!("capture-{port}.err"));
        let err = fs::File::create(&errf).unwrap();
        let child = Command::new("tcpdump")
            .args(["-i", "lo", "-U", "--immediate-mode", "-B", "65536", "-n", "-s", "0", "-Z", "root", "-w"])
            .arg(&pcap)
            .arg(format!("tcp port {port}"))
            .env_remove("LD_PRELOAD")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(err)
            .spawn()
            .unwrap_or_else(|e| panic!("spawn tcpdump (apt-get install tcpdump): {e}"));
        let mut cap = Capture {
            child: Some(child),
            pcap,
            port,
        };
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let text = fs::read_to_string(&errf).unwrap_or_default();
            if text.contains("listening on") {
                break;
            }
            if let Some(st) = cap.child.as_mut().unwrap().try_wait().unwrap() {
                panic!("tcpdump exited with {st} before capturing:\n{text}");
            }
            assert!(
                Instant::now() < deadline,
                "tcpdump did not start listening:\n{text}"
            );
            thread::sleep(Duration::from_millis(20));
        }
        cap
    }

    /// The port being captured.
    pub fn port(&self) -> u16 {
        self.port
    }

    /// Stop tcpdump (after the file stops growing, so in-flight packets are written) and
    /// reassemble every flow it saw.
    pub fn finish(mut self) -> Wire {
        let mut last = u64::MAX;
        let deadline = Instant::now() + Duration::from_secs(5);
        loop {
            thread::sleep(Duration::from_millis(150));
            let len = fs::metadata(&self.pcap).map(|m| m.len()).unwrap_or(0);
            if len == last || Instant::now() >= deadline {
                break;
            }
            last = len;
        }
        if let Some(mut c) = self.child.take() {
            // SAFETY: plain kill(2) on our own child; SIGINT makes tcpdump flush and exit.
            unsafe {
                libc::kill(c.id() as libc::pid_t, libc::SIGINT);
            }
            let until = Instant::now() + Duration::from_secs(5);
            while c.try_wait().unwrap().is_none() && Instant::now() < until {
                thread::sleep(Duration::from_millis(20));
            }
            let _ = c.kill();
            let _ = c.wait();
        }
        let bytes = fs::read(&self.pcap).unwrap_or_default();
        Wire::from_pcap(&bytes).unwrap_or_else(|e| panic!("{}: {e}", self.pcap.display()))
    }
}

impl Drop for Capture {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// One direction of one TCP connection.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub struct FlowKey {
    pub src: SocketAddr,
    pub dst: SocketAddr,
    /// Which connection on this address pair: a new SYN (another sequence space) on a pair
    /// that already had one starts the next (ports are reused quickly under connect-per-request
    /// load such as `pgbench -C`).
    pub conn: u32,
}

impl std::fmt::Display for FlowKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} -> {}", self.src, self.dst)?;
        if self.conn > 0 {
            write!(f, " (connection #{} on this pair)", self.conn + 1)?;
        }
        Ok(())
    }
}

/// A reassembled byte stream (one direction). Under load tcpdump can miss packets: the
/// stream is then a list of contiguous runs at their stream offsets.
#[derive(Debug, Default, Clone)]
pub struct Flow {
    /// Contiguous runs of the stream: (offset from the first payload byte, bytes), in order.
    pub runs: Vec<(usize, Vec<u8>)>,
    /// The SYN was captured, so offsets are exact from the stream's first byte.
    pub syn_seen: bool,
    segments: Vec<(u32, Vec<u8>)>,
    base: Option<u32>,
}

/// What the record walk of one flow found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Verdict {
    /// Every record header the capture holds is a TLS header; `types` lists them in order.
    Tls { types: Vec<u8>, complete: bool },
    /// A byte that must be a record header is not one.
    NotTls { at: usize },
}

/// Everything a capture saw, per direction.
#[derive(Debug, Default)]
pub struct Wire {
    pub flows: BTreeMap<FlowKey, Flow>,
    /// The newest connection number seen on each address pair (direction).
    latest: BTreeMap<(SocketAddr, SocketAddr), u32>,
}

/// How a byte stream splits into TLS records.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Records {
    /// Content type of every complete record, in order.
    pub types: Vec<u8>,
    /// Where the stream stopped being TLS (offset), if it did.
    pub not_tls_at: Option<usize>,
}

/// Split `bytes` into TLS records (5-byte header: type 20..=23, version 0x03 0x01..=0x04, a
/// length of at most 2^14 + 256). A final record cut short is tolerated (a connection reset).
pub fn records(bytes: &[u8]) -> Records {
    let mut r = Records::default();
    let mut at = 0;
    while at < bytes.len() {
        let h = &bytes[at..];
        if h.len() < 5 {
            let ok = (CHANGE_CIPHER_SPEC..=APPLICATION_DATA).contains(&h[0])
                && h.get(1).is_none_or(|&v| v == 3);
            if !ok {
                r.not_tls_at = Some(at);
            }
            return r;
        }
        let len = usize::from(u16::from_be_bytes([h[3], h[4]]));
        if !(CHANGE_CIPHER_SPEC..=APPLICATION_DATA).contains(&h[0])
            || h[1] != 3
            || !(1..=4).contains(&h[2])
            || len > (1 << 14) + 256
        {
            r.not_tls_at = Some(at);
            return r;
        }
        if h.len() >= 5 + len {
            r.types.push(h[0]);
        }
        at += 5 + len;
    }
    r
}

/// Printable excerpt of `bytes` around `at` for failure messages.
pub fn excerpt(bytes: &[u8], at: usize) -> String {
    let end = (at + 48).min(bytes.len());
    let mut s = String::new();
    for b in &bytes[at..end] {
        let _ = write!(s, "{b:02x}");
    }
    let text: String = bytes[at..end]
        .iter()
        .map(|&b| if b.is_ascii_graphic() || b == b' ' { b as char } else { '.' })
        .collect();
    format!("{s} |{text}|")
}

/// Whether `needle` occurs in `hay`.
pub fn contains(hay: &[u8], needle: &[u8]) -> bool {
    !needle.is_empty() && hay.windows(needle.len()).any(|w| w == needle)
}

impl Flow {
    /// Payload bytes captured.
    pub fn len(&self) -> usize {
        self.runs.iter().map(|(_, b)| b.len()).sum()
    }

    pub fn is_empty(&self) -> bool {
        self.runs.is_empty()
    }

    /// Whether `marker` occurs in a run (a marker split across a capture hole is missed).
    pub fn contains(&self, marker: &[u8]) -> bool {
        self.runs.iter().any(|(_, b)| contains(b, marker))
    }

    /// The whole stream, when the capture has every byte of it.
    pub fn complete_bytes(&self) -> Option<&[u8]> {
        match self.runs.as_slice() {
            [(0, b)] if self.syn_seen => Some(b),
            _ => None,
        }
    }

    /// Walk the TLS records from the first byte, following each header's length across capture
    /// holes; the walk stops (incomplete) where a header itself fell into a hole.
    pub fn verdict(&self) -> Verdict {
        if let Some(b) = self.complete_bytes() {
            let r = records(b);
            return match r.not_tls_at {
                Some(at) => Verdict::NotTls { at },
                None => Verdict::Tls { types: r.types, complete: true },
            };
        }
        let mut types = Vec::new();
        if !self.syn_seen {
            return Verdict::Tls { types, complete: false };
        }
        let mut at = 0usize;
        loop {
            let Some((off, run)) = self.runs.iter().find(|(o, b)| *o <= at && at < o + b.len()) else {
                let end = self.runs.last().map(|(o, b)| o + b.len()).unwrap_or(0);
                return Verdict::Tls { types, complete: at >= end };
            };
            let h = &run[at - off..];
            if h.len() < 5 {
                let r = records(h);
                return match r.not_tls_at {
                    Some(_) => Verdict::NotTls { at },
                    None => Verdict::Tls { types, complete: false },
                };
            }
            let r = records(&h[..5]);
            if r.not_tls_at.is_some() {
                return Verdict::NotTls { at };
            }
            types.push(h[0]);
            at += 5 + usize::from(u16::from_be_bytes([h[3], h[4]]));
        }
    }

    fn excerpt_at(&self, at: usize) -> String {
        self.runs
            .iter()
            .find(|(o, b)| *o <= at && at < o + b.len())
            .map(|(o, b)| excerpt(b, at - o))
            .unwrap_or_default()
    }
}

impl Wire {
    /// Parse a classic pcap file (any byte order; link types Ethernet, null, raw, Linux SLL
    /// and SLL2) and reassemble the TCP payload of each direction by sequence number.
    pub fn from_pcap(data: &[u8]) -> Result<Self, String> {
        if data.len() < 24 {
            return Err(format!("pcap too short ({} bytes): did tcpdump run?", data.len()));
        }
        let magic = u32::from_le_bytes(data[0..4].try_into().unwrap());
        let le = match magic {
            0xa1b2_c3d4 | 0xa1b2_3c4d => true,
            0xd4c3_b2a1 | 0x4d3c_b2a1 => false,
            m => return Err(format!("not a pcap file (magic {m:#x})")),
        };
        let u32_at = |b: &[u8], o: usize| {
            let a: [u8; 4] = b[o..o + 4].try_into().unwrap();
            if le {
                u32::from_le_bytes(a)
            } else {
                u32::from_be_bytes(a)
            }
        };
        let link = u32_at(data, 20);
        let mut wire = Wire::default();
        let mut at = 24;
        while at + 16 <= data.len() {
            let caplen = u32_at(data, at + 8) as usize;
            let origlen = u32_at(data, at + 12) as usize;
            let start = at + 16;
            let Some(pkt) = data.get(start..start + caplen) else {
                break; // a record cut short by the stop: ignore it
            };
            if caplen < origlen {
                return Err("tcpdump truncated a packet (snaplen): cannot reassemble".into());
            }
            wire.packet(link, pkt);
            at = start + caplen;
        }
        for flow in wire.flows.values_mut() {
            flow.stitch();
        }
        Ok(wire)
    }

    fn packet(&mut self, link: u32, pkt: &[u8]) {
        let (l3, ethertype) = match link {
            1 if pkt.len() >= 14 => (&pkt[14..], u16::from_be_bytes([pkt[12], pkt[13]])),
            113 if pkt.len() >= 16 => (&pkt[16..], u16::from_be_bytes([pkt[14], pkt[15]])),
            276 if pkt.len() >= 20 => (&pkt[20..], u16::from_be_bytes([pkt[0], pkt[1]])),
            0 if pkt.len() >= 4 => (&pkt[4..], 0),
            101 => (pkt, 0),
            _ => return,
        };
        let _ = ethertype; // the IP version nibble says the same, and works for every link type
        let Some(&first) = l3.first() else { return };
        let (src_ip, dst_ip, l4): (IpAddr, IpAddr, &[u8]) = match first >> 4 {
            4 if l3.len() >= 20 => {
                let ihl = usize::from(first & 0x0f) * 4;
                let total = usize::from(u16::from_be_bytes([l3[2], l3[3]])).min(l3.len());
                if l3[9] != 6 || total < ihl {
                    return;
                }
                let s = Ipv4Addr::new(l3[12], l3[13], l3[14], l3[15]);
                let d = Ipv4Addr::new(l3[16], l3[17], l3[18], l3[19]);
                (s.into(), d.into(), &l3[ihl..total])
            }
            6 if l3.len() >= 40 => {
                let plen = usize::from(u16::from_be_bytes([l3[4], l3[5]]));
                if l3[6] != 6 || l3.len() < 40 + plen {
                    return; // extension headers are not used on loopback tests
                }
                let s: [u8; 16] = l3[8..24].try_into().unwrap();
                let d: [u8; 16] = l3[24..40].try_into().unwrap();
                (Ipv6Addr::from(s).into(), Ipv6Addr::from(d).into(), &l3[40..40 + plen])
            }
            _ => return,
        };
        if l4.len() < 20 {
            return;
        }
        let sport = u16::from_be_bytes([l4[0], l4[1]]);
        let dport = u16::from_be_bytes([l4[2], l4[3]]);
        let seq = u32::from_be_bytes(l4[4..8].try_into().unwrap());
        let off = usize::from(l4[12] >> 4) * 4;
        let syn = l4[13] & 0x02 != 0;
        if off > l4.len() {
            return;
        }
        let pair = (SocketAddr::new(src_ip, sport), SocketAddr::new(dst_ip, dport));
        let conn = self.latest.entry(pair).or_insert(0);
        let current = FlowKey { src: pair.0, dst: pair.1, conn: *conn };
        let known = self.flows.get(&current);
        // A SYN with another initial sequence number than this flow's (not a retransmission)
        // starts the next connection on the pair.
        if syn && known.is_some_and(|f| f.base.is_some() && f.base != Some(seq.wrapping_add(1))) {
            *conn += 1;
        }
        let key = FlowKey { src: pair.0, dst: pair.1, conn: *conn };
        let flow = self.flows.entry(key).or_default();
        if syn {
            flow.base = Some(seq.wrapping_add(1));
            flow.syn_seen = true;
        }
        let payload = &l4[off..];
        if !payload.is_empty() {
            let base = *flow.base.get_or_insert(seq);
            // A TFO SYN carries data at seq+1.
            let seq = if syn { seq.wrapping_add(1) } else { seq };
            flow.segments.push((seq.wrapping_sub(base), payload.to_vec()));
        }
    }

    /// Flows that carried at least one payload byte.
    pub fn data_flows(&self) -> impl Iterator<Item = (&FlowKey, &Flow)> {
        self.flows.iter().filter(|(_, f)| !f.is_empty())
    }

    /// A one-line-per-flow summary for failure messages.
    pub fn summary(&self) -> String {
        let mut s = String::new();
        for (k, f) in &self.flows {
            let v = match f.verdict() {
                Verdict::Tls { types, complete } => format!(
                    "TLS records {:?}{}{}",
                    &types[..types.len().min(8)],
                    if types.len() > 8 { "..." } else { "" },
                    if complete { "" } else { " (capture incomplete)" }
                ),
                Verdict::NotTls { at } => format!("NOT TLS at byte {at}: {}", f.excerpt_at(at)),
            };
            let _ = writeln!(s, "  {k}: {} bytes in {} runs, {v}", f.len(), f.runs.len());
        }
        if s.is_empty() {
            s.push_str("  (no packets captured)\n");
        }
        s
    }

    /// The wire proves protection: every record header the capture holds, in every flow on the
    /// port, is a TLS header (so every byte is inside a TLS record); flows start with a
    /// handshake record; application data went as application-data records; and none of
    /// `markers` appears anywhere. At least one flow must be captured completely (tcpdump can
    /// miss packets under load; the marker check still covers every captured byte).
    pub fn assert_protected(&self, markers: &[&[u8]]) {
        let data: Vec<_> = self.data_flows().collect();
        assert!(
            !data.is_empty(),
            "the capture saw no payload at all:\n{}",
            self.summary()
        );
        let mut complete = 0;
        let mut app_data = false;
        for (k, f) in &data {
            for m in markers {
                assert!(
                    !f.contains(m),
                    "PLAINTEXT ON THE WIRE: marker {:?} in {k}:\n{}",
                    String::from_utf8_lossy(m),
                    self.summary()
                );
            }
            match f.verdict() {
                Verdict::NotTls { at } => panic!(
                    "{k} is not TLS from byte {at}: {}\n{}",
                    f.excerpt_at(at),
                    self.summary()
                ),
                Verdict::Tls { types, complete: c } => {
                    if f.syn_seen {
                        assert!(
                            types.first().is_none_or(|&t| t == HANDSHAKE),
                            "{k} does not start with a handshake record:\n{}",
                            self.summary()
                        );
                    }
                    complete += usize::from(c);
                    app_data |= types.contains(&APPLICATION_DATA);
                }
            }
        }
        assert!(
            complete > 0,
            "no flow was captured completely:\n{}",
            self.summary()
        );
        assert!(
            app_data,
            "no TLS application-data record on the wire:\n{}",
            self.summary()
        );
    }

    /// The wire shows `marker` in clear (for tests of deliberate plaintext, and to show a
    /// capture is not blind).
    pub fn saw_plaintext(&self, marker: &[u8]) -> bool {
        self.flows.values().any(|f| f.contains(marker))
    }
}

impl Flow {
    fn stitch(&mut self) {
        let mut segs = std::mem::take(&mut self.segments);
        segs.sort_by_key(|(o, _)| *o);
        let mut runs: Vec<(usize, Vec<u8>)> = Vec::new();
        for (o, p) in segs {
            let o = o as usize;
            match runs.last_mut() {
                Some((ro, rb)) if o <= *ro + rb.len() => {
                    let have = *ro + rb.len();
                    if o + p.len() > have {
                        rb.extend_from_slice(&p[have - o..]);
                    }
                }
                _ => runs.push((o, p)),
            }
        }
        self.runs = runs;
    }
}

// ---------------------------------------------------------------------------------------------
// Observer (a plain listener at the protected destination)

/// A plain TCP listener on `127.0.0.1:port` in the test process (never under the shim). Each
/// accepted connection is read until the client closes or 3 s of silence, then closed.
#[derive(Debug)]
pub struct Observer {
    port: u16,
    seen: Arc<Mutex<Vec<Vec<u8>>>>,
}

impl Observer {
    /// Listen on `port` (127.0.0.1) now; record in the background.
    pub fn start(port: u16) -> Self {
        let l = TcpListener::bind(("127.0.0.1", port))
            .unwrap_or_else(|e| panic!("observer bind 127.0.0.1:{port}: {e}"));
        let seen = Arc::new(Mutex::new(Vec::new()));
        let s2 = Arc::clone(&seen);
        thread::spawn(move || {
            for c in l.incoming() {
                let Ok(mut c) = c else { continue };
                let idx = {
                    let mut g = s2.lock().unwrap();
                    g.push(Vec::new());
                    g.len() - 1
                };
                let s3 = Arc::clone(&s2);
                thread::spawn(move || {
                    let _ = c.set_read_timeout(Some(Duration::from_secs(3)));
                    let mut buf = [0u8; 16384];
                    while let Ok(n) = c.read(&mut buf) {
                        if n == 0 {
                            break;
                        }
                        s3.lock().unwrap()[idx].extend_from_slice(&buf[..n]);
                    }
                });
            }
        });
        Observer { port, seen }
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    /// Bytes received so far, one entry per accepted connection.
    pub fn received(&self) -> Vec<Vec<u8>> {
        self.seen.lock().unwrap().clone()
    }

    /// Wait up to `timeout` until at least `n` connections arrived and each sent something.
    pub fn wait(&self, n: usize, timeout: Duration) -> Vec<Vec<u8>> {
        let deadline = Instant::now() + timeout;
        loop {
            let r = self.received();
            if (r.len() >= n && r.iter().all(|b| !b.is_empty())) || Instant::now() >= deadline {
                return r;
            }
            thread::sleep(Duration::from_millis(20));
        }
    }

    /// Every connection the observer got carried a TLS handshake record first and never
    /// `marker`; at least one connection arrived (so the client really tried).
    pub fn assert_only_tls(&self, marker: &[u8]) {
        let got = self.wait(1, Duration::from_secs(5));
        assert!(
            !got.is_empty(),
            "no connection reached the observer on port {}",
            self.port
        );
        for (i, b) in got.iter().enumerate() {
            assert!(
                !contains(b, marker),
                "PLAINTEXT AT THE DESTINATION: connection {i} to the observer on port {} carried {:?}: {}",
                self.port,
                String::from_utf8_lossy(marker),
                excerpt(b, 0)
            );
            assert!(
                b.is_empty() || b[0] == HANDSHAKE,
                "connection {i} to the observer did not start with a TLS handshake record: {}",
                excerpt(b, 0)
            );
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn records_split_a_tls_stream_and_flag_plaintext() {
        let mut s = vec![22, 3, 1, 0, 2, 1, 2, 23, 3, 3, 0, 1, 9];
        assert_eq!(records(&s).types, vec![22, 23]);
        assert_eq!(records(&s).not_tls_at, None);
        s.extend_from_slice(b"GET / HTTP/1.1");
        assert_eq!(records(&s).not_tls_at, Some(13));
        assert_eq!(records(b"hello").not_tls_at, Some(0));
    }

    /// A raw-IP (link type 101) pcap of IPv4/TCP packets `(seq, flags, payload)` from
    /// 127.0.0.1:40000 to 127.0.0.1:5432.
    fn pcap(packets: &[(u32, u8, &[u8])]) -> Vec<u8> {
        let mut out = Vec::new();
        out.extend_from_slice(&0xa1b2_c3d4u32.to_le_bytes());
        out.extend_from_slice(&2u16.to_le_bytes());
        out.extend_from_slice(&4u16.to_le_bytes());
        out.extend_from_slice(&[0; 8]);
        out.extend_from_slice(&65535u32.to_le_bytes());
        out.extend_from_slice(&101u32.to_le_bytes());
        for (seq, flags, payload) in packets {
            let mut ip = vec![0x45, 0, 0, 0, 0, 0, 0, 0, 64, 6, 0, 0, 127, 0, 0, 1, 127, 0, 0, 1];
            let total = (20 + 20 + payload.len()) as u16;
            ip[2..4].copy_from_slice(&total.to_be_bytes());
            let mut tcp = vec![0u8; 20];
            tcp[0..2].copy_from_slice(&40000u16.to_be_bytes());
            tcp[2..4].copy_from_slice(&5432u16.to_be_bytes());
            tcp[4..8].copy_from_slice(&seq.to_be_bytes());
            tcp[12] = 5 << 4;
            tcp[13] = *flags;
            ip.extend_from_slice(&tcp);
            ip.extend_from_slice(payload);
            for v in [0u32, 0, ip.len() as u32, ip.len() as u32] {
                out.extend_from_slice(&v.to_le_bytes());
            }
            out.extend_from_slice(&ip);
        }
        out
    }

    #[test]
    fn a_reused_port_pair_is_two_connections_not_one_garbled_flow() {
        const SYN: u8 = 0x02;
        const ACK: u8 = 0x10;
        let rec = [23u8, 3, 3, 0, 1, 9];
        let wire = Wire::from_pcap(&pcap(&[
            (1000, SYN, &[]),
            (1000, SYN, &[]), // a retransmitted SYN is the same connection
            (1001, ACK, &rec),
            (5000, SYN, &[]), // the port pair again, a new initial sequence number
            (5001, ACK, &rec),
        ]))
        .unwrap();
        let flows: Vec<_> = wire.data_flows().collect();
        assert_eq!(flows.len(), 2, "{}", wire.summary());
        for (key, flow) in flows {
            assert_eq!(flow.complete_bytes(), Some(&rec[..]), "{key}");
            assert_eq!(flow.verdict(), Verdict::Tls { types: vec![23], complete: true }, "{key}");
        }
    }
}
