"""Check a tcpdump capture: every TCP stream on PORT carries only TLS records, no MARKER.

    pcap_tls_check.py FILE PORT MARKER [MIN_SERVER_BYTES]

Reassembles each direction of each TCP connection to or from PORT (IPv4 over Ethernet, classic
pcap as written by `tcpdump -w`), follows the TLS record framing (type 0x14-0x17, version
0x0301/0x0303, length 1..16640) and searches for MARKER in the raw bytes. Prints one JSON object;
exit status 1 when a stream is not TLS, the marker appears, or no server->client stream carried
MIN_SERVER_BYTES.

Capture holes (tcpdump drops packets when it is starved of CPU, as in UML on a loaded machine)
are survived, not ignored: the first 64 KiB of every stream (handshake and the first records,
where the tests put their marker) must be contiguous; after a hole the scan resynchronises on a
chain of three valid record headers within one maximum record (16645 bytes) and follows the
framing strictly from there, so at most that much per hole goes unread; and at least half of the
stream's sequence space must have been captured. Otherwise the stream fails ("cannot vouch").
MIN_SERVER_BYTES is compared with the sequence space the server's stream covered on the wire.
"""
import json
import struct
import sys

path, port, marker = sys.argv[1], int(sys.argv[2]), sys.argv[3].encode()
min_server = int(sys.argv[4]) if len(sys.argv) > 4 else 1

streams = {}  # (src, sport, dst, dport) -> {isn, segments}
with open(path, "rb") as f:
    head = f.read(24)
    magic = struct.unpack("<I", head[:4])[0]
    endian = "<" if magic in (0xA1B2C3D4, 0xA1B23C4D) else ">"
    linktype = struct.unpack(endian + "I", head[20:24])[0]
    if linktype != 1:
        sys.exit(f"unsupported link type {linktype}")
    while True:
        rec = f.read(16)
        if len(rec) < 16:
            break
        _, _, incl, _ = struct.unpack(endian + "IIII", rec)
        pkt = f.read(incl)
        if len(pkt) < 14 + 20 or pkt[12:14] != b"\x08\x00":
            continue
        ip = pkt[14:]
        ihl = (ip[0] & 15) * 4
        total = struct.unpack(">H", ip[2:4])[0]
        if ip[9] != 6:
            continue
        tcp = ip[ihl:total]
        sport, dport, seq = struct.unpack(">HHI", tcp[:8])
        if port not in (sport, dport):
            continue
        off = (tcp[12] >> 4) * 4
        flags = tcp[13]
        key = (ip[12:16], sport, ip[16:20], dport)
        st = streams.setdefault(key, {"isn": None, "segs": {}})
        if flags & 0x02:  # SYN
            st["isn"] = seq + 1
        data = tcp[off:]
        if data:
            st["segs"].setdefault(seq, data)


HEAD_OK = lambda t, v1, v2, n: 0x14 <= t <= 0x17 and v1 == 3 and v2 in (1, 3) and 0 < n <= 16640
MAX_RECORD = 5 + 16640
CONTIGUOUS_PREFIX = 64 * 1024


def resync(buf):
    """Offset of the first record boundary in BUF (a run after a hole), or None."""
    for start in range(min(len(buf), MAX_RECORD)):
        i, chained = start, 0
        while chained < 3 and i + 5 <= len(buf):
            t, v1, v2, n = buf[i], buf[i + 1], buf[i + 2], struct.unpack(">H", buf[i + 3:i + 5])[0]
            if not HEAD_OK(t, v1, v2, n):
                break
            chained, i = chained + 1, i + 5 + n
        if chained == 3 or (chained and i == len(buf)):
            return start
    return None


def scan(buf):
    i, records, bad = 0, 0, []
    while i + 5 <= len(buf):
        t, v1, v2, n = buf[i], buf[i + 1], buf[i + 2], struct.unpack(">H", buf[i + 3:i + 5])[0]
        if not (0x14 <= t <= 0x17 and v1 == 3 and v2 in (1, 3) and 0 < n <= 16640):
            bad.append(f"offset {i}: {buf[i:i + 8].hex()}")
            break
        records += 1
        i += 5 + n
    return records, bad, len(buf) - i if i <= len(buf) else 0


report, failed, max_server = [], False, 0
for (src, sport, dst, dport), st in streams.items():
    if st["isn"] is None:
        # Opened before the capture started (a readiness probe): not part of the test.
        report.append({"stream": f"{sport}->{dport}", "skipped": "opened before the capture"})
        continue
    runs, nxt = [bytearray()], st["isn"]  # contiguous runs of the reassembled stream
    for seq in sorted(st["segs"], key=lambda s: (s - st["isn"]) & 0xFFFFFFFF):
        data = st["segs"][seq]
        rel = (seq - nxt) & 0xFFFFFFFF
        if rel > 0x7FFFFFFF:  # starts before nxt: retransmission or overlap
            skip = (nxt - seq) & 0xFFFFFFFF
            if skip >= len(data):
                continue
            data = data[skip:]
        elif rel > 0:
            runs.append(bytearray())  # a hole: the capture dropped `rel` bytes
        runs[-1] += data
        nxt = (seq + len(st["segs"][seq])) & 0xFFFFFFFF
    span = (nxt - st["isn"]) & 0xFFFFFFFF
    captured = sum(len(r) for r in runs)
    records, bad, unread = 0, [], 0
    for k, run in enumerate(runs):
        at = 0 if k == 0 else resync(bytes(run))
        if at is None:
            bad.append(f"run {k} after a hole: no TLS record framing found")
            continue
        unread += at
        n, b, _ = scan(bytes(run[at:]))
        records += n
        bad += [f"run {k}: {x}" for x in b]
    holes = len(runs) - 1
    if holes and len(runs[0]) < min(CONTIGUOUS_PREFIX, span):
        bad.append(f"cannot vouch: a hole within the first {CONTIGUOUS_PREFIX} bytes")
    if holes and captured * 2 < span:
        bad.append(f"cannot vouch: only {captured} of {span} bytes captured")
    has_marker = any(marker in r for r in runs)
    entry = {"stream": f"{sport}->{dport}", "bytes": captured, "span": span, "records": records,
             "bad": bad, "marker": has_marker, "holes": holes, "unread_after_holes": unread}
    report.append(entry)
    if bad or has_marker:
        failed = True
    if sport == port:
        max_server = max(max_server, span)
if max_server < min_server:
    failed = True
print(json.dumps({"port": port, "ok": not failed, "max_server_bytes": max_server, "streams": report}))
sys.exit(1 if failed else 0)
