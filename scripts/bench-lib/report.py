"""scripts/bench report: part dirs (results.jsonl + meta.json) -> results.md, raw.json, chart data.

usage: report.py --out DIR --elapsed SECS --loadavg "a b c" PARTDIR...
Every figure is the median over repetitions with min-max beside it; ratios use medians of the
same run (same env).
"""
import argparse
import json
import os
import random
import statistics
import sys

ap = argparse.ArgumentParser()
ap.add_argument("--out", required=True)
ap.add_argument("--elapsed", type=int, default=0)
ap.add_argument("--loadavg", default="")
ap.add_argument("--loadavg-start", default="")
ap.add_argument("--rev", default="")
ap.add_argument("parts", nargs="+")
args = ap.parse_args()

records, metas = [], []
for d in args.parts:
    metas.append(json.load(open(os.path.join(d, "meta.json"))))
    with open(os.path.join(d, "results.jsonl")) as f:
        records += [json.loads(line) for line in f if line.strip()]

ORDER = ["plain", "tether-ktls", "tether-ktls-pc", "tether-ktls-padoff", "tether-user", "tether-user-pc", "tether-resumed",
         "raw-ktls", "stunnel", "rustls"]
LABEL = {
    "plain": "plaintext TCP",
    "tether-ktls": "tether kTLS, broker custody",
    "tether-ktls-pc": "tether kTLS, process custody",
    "tether-ktls-padoff": "tether kTLS, NO_PAD off",
    "tether-user": "tether userspace, broker custody",
    "tether-user-pc": "tether userspace, process custody",
    "tether-resumed": "tether, resumed (TLS 1.3 resumption; kTLS in UML, relay on the host)",
    "raw-ktls": "raw kTLS pair (fixed keys)",
    "stunnel": "stunnel4 sidecar pair",
    "rustls": "in-process rustls (floor)",
}


def values(env, cfg, workload, key):
    return [r[key] for r in records
            if r["env"] == env and r["config"] == cfg and r["workload"] == workload and key in r]


def med(env, cfg, workload, key):
    v = values(env, cfg, workload, key)
    return statistics.median(v) if v else None


def mem_added(env, cfg, side):
    """Added RSS (KiB, VmHWM) per rep vs the median plaintext process of the same side."""
    if side == "client":
        # The bulk-write client (largest buffers) plus the client-side stunnel.
        cli = values(env, cfg, "write", "vmhwm_kib") or values(env, cfg, "connrate", "vmhwm_kib")
        side_car = values(env, cfg, "memory", "sidecar_client_hwm_kib")
        per_rep = [c + s for c, s in zip(cli, side_car)] if side_car else cli
        base = med(env, "plain", "write", "vmhwm_kib")
    else:
        per_rep = values(env, cfg, "memory", "server_hwm_kib")
        base = med(env, "plain", "memory", "server_hwm_kib")
    if not per_rep or base is None:
        return []
    return [v - base for v in per_rep]


def tls_sum(env, cfg, workload, counter):
    """Sum of one /proc/net/tls_stat counter's deltas over the runs (0 when it never moved)."""
    runs = [r for r in records if r["env"] == env and r["config"] == cfg and r["workload"] == workload]
    if not runs or not any("tls_stat" in r for r in runs):
        return "–"
    return str(sum(r.get("tls_stat", {}).get(counter, 0) for r in runs))


def fmt(x, nd=0):
    if x is None:
        return "–"
    return f"{x:,.{nd}f}"


def cell(env, cfg, workload, key, nd=0, scale=1.0):
    v = values(env, cfg, workload, key)
    if not v:
        return "–"
    v = [x * scale for x in v]
    return f"{fmt(statistics.median(v), nd)} ({fmt(min(v), nd)}–{fmt(max(v), nd)})"


def ratio(a, b):
    return f"{a / b:.2f}×" if a is not None and b not in (None, 0) else "–"


def paired_ratios(env, a, b, workload):
    """a / b within each repetition of `workload` (both ran back to back in it)."""
    by_rep = {}
    for r in records:
        if r["env"] == env and r["workload"] == workload and r["config"] in (a, b) and "mib_s" in r:
            by_rep.setdefault(r["rep"], {})[r["config"]] = r["mib_s"]
    return [v[a] / v[b] for _, v in sorted(by_rep.items()) if a in v and b in v and v[b]]


