#!/usr/bin/env bash
# accept-ab: interleaved A/B of connection setup (issue 14, inline handshakes at accept), for
# work on preload/src/ops/inbound* (not part of scripts/bench).
#
#   scripts/bench-lib/accept-ab.sh BINS MODE N REPS OUT
#
# BINS holds base/release/ and new/release/ (tetherd, bench-server, bench-client, libtether.so),
# MODE is TETHER_MODE (userspace on the host, ktls in scripts/ktls-vm; BINS and OUT must then be
# outside /tmp). Per rep, base and new in alternating order: one bench-server, `connrate --n N`
# (JSON lines in OUT/connrate.jsonl, with the server's context switches and CPU per connection);
# then server syscalls per connection under strace -f -c ((120 - 20 connections) / 100, as
# scripts/bench does) in OUT/syscalls.jsonl, and how the new build's handshakes ended (at=).
set -u
(($# == 5)) || { sed -n "2,13s/^# \\{0,1\\}//p" "$0"; exit 2; }
B=$1 mode=$2 n=$3 reps=$4 out=$5
run=$(mktemp -d /tmp/tether-accept-ab.XXXXXX)
mkdir -p "$out"
port=19202
source "$(dirname -- "${BASH_SOURCE[0]}")/ab-lib.sh"
bench_policy "$run/tetherd.toml" broker $port
start_tetherd $B/base/release/tetherd "$run/tetherd.toml" "$run/t.sock" "$run/state" "$out/tetherd.log" || { echo "tetherd did not start"; exit 1; }
tpid=$TD
listening() { local hex; hex=$(printf ':%04X' "$1"); for i in $(seq 150); do
  awk -v p="$hex" '$4 == "0A" && substr($2, length($2) - 4) == p { f = 1 } END { exit !f }' /proc/net/tcp && return 0; sleep 0.1; done; return 1; }
gone() { local hex; hex=$(printf ':%04X' "$1"); while awk -v p="$hex" '$4 == "0A" && substr($2, length($2) - 4) == p { f = 1 } END { exit !f }' /proc/net/tcp; do sleep 0.1; done; }
envs() { echo "LD_PRELOAD=$B/$1/release/libtether.so TETHER_SOCKET=$run/t.sock TETHER_MODE=$mode TETHER_RESUMPTION=0 TETHER_LOG=$out/$1-$2.log"; }
# Context switches (voluntary + involuntary) of the server's live threads.
cs() { cat /proc/$1/task/*/status 2>/dev/null | awk '/ctxt_switches/ {s += $2} END {print s}'; }
for ((r = 1; r <= reps; r++)); do
  order="base new"; ((r % 2 == 0)) && order="new base"
  for b in $order; do
    read -r -a pre <<<"$(envs $b server)"; read -r -a cpre <<<"$(envs $b client)"
    env "${pre[@]}" $B/$b/release/bench-server --port $port >/dev/null 2>>"$out/stderr.log" &
    spid=$!
    listening $port
    env "${cpre[@]}" $B/$b/release/bench-client --port $port connrate --n 1 >/dev/null 2>>"$out/stderr.log"
    cs0=$(cs $spid); cpu0=$(awk '{print $14 + $15}' /proc/$spid/stat)
    j=$(env "${cpre[@]}" $B/$b/release/bench-client --port $port connrate --n "$n" 2>>"$out/stderr.log")
    cs1=$(cs $spid); cpu1=$(awk '{print $14 + $15}' /proc/$spid/stat)
    echo "{\"build\":\"$b\",\"rep\":$r,\"server_cswitch_per_conn\":$(( (cs1 - cs0) * 10 / n ))e-1,\"server_cpu_us_per_conn\":$(( (cpu1 - cpu0) * 10000 * 100 / n / 100 )),${j:1}" | tee -a "$out/connrate.jsonl"
    kill $spid; wait $spid 2>/dev/null; gone $port
  done
done
# syscalls per connection (server, strace -f -c, threads included): (N2 run - N1 run) / (N2 - N1)
if command -v strace >/dev/null; then
  for b in base new; do
    read -r -a pre <<<"$(envs $b server)"; read -r -a cpre <<<"$(envs $b client)"
    for k in 20 120; do
      strace -f -c -o "$out/strace-$b-$k.txt" env "${pre[@]}" $B/$b/release/bench-server --port $port >/dev/null 2>>"$out/stderr.log" &
      spid=$!
      listening $port
      env "${cpre[@]}" $B/$b/release/bench-client --port $port connrate --n $k >/dev/null 2>>"$out/stderr.log"
      kid=$(pgrep -P $spid | head -1); kill $kid; wait $spid 2>/dev/null; gone $port
    done
    a=$(awk '$NF == "total" {print $4}' "$out/strace-$b-20.txt"); c=$(awk '$NF == "total" {print $4}' "$out/strace-$b-120.txt")
    echo "{\"build\":\"$b\",\"server_syscalls_per_conn\":$(( (c - a) / 100 ))}" | tee -a "$out/syscalls.jsonl"
  done
fi
grep -ho 'at=[a-z]*' "$out"/new-server.log | sort | uniq -c | tee "$out/at.txt"
kill $tpid; wait $tpid 2>/dev/null
rm -rf "$run"
