#!/usr/bin/env bash
# relay-ab: interleaved A/B of the userspace relay's bulk write() throughput and CPU cost, for
# profiling work on preload/src/fallback/ (not part of scripts/bench; its ratios stay there).
#
#   scripts/bench-lib/relay-ab.sh REL BASE_LIB BYTES ROUNDS
#
# REL is a release target dir (tetherd, bench-server, bench-client, libtether.so = "new");
# BASE_LIB another libtether.so ("base", e.g. a copy built from the parent commit). Each round
# runs plaintext TCP, base and new one after another (one bench-server each, started once), and
# prints "CONFIG MiB/s client_cpu_ms=.. server_cpu_ms=..": under load from other processes the
# CPU cost per transfer is the steadier figure. Needs perf (linux-perf) for the client's task-clock.
set -u
(($# == 4)) || { sed -n "2,12s/^# \\{0,1\\}//p" "$0"; exit 2; }
REL=$1 BASE=$2 BYTES=$3 ROUNDS=$4
RUN=$(mktemp -d /tmp/tether-relay-ab.XXXXXX)
source "$(dirname -- "${BASH_SOURCE[0]}")/ab-lib.sh"
bench_policy "$RUN/tetherd.toml" "" 19402 19403
start_tetherd $REL/tetherd "$RUN/tetherd.toml" "$RUN/s.sock" "$RUN/state" "$RUN/tetherd.log" || { echo "tetherd did not start"; exit 1; }
shim() { echo "LD_PRELOAD=$1 TETHER_SOCKET=$RUN/s.sock TETHER_MODE=userspace"; }
$REL/bench-server --port 19401 >/dev/null 2>&1 & P1=$!
env $(shim $BASE) $REL/bench-server --port 19402 >/dev/null 2>&1 & P2=$!
env $(shim $REL/libtether.so) $REL/bench-server --port 19403 >/dev/null 2>&1 & P3=$!
sleep 0.5
cpu() { awk '{print $14+$15}' /proc/$1/stat; }
for r in $(seq $ROUNDS); do
  for v in plain base new; do
    case $v in plain) port=19401 pre="X=1" sp=$P1;; base) port=19402 pre=$(shim $BASE) sp=$P2;; new) port=19403 pre=$(shim $REL/libtether.so) sp=$P3;; esac
    s0=$(cpu $sp)
    out=$( { /usr/bin/env $pre perf stat -x, -e task-clock $REL/bench-client --port $port bulk --bytes $BYTES; } 2>&1 )
    s1=$(cpu $sp)
    mib=$(echo "$out" | grep -o '"mib_s":[0-9.]*' | cut -d: -f2)
    ccpu=$(echo "$out" | grep task-clock | cut -d, -f1)
    echo "$v $mib client_cpu_ms=${ccpu%.*} server_cpu_ms=$(( (s1 - s0) * 10 ))"
  done
done
kill $P1 $P2 $P3 $TD; wait 2>/dev/null
rm -rf $RUN