def median_interval(xs, level=0.90, draws=4000):
    """The median of xs and a bootstrap interval for it (fixed seed: the report is reproducible)."""
    rng = random.Random(1)
    meds = sorted(statistics.median(rng.choices(xs, k=len(xs))) for _ in range(draws))
    lo, hi = meds[int((1 - level) / 2 * draws)], meds[int((1 + level) / 2 * draws) - 1]
    return statistics.median(xs), lo, hi


lines = []
w = lines.append
envs = [m["env"] for m in metas]
w(f"# tether benchmarks: {os.path.basename(args.out.rstrip('/'))}")
w("")
w("Produced by `scripts/bench" + (" --quick" if metas[0]["quick"] else "") + "`. Each figure is the median over "
  "repetitions, with min–max in parentheses; ratios are medians of the same run. Configurations ran interleaved "
  "(order reversed every other repetition), each with fresh server/stunnel/redis processes.")
w("")
w("## Run conditions")
w("")
for m in metas:
    crypto = ("AES-NI in userspace (ring / OpenSSL); the kernel has no kTLS" if m["env"] == "host"
              else f"kernel crypto `gcm(aes)` = `{m['gcm_driver']}` (generic C, no AES-NI in UML); userspace TLS still AES-NI")
    w(f"- **{m['env']}**: kernel {m['kernel']}, {m['nproc']} CPU(s), {m['cpu']}; {crypto}. "
      f"{m['reps']} reps; bulk {m['bulk_bytes'] >> 20} MiB per transfer (sendfile from a {m['sendfile_file_mib']} MiB "
      f"file, re-sent); {m['conns']} connections per connection-rate run; redis-benchmark -c 1 -n {m['redis_n']}. "
      f"Load average at the end of the part: {m['loadavg_end']}.")
    for name, info in sorted(m["shim_logs"].items()):
        w(f"  - shim log `{name}`: {info['modes'].strip() or 'no protected connections'}"
          + (f"; {info['detail'].strip()}" if info['detail'].strip() else ""))
    st = m["stunnel"]
    w(f"  - stunnel {st['version']}: {st['new_sessions']} full handshakes, {st['resumed']} resumed (sessionResume = no; checked on {st.get('verify_conns', '?')} extra connections at log level info), "
      f"cipher {st['cipher']}")
w(f"- Code under test: {args.rev or '?'} (release build of the work tree).")
w(f"- Load average (1, 5, 15 min) at the start of the run: {args.loadavg_start or '?'}; at the end: {args.loadavg} "
  f"(on {metas[0]['nproc']} cores: above ~0.5 means other work shared the machine, and latencies include its scheduling "
  f"delays). Whole run: {args.elapsed} s.")
w("")

