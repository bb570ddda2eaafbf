#!/usr/bin/env bash
# ktls-ab: interleaved A/B of tether's kTLS bulk data path against the raw fixed-key kTLS pair,
# inside one UML boot (for work on preload/src/ops/io.rs and sys/ktls.rs; not part of
# scripts/bench, whose ratios stay there).
#
#   scripts/ktls-vm --kernel 7.2 --mem 1G --timeout 3000 -- \
#       scripts/bench-lib/ktls-ab.sh REL BASE_LIB BYTES ROUNDS [OUT]
#
# REL is a release target dir (tetherd, bench-server, bench-client, libtether.so = "new");
# BASE_LIB another libtether.so ("base", e.g. a copy built from the parent commit). Each round
# runs raw, base and new (order rotated every round) for write() and sendfile(), each against
# its own bench-server (started once), and prints "WORKLOAD CONFIG MiB/s". Then one transfer of
# each under `strace -f -c` (client and server) gives syscalls per MiB; OUT (default /tmp)
# receives the strace summaries.
set -u
(($# >= 4)) || { sed -n "2,14s/^# \\{0,1\\}//p" "$0"; exit 2; }
REL=$1 BASE=$2 BYTES=$3 ROUNDS=$4 OUT=${5:-/tmp}
RUN=$(mktemp -d /tmp/tether-ktls-ab.XXXXXX)
source "$(dirname -- "${BASH_SOURCE[0]}")/ab-lib.sh"
bench_policy "$RUN/tetherd.toml" "" 19502 19503
start_tetherd "$REL/tetherd" "$RUN/tetherd.toml" "$RUN/s.sock" "$RUN/state" "$RUN/tetherd.log" || { echo "tetherd did not start"; exit 1; }
head -c $((64 << 20)) /dev/urandom >$RUN/payload
shim() { echo "LD_PRELOAD=$1 TETHER_SOCKET=$RUN/s.sock TETHER_MODE=ktls TETHER_RESUMPTION=0"; }
pre_of() { case $1 in raw) echo "X=1" ;; base) shim $BASE ;; new) shim $REL/libtether.so ;; esac; }
port_of() { case $1 in raw) echo 19501 ;; base) echo 19502 ;; new) echo 19503 ;; esac; }
flag_of() { [[ $1 == raw ]] && echo --ktls-fixed; }
start_servers() { # [strace prefix...]
    PIDS=()
    local c
    for c in raw base new; do
        "$@" env $(pre_of $c) $REL/bench-server --port $(port_of $c) $(flag_of $c) >/dev/null 2>>$RUN/server.err &
        PIDS+=($!)
    done
    sleep 1
}
client() { # CONFIG WORKLOAD [strace prefix...]
    local c=$1 wl=$2 sf=()
    shift 2
    [[ $wl == sendfile ]] && sf=(--sendfile $RUN/payload)
    "$@" env $(pre_of $c) $REL/bench-client --port $(port_of $c) $(flag_of $c) bulk --bytes $BYTES "${sf[@]}"
}
echo "kernel $(uname -r) loadavg(host view) $(cut -d' ' -f1-3 /proc/loadavg) bytes $BYTES rounds $ROUNDS"
start_servers
order=(raw base new)
for r in $(seq $ROUNDS); do
    for wl in write sendfile; do
        for c in "${order[@]}"; do
            mib=$(client $c $wl 2>>$RUN/client.err | grep -o '"mib_s":[0-9.]*' | cut -d: -f2)
            echo "$wl $c ${mib:-FAIL}"
        done
    done
    order=("${order[1]}" "${order[2]}" "${order[0]}")
done
kill "${PIDS[@]}" 2>/dev/null; wait "${PIDS[@]}" 2>/dev/null
# Syscalls: one transfer per (config, workload), client and server traced (threads included).
if command -v strace >/dev/null; then
    for c in raw base new; do
        for wl in write sendfile; do
            strace -f -c -o $OUT/ktls-ab-srv-$c-$wl.txt env $(pre_of $c) $REL/bench-server --port $(port_of $c) \
                $(flag_of $c) >/dev/null 2>>$RUN/server.err &
            sp=$!
            sleep 1
            client $c $wl strace -f -c -o $OUT/ktls-ab-cli-$c-$wl.txt >/dev/null 2>>$RUN/client.err
            pkill -P $sp 2>/dev/null; wait $sp 2>/dev/null
            for side in cli srv; do
                echo "syscalls $wl $c $side $(awk '$NF == "total" {print $4}' $OUT/ktls-ab-$side-$c-$wl.txt)" \
                    "read-family $(awk '$NF ~ /^(read|recvfrom|recvmsg)$/ {s += $4} END {print s + 0}' $OUT/ktls-ab-$side-$c-$wl.txt)"
            done
        done
    done
fi
grep -h . $RUN/client.err $RUN/server.err 2>/dev/null | sort | uniq -c | head -5
cat /proc/net/tls_stat 2>/dev/null | grep -E 'NoPad|DecryptErr|Rekey' | tr '\n' ' '
echo
kill $TD; wait 2>/dev/null
rm -rf $RUN
