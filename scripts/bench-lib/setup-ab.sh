#!/usr/bin/env bash
# setup-ab: connection setup of two libtether.so builds side by side with plaintext TCP and the
# in-process rustls floor, interleaved, plus system calls per connection by name (for work on
# the handshake path; not part of scripts/bench, whose setup rows stay there). Inside UML:
#
#   scripts/ktls-vm --kernel 7.2 --mem 1G --timeout 3000 -- \
#       scripts/bench-lib/setup-ab.sh REL BASE_LIB N ROUNDS [CUSTODY]
#
# REL is an absolute release target dir (tetherd, tether, bench-server, bench-client,
# libtether.so = "new"); BASE_LIB another libtether.so ("base", e.g. built from the parent
# commit). CUSTODY is broker (default) or process. Each round runs N sequential connections
# (bench-client connrate, full handshakes) of plain, rustls, base and new (order rotated every
# round) and prints each p50. At the end: median added p50 (p50 - plain's) and its ratio to the
# floor's, then strace -f -c of 10 and 40 connections of base and new: calls per connection by
# name, client and server, threads included.
set -u
(($# >= 4)) || { sed -n "2,15s/^# \\{0,1\\}//p" "$0"; exit 2; }
REL=$1 BASE=$2 N=$3 ROUNDS=$4 CUSTODY=${5:-broker}
RUN=$(mktemp -d /tmp/tether-setup-ab.XXXXXX)
source "$(dirname -- "${BASH_SOURCE[0]}")/ab-lib.sh"
bench_policy "$RUN/tetherd.toml" "$CUSTODY" 19502 19503
start_tetherd "$REL/tetherd" "$RUN/tetherd.toml" "$RUN/s.sock" "$RUN/state" "$RUN/tetherd.log" || { echo "tetherd did not start"; exit 1; }
trap 'kill "$TD" 2>/dev/null' EXIT # also on the host, where no VM teardown ends it
"$REL/tether" svid --socket "$RUN/s.sock" --out "$RUN/svid" >/dev/null || { echo "tether svid failed"; exit 1; }
CONFIGS=(plain rustls base new)
shim() { echo "LD_PRELOAD=$1 TETHER_SOCKET=$RUN/s.sock TETHER_RESUMPTION=0"; }
pre_of() { case $1 in plain | rustls) echo "X=1" ;; base) shim "$BASE" ;; new) shim "$REL/libtether.so" ;; esac; }
port_of() { case $1 in plain) echo 19501 ;; base) echo 19502 ;; new) echo 19503 ;; rustls) echo 19504 ;; esac; }
flags_of() { [[ $1 == rustls ]] && echo "--rustls $RUN/svid"; }
serve() { # CONFIG [strace prefix...]: a bench-server in the background, its pid in SPID
    local c=$1
    shift
    # shellcheck disable=SC2046
    "$@" env $(pre_of "$c") "$REL/bench-server" --port "$(port_of "$c")" $(flags_of "$c") >/dev/null 2>>"$RUN/server.err" &
    SPID=$!
}
connrate() { # CONFIG N [strace prefix...]
    local c=$1 n=$2
    shift 2
    # shellcheck disable=SC2046
    "$@" env $(pre_of "$c") "$REL/bench-client" --port "$(port_of "$c")" $(flags_of "$c") connrate --n "$n" 2>>"$RUN/client.err"
}
p50() { connrate "$1" "$N" | grep -o '"p50_us":[0-9.]*' | cut -d: -f2; }
echo "kernel $(uname -r) loadavg $(cut -d' ' -f1-3 /proc/loadavg) custody $CUSTODY n $N rounds $ROUNDS"
PIDS=()
for c in "${CONFIGS[@]}"; do serve "$c"; PIDS+=("$SPID"); done
sleep 1
for c in "${CONFIGS[@]}"; do connrate "$c" 3 >/dev/null; done # SVID fetch, signing connection, page cache
order=("${CONFIGS[@]}")
for r in $(seq "$ROUNDS"); do
    line="round $r"
    for c in "${order[@]}"; do line+=" $c $(p50 "$c")"; done
    echo "$line" | tee -a "$RUN/rounds"
    order=("${order[@]:1}" "${order[0]}")
done
kill "${PIDS[@]}" 2>/dev/null; wait "${PIDS[@]}" 2>/dev/null
python3 - "$RUN/rounds" <<'PY'
import statistics as st, sys
rounds = [dict(zip(l.split()[2::2], map(float, l.split()[3::2]))) for l in open(sys.argv[1])]
added = {c: st.median(r[c] - r["plain"] for r in rounds) for c in ("rustls", "base", "new")}
for c in ("plain", "rustls", "base", "new"):
    p = st.median(r[c] for r in rounds)
    extra = f", added {added[c]:.0f} us = {added[c] / added['rustls']:.2f}x the floor's" if c != "plain" else ""
    print(f"median p50 {c}: {p:.0f} us{extra}")
print(f"new - base, median of paired added p50s: {st.median(r['new'] - r['base'] for r in rounds):.0f} us over {len(rounds)} rounds")
PY
command -v strace >/dev/null || { echo "no strace: syscall counts skipped"; rm -rf "$RUN"; exit 0; }
for c in base new rustls; do
    for n in 10 40; do
        serve "$c" strace -f -c -o "$RUN/srv-$c-$n"
        sleep 1
        connrate "$c" "$n" strace -f -c -o "$RUN/cli-$c-$n" >/dev/null
        kid=$(pgrep -P "$SPID" | head -1)
        [[ -n $kid ]] && kill "$kid"
        wait "$SPID" 2>/dev/null
    done
done
python3 - "$RUN" <<'PY'
import collections, os, sys
def calls(path):
    out = collections.Counter()
    for line in open(path):
        f = line.split()
        if len(f) >= 5 and f[0][0].isdigit() and f[-1] != "total":
            out[f[-1]] = int(f[3])
    return out
run = sys.argv[1]
for side in ("cli", "srv"):
    per = {c: calls(f"{run}/{side}-{c}-40") - calls(f"{run}/{side}-{c}-10") for c in ("base", "new", "rustls")}
    print(f"{'client' if side == 'cli' else 'server'} syscalls per connection (40 - 10 connections, / 30):")
    print("  total: " + ", ".join(f"{c} {sum(v.values()) / 30:.1f}" for c, v in per.items()))
    names = sorted(set().union(*per.values()), key=lambda n: -per["base"][n])
    for n in names:
        print(f"  {n:<18}" + "".join(f" {c} {per[c][n] / 30:5.1f}" for c in per))
PY
rm -rf "$RUN"