for env in envs:
    cfgs = [c for c in ORDER if any(r["env"] == env and r["config"] == c for r in records)]
    kernel = next(m["kernel"] for m in metas if m["env"] == env)
    w(f"## {env}: {'userspace fallback (no kTLS in this kernel)' if env == 'host' else f'User-Mode Linux {kernel} with kTLS'}")
    w("")
    w("### Bulk throughput (MiB/s, one connection)")
    w("")
    w("| configuration | write() | × plain | × stunnel | × in-process rustls | sendfile() | × plain | × stunnel |")
    w("|---|---|---|---|---|---|---|---|")
    for c in cfgs:
        if c == "tether-resumed" or c.endswith("-pc"):
            continue
        row = [LABEL[c]]
        for wl in ("write", "sendfile"):
            m = med(env, c, wl, "mib_s")
            row += [cell(env, c, wl, "mib_s"), ratio(m, med(env, "plain", wl, "mib_s")),
                    ratio(m, med(env, "stunnel", wl, "mib_s"))]
            if wl == "write":
                row.append(ratio(m, med(env, "rustls", wl, "mib_s")))
        w("| " + " | ".join(row) + " |")
    w("")
    if paired_ratios(env, "tether-ktls", "raw-ktls", "pair_write"):
        w("### tether kTLS against the raw kTLS pair, paired rounds")
        w("")
        w("Both are the kernel's kTLS once set up, so the gap to measure is a few per cent, while single UML bulk runs "
          "swing by ±15 %. So after the table above, short transfers of both ran back to back in many rounds (order "
          "swapped every round), and the ratio is taken within each round. Interval: 90 % bootstrap interval of the "
          "median ratio. Note the two differ in more than tether: tether sets `TLS_RX_EXPECT_NO_PAD` on its receiving "
          "side, the raw pair does not.")
        w("")
        w("| workload | rounds × MiB | tether kTLS MiB/s | raw pair MiB/s | tether / raw per round: median | 90 % interval | min–max |")
        w("|---|---|---|---|---|---|---|")
        for wl in ("write", "sendfile"):
            rs = paired_ratios(env, "tether-ktls", "raw-ktls", f"pair_{wl}")
            if not rs:
                continue
            m, lo, hi = median_interval(rs)
            size = (med(env, "raw-ktls", f"pair_{wl}", "bytes") or 0) / (1 << 20)
            w(f"| {wl}() | {len(rs)} × {size:.0f} | {cell(env, 'tether-ktls', f'pair_{wl}', 'mib_s')} | {cell(env, 'raw-ktls', f'pair_{wl}', 'mib_s')} "
              f"| {m:.3f}× | {lo:.3f}–{hi:.3f} | {min(rs):.2f}–{max(rs):.2f} |")
        w("")
    if values(env, "tether-ktls-padoff", "write", "mib_s"):
        w("### kTLS RX: `TLS_RX_EXPECT_NO_PAD` on vs off (the receiving side of the bulk runs)")
        w("")
        w("tether sets `TLS_RX_EXPECT_NO_PAD` for peers in its own trust domain; `TETHER_KTLS_RX_NO_PAD=0` turns it off. "
          "Counters are `/proc/net/tls_stat` deltas summed over the repetitions of each transfer (both ends of the connection).")
        w("")
        w("| workload | NO_PAD on MiB/s | NO_PAD off MiB/s | on × off | TlsRxNoPadViolation (on) | TlsDecryptRetry (on) | TlsDecryptRetry (off) |")
        w("|---|---|---|---|---|---|---|")
        for wl in ("write", "sendfile"):
            on, off = med(env, "tether-ktls", wl, "mib_s"), med(env, "tether-ktls-padoff", wl, "mib_s")
            w(f"| {wl}() | {cell(env, 'tether-ktls', wl, 'mib_s')} | {cell(env, 'tether-ktls-padoff', wl, 'mib_s')} | {ratio(on, off)} "
              f"| {tls_sum(env, 'tether-ktls', wl, 'TlsRxNoPadViolation')} | {tls_sum(env, 'tether-ktls', wl, 'TlsDecryptRetry')} "
              f"| {tls_sum(env, 'tether-ktls-padoff', wl, 'TlsDecryptRetry')} |")
        w("")
    w("### Connection setup (connect + handshake + 1-byte request/reply, sequential)")
    w("")
    w("| configuration | conns/s | × plain | setup p50 µs | setup p99 µs | added p50 µs | added p99 µs | added p50 × stunnel's | added p50 × rustls floor's |")
    w("|---|---|---|---|---|---|---|---|---|")
    p50p, p99p = med(env, "plain", "connrate", "p50_us"), med(env, "plain", "connrate", "p99_us")
    added = {c: (med(env, c, "connrate", "p50_us") - p50p) for c in cfgs if med(env, c, "connrate", "p50_us") is not None}
    for c in cfgs:
        if med(env, c, "connrate", "p50_us") is None:
            continue  # a bulk-only configuration
        a50 = added.get(c)
        a99 = med(env, c, "connrate", "p99_us") - p99p
        w(f"| {LABEL[c]} | {cell(env, c, 'connrate', 'conns_s')} | {ratio(med(env, c, 'connrate', 'conns_s'), med(env, 'plain', 'connrate', 'conns_s'))} "
          f"| {cell(env, c, 'connrate', 'p50_us')} | {cell(env, c, 'connrate', 'p99_us')} | {fmt(a50)} | {fmt(a99)} "
          f"| {ratio(a50, added.get('stunnel')) if c != 'plain' else '–'} | {ratio(a50, added.get('rustls')) if c != 'plain' else '–'} |")
    w("")
    pairs = [(b, b + "-pc") for b in ("tether-ktls", "tether-user") if b in added and b + "-pc" in added]
    if pairs:
        w("### Key custody cost (tetherd signs each handshake's CertificateVerify vs the process signing it)")
        w("")
        w("| data path | broker custody conns/s | process custody conns/s | broker custody setup p50 µs | process custody setup p50 µs | added p50 µs (broker − process) |")
        w("|---|---|---|---|---|---|")
        for b, pc in pairs:
            w(f"| {LABEL[b].split(',')[0]} | {cell(env, b, 'connrate', 'conns_s')} | {cell(env, pc, 'connrate', 'conns_s')} "
              f"| {cell(env, b, 'connrate', 'p50_us')} | {cell(env, pc, 'connrate', 'p50_us')} | {fmt(added[b] - added[pc])} |")
        w("")
    sig = [r for r in records if r["env"] == env and r["workload"] == "signing" and "rate" in r]
    if sig:
        w("### tetherd signing rate (broker key custody: CertificateVerify signatures/s, ECDSA P-256)")
        w("")
        w("One `tether bench-sign` process, each thread on its own connection to tetherd; every request is attested "
          "(SCM_CREDENTIALS/SCM_PIDFD, pidfd re-check) and signed for its owner only. Client and tetherd share the "
          f"machine's {next(m['nproc'] for m in metas if m['env'] == env)} cores. \"new connection each\" is the shim's pattern (one connection per handshake).")
        w("")
        w("| clients | signatures/s | p50 µs | p99 µs | errors |")
        w("|---|---|---|---|---|")
        for n, fresh in sorted({(r["clients"], r["fresh"]) for r in sig}, key=lambda k: (k[1], k[0])):
            rs = [r for r in sig if r["clients"] == n and r["fresh"] == fresh]
            st = lambda k: f"{fmt(statistics.median([r[k] for r in rs]))} ({fmt(min(r[k] for r in rs))}–{fmt(max(r[k] for r in rs))})"
            w(f"| {n}{', a new connection each' if fresh else ''} | {st('rate')} | {st('p50_us')} | {st('p99_us')} | {sum(r['errors'] for r in rs)} |")
        w("")
    sc = [c for c in cfgs if values(env, c, "syscalls", "client_per_conn")]
    if sc:
        r0 = next(r for r in records if r["env"] == env and r["workload"] == "syscalls")
        w(f"### Syscalls per connection (strace -f -c, threads included: runs of {r0['n2']} minus {r0['n1']} connections, divided)")
        w("")
        w("| configuration | client | server | client × rustls floor's | server × rustls floor's |")
        w("|---|---|---|---|---|")
        for c in sc:
            cl, sv = med(env, c, "syscalls", "client_per_conn"), med(env, c, "syscalls", "server_per_conn")
            w(f"| {LABEL[c]} | {cl:.1f} | {sv:.1f} | {ratio(cl, med(env, 'rustls', 'syscalls', 'client_per_conn'))} "
              f"| {ratio(sv, med(env, 'rustls', 'syscalls', 'server_per_conn'))} |")
        w("")
    cc = [c for c in cfgs if values(env, c, "cpu", "client_cpu_us")]
    if cc:
        n = next(r["n"] for r in records if r["env"] == env and r["workload"] == "cpu")
        w(f"### CPU time per connection (µs, user + system, all threads; {n} sequential connections per rep, after one warm-up)")
        w("")
        w("| configuration | client | server | both | both × rustls floor's | both × tether full handshakes' |")
        w("|---|---|---|---|---|---|")
        both = lambda c: [a + b for a, b in zip(values(env, c, "cpu", "client_cpu_us"), values(env, c, "cpu", "server_cpu_us"))]
        full = "tether-ktls" if env == "uml" and values(env, "tether-ktls", "cpu", "client_cpu_us") else "tether-user"
        for c in cc:
            b = statistics.median(both(c))
            w(f"| {LABEL[c]} | {cell(env, c, 'cpu', 'client_cpu_us')} | {cell(env, c, 'cpu', 'server_cpu_us')} | {fmt(b)} "
              f"| {ratio(b, statistics.median(both('rustls')) if both('rustls') else None)} "
              f"| {ratio(b, statistics.median(both(full)) if both(full) else None)} |")
        w("")
    w("### redis-benchmark -c 1 (µs; both redis-server and redis-benchmark under the configuration)")
    w("")
    w("| configuration | SET p50 | SET p99 | GET p50 | GET p99 | GET p50 × plain | GET p99 × plain | SET p50 × plain | SET p99 × plain | GET rps |")
    w("|---|---|---|---|---|---|---|---|---|---|")
    for c in cfgs:
        if not values(env, c, "redis_get", "p50_ms"):
            continue
        r = lambda wl, k: ratio(med(env, c, wl, k), med(env, "plain", wl, k))
        w(f"| {LABEL[c]} | {cell(env, c, 'redis_set', 'p50_ms', 0, 1000)} | {cell(env, c, 'redis_set', 'p99_ms', 0, 1000)} "
          f"| {cell(env, c, 'redis_get', 'p50_ms', 0, 1000)} | {cell(env, c, 'redis_get', 'p99_ms', 0, 1000)} "
          f"| {r('redis_get', 'p50_ms')} | {r('redis_get', 'p99_ms')} | {r('redis_set', 'p50_ms')} | {r('redis_set', 'p99_ms')} "
          f"| {cell(env, c, 'redis_get', 'rps')} |")
    w("")
    w("### Memory: added peak RSS (VmHWM) vs the plaintext process, KiB")
    w("")
    w("| configuration | client | server | note |")
    w("|---|---|---|---|")
    for c in cfgs:
        if c == "plain":
            w(f"| {LABEL[c]} (absolute) | {cell(env, c, 'write', 'vmhwm_kib')} | {cell(env, c, 'memory', 'server_hwm_kib')} | baseline |")
            continue
        if not values(env, c, "memory", "server_hwm_kib"):
            continue  # a bulk-only configuration
        parts = []
        for side in ("client", "server"):
            v = mem_added(env, c, side)
            parts.append(f"{fmt(statistics.median(v))} ({fmt(min(v))}–{fmt(max(v))})" if v else "–")
        note = "includes the stunnel process on that side" if c == "stunnel" else ""
        w(f"| {LABEL[c]} | {parts[0]} | {parts[1]} | {note} |")
    w("")

