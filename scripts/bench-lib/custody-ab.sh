#!/usr/bin/env bash
# custody-ab: broker vs process key custody, setup p50 in paired interleaved runs, for profiling the
# cost of a broker signature (not part of scripts/bench; its custody rows stay there).
#
#   scripts/bench-lib/custody-ab.sh REL N ROUNDS
#
# REL is an absolute release target dir (tetherd, bench-server, bench-client, libtether.so). Two
# tetherds with the same policy, one per custody; each round runs N sequential connections
# (bench-client connrate, full handshakes, userspace relay) against each, and prints both p50s. At
# the end: the medians, and the median of the paired deltas (the steadier figure: run-to-run drift
# moves both configurations of a round together). Run on a quiet machine.
set -u
(($# == 3)) || { sed -n "2,12s/^# \\{0,1\\}//p" "$0"; exit 2; }
REL=$1 N=$2 ROUNDS=$3
RUN=$(mktemp -d /tmp/tether-custody-ab.XXXXXX)
source "$(dirname -- "${BASH_SOURCE[0]}")/ab-lib.sh"
for m in broker process; do
    bench_policy "$RUN/$m.toml" "$m" 19502 19503
    start_tetherd "$REL/tetherd" "$RUN/$m.toml" "$RUN/$m.sock" "$RUN/state" "$RUN/$m.log" || { echo "tetherd ($m) did not start"; exit 1; }
    echo "$TD" >>"$RUN/pids"
done
shim() { echo "LD_PRELOAD=$REL/libtether.so TETHER_SOCKET=$RUN/$1.sock TETHER_MODE=userspace TETHER_RESUMPTION=0"; }
env $(shim broker) "$REL/bench-server" --port 19502 >/dev/null 2>&1 & echo $! >>"$RUN/pids"
env $(shim process) "$REL/bench-server" --port 19503 >/dev/null 2>&1 & echo $! >>"$RUN/pids"
sleep 0.5
p50() { env $(shim "$1") "$REL/bench-client" --port "$2" connrate --n "$N" | grep -o '"p50_us":[0-9.]*' | cut -d: -f2; }
p50 broker 19502 >/dev/null; p50 process 19503 >/dev/null # SVID fetch, signing connection, page cache
for r in $(seq "$ROUNDS"); do
    if ((r % 2)); then b=$(p50 broker 19502); p=$(p50 process 19503); else p=$(p50 process 19503); b=$(p50 broker 19502); fi
    echo "round $r broker $b process $p" | tee -a "$RUN/rounds"
done
kill $(cat "$RUN/pids") 2>/dev/null; wait 2>/dev/null
python3 - "$RUN/rounds" <<'PY'
import statistics as st, sys
rows = [l.split() for l in open(sys.argv[1])]
b, p = [float(r[3]) for r in rows], [float(r[5]) for r in rows]
print(f"median p50: broker {st.median(b):.1f} us, process {st.median(p):.1f} us; "
      f"median paired delta {st.median([x - y for x, y in zip(b, p)]):.1f} us over {len(rows)} rounds")
PY
rm -rf "$RUN"