# ---- targets --------------------------------------------------------------------------------
w("## Targets")
w("")
w("| target | measured | met? |")
w("|---|---|---|")
targets = []


def target(name, measured, ok):
    """ok: True, False, or None when the measurement cannot tell (its interval straddles the target)."""
    targets.append({"target": name, "measured": measured, "met": ok})
    w(f"| {name} | {measured} | {'yes' if ok else 'within the noise' if ok is None else '**no**'} |")


def tput(env, c, wl):
    return med(env, c, wl, "mib_s")


if "uml" in envs:
    for wl in ("write", "sendfile"):
        rs = paired_ratios("uml", "tether-ktls", "raw-ktls", f"pair_{wl}")
        a, b = tput("uml", "tether-ktls", wl), tput("uml", "raw-ktls", wl)
        if len(rs) >= 5:
            # Judged on the paired rounds: met when the whole interval is at or above 0.98.
            m, lo, hi = median_interval(rs)
            target(f"tether kTLS ≥ 0.98× raw kTLS pair ({wl}, UML)",
                   f"{m:.3f}× (median of {len(rs)} paired rounds; 90 % interval {lo:.3f}–{hi:.3f})",
                   True if lo >= 0.98 else False if hi < 0.98 else None)
        elif a and b:
            target(f"tether kTLS ≥ 0.98× raw kTLS pair ({wl}, UML)", f"{a / b:.2f}×", a / b >= 0.98)
if "uml" in envs and values("uml", "tether-ktls-padoff", "write", "mib_s"):
    for wl in ("write", "sendfile"):
        a, b = tput("uml", "tether-ktls", wl), tput("uml", "tether-ktls-padoff", wl)
        if a and b:
            target(f"NO_PAD on vs off reported ({wl}, UML)", f"{a:,.0f} vs {b:,.0f} MiB/s = {a / b:.2f}×", True)
        v = tls_sum("uml", "tether-ktls", wl, "TlsRxNoPadViolation")
        if v != "–":
            target(f"TlsRxNoPadViolation stays 0 between tether peers ({wl}, UML)", v, v == "0")
for env in envs:
    a, b = tput(env, "tether-user", "write"), tput(env, "plain", "write")
    if a and b:
        r = tput(env, "rustls", "write")
        floor = f" (in-process rustls: {r / b:.2f}× plaintext; the relay {a / r:.2f}× rustls)" if r else ""
        target(f"tether userspace relay write() ≥ 0.6× plaintext ({env})", f"{a / b:.2f}×{floor}", a / b >= 0.6)
for env in envs:
    for wl in ("write", "sendfile"):
        a, b = tput(env, "tether-user", wl), tput(env, "stunnel", wl)
        if a and b:
            target(f"tether userspace ≥ 1.5× stunnel ({wl}, {env})", f"{a / b:.2f}×", a / b >= 1.5)
for env in envs:
    p = med(env, "plain", "connrate", "p50_us")
    st, rl = med(env, "stunnel", "connrate", "p50_us"), med(env, "rustls", "connrate", "p50_us")
    for c in ("tether-ktls", "tether-user"):
        t = med(env, c, "connrate", "p50_us")
        if t is None or p is None:
            continue
        if st is not None:
            r = (t - p) / (st - p)
            target(f"{LABEL[c]} added setup p50 ≤ 0.5× stunnel's ({env})", f"{t - p:,.0f} µs vs {st - p:,.0f} µs = {r:.2f}×", r <= 0.5)
        if rl is not None:
            r = (t - p) / (rl - p)
            target(f"{LABEL[c]} added setup p50 ≤ 1.3× rustls floor's ({env})", f"{t - p:,.0f} µs vs {rl - p:,.0f} µs = {r:.2f}×", r <= 1.3)
for env in envs:
    # Issue 14 (setup): added setup at the floor, and resumption's gain, side by side.
    p, rl = med(env, "plain", "connrate", "p50_us"), med(env, "rustls", "connrate", "p50_us")
    for c, limit in (("tether-user", 1.1), ("tether-ktls", 2.0)):
        t = med(env, c, "connrate", "p50_us")
        if None not in (t, p, rl) and (env == "host" or c == "tether-ktls"):
            r = (t - p) / (rl - p)
            target(f"{LABEL[c]} added setup p50 ≤ {limit}× rustls floor's ({env}, issue 14)",
                   f"{t - p:,.0f} µs vs {rl - p:,.0f} µs = {r:.2f}×", r <= limit)
    full = "tether-ktls" if env == "uml" else "tether-user"
    a, b = med(env, "tether-resumed", "connrate", "conns_s"), med(env, full, "connrate", "conns_s")
    if a and b:
        target(f"resumed conns/s ≥ 1.5× full handshakes' ({LABEL[full]}, {env}, issue 14)", f"{a:,.0f} vs {b:,.0f} = {a / b:.2f}×", a / b >= 1.5)
for env in envs:
    # Issue 11 (key custody): the broker's signature costs at most 60 µs of setup p50, and tetherd
    # signs at least 20,000/s on 2 cores. Judged on the host: in UML every syscall is a ptrace round
    # trip, so the custody table there is reported, not held to a budget in µs.
    for b in (("tether-user",) if env == "host" else ()):
        a, pc = med(env, b, "connrate", "p50_us"), med(env, b + "-pc", "connrate", "p50_us")
        if a is not None and pc is not None:
            target(f"broker custody adds ≤ 60 µs setup p50 over process custody ({LABEL[b].split(',')[0]}, {env}, issue 11)",
                   f"{a:,.0f} − {pc:,.0f} = {a - pc:,.0f} µs", a - pc <= 60)
    rates = [r["rate"] for r in records if r["env"] == env and r["workload"] == "signing" and not r["fresh"] and "rate" in r]
    if rates:
        best = max(statistics.median([r["rate"] for r in records if r["env"] == env and r["workload"] == "signing"
                                      and not r["fresh"] and r["clients"] == n and "rate" in r])
                   for n in {r["clients"] for r in records if r["env"] == env and r["workload"] == "signing" and not r["fresh"]})
        target(f"tetherd ≥ 20,000 signatures/s on {next(m['nproc'] for m in metas if m['env'] == env)} cores (best of 1/8/64 clients, {env}, issue 11)",
               f"{best:,.0f}/s", best >= 20000)
if "uml" in envs:
    for wl in ("redis_get", "redis_set"):
        for k in ("p50_ms", "p99_ms"):
            a, b = med("uml", "tether-ktls", wl, k), med("uml", "plain", wl, k)
            if a and b:
                target(f"redis {wl[6:].upper()} {k[:3]} under tether kTLS ≤ 1.1× plain (UML)",
                       f"{a * 1000:.0f} µs vs {b * 1000:.0f} µs = {a / b:.2f}×", a / b <= 1.1)
for env in envs:
    for c in ("tether-ktls", "tether-user"):
        for side in ("client", "server"):
            v = mem_added(env, c, side)
            if v:
                m = statistics.median(v)
                target(f"{LABEL[c]} added RSS ≤ 3 MiB ({side}, {env})", f"{m / 1024:.2f} MiB", m <= 3072)
w("")

os.makedirs(args.out, exist_ok=True)
with open(os.path.join(args.out, "results.md"), "w") as f:
    f.write("\n".join(lines) + "\n")
with open(os.path.join(args.out, "raw.json"), "w") as f:
    json.dump({"meta": metas, "rev": args.rev, "elapsed_s": args.elapsed, "targets": targets, "records": records}, f, indent=1)

# ---- chart data: one file per panel, rows "label median min max [median min max]" ----------
SHORT = {"plain": "plain", "tether-ktls": "tether-kTLS", "tether-ktls-padoff": "tether-kTLS-padoff", "tether-user": "tether-user", "raw-ktls": "raw-kTLS",
         "tether-ktls-pc": "tether-kTLS-pc", "tether-user-pc": "tether-user-pc",
         "tether-resumed": "tether-resumed",
         "stunnel": "stunnel", "rustls": "rustls-floor"}


def stats(v, scale=1.0):
    if not v:
        return ["NaN", "NaN", "NaN"]
    v = [x * scale for x in v]
    return [f"{statistics.median(v):.3f}", f"{min(v):.3f}", f"{max(v):.3f}"]


def panel(name, series, cfg_filter):
    with open(os.path.join(args.out, f"chart-{name}.dat"), "w") as f:
        for env in envs:
            for c in ORDER:
                if not cfg_filter(env, c):
                    continue
                row = [f'"{env}:{SHORT[c]}"']
                for s in series:
                    row += stats(s(env, c))
                f.write(" ".join(row) + "\n")


has = lambda env, c, wl: bool(values(env, c, wl, "vmhwm_kib") or values(env, c, wl, "p50_ms") or values(env, c, wl, "server_hwm_kib"))
panel("throughput", [lambda e, c: values(e, c, "write", "mib_s"), lambda e, c: values(e, c, "sendfile", "mib_s")],
      lambda e, c: bool(values(e, c, "write", "mib_s")))
panel("connrate", [lambda e, c: values(e, c, "connrate", "conns_s")], lambda e, c: bool(values(e, c, "connrate", "conns_s")))
panel("latency", [lambda e, c: [x * 1000 for x in values(e, c, "redis_get", "p50_ms")],
                  lambda e, c: [x * 1000 for x in values(e, c, "redis_get", "p99_ms")],
                  lambda e, c: [x * 1000 for x in values(e, c, "redis_set", "p50_ms")],
                  lambda e, c: [x * 1000 for x in values(e, c, "redis_set", "p99_ms")]],
      lambda e, c: bool(values(e, c, "redis_get", "p50_ms")))
panel("memory", [lambda e, c: [x / 1024 for x in mem_added(e, c, "client")],
                 lambda e, c: [x / 1024 for x in mem_added(e, c, "server")]],
      lambda e, c: c != "plain" and bool(mem_added(e, c, "server")))
print("\n".join(lines))
