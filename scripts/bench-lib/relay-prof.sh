#!/usr/bin/env bash
# relay-prof: where the userspace relay's CPU goes (issue 14), for one libtether.so on this host.
#
#   scripts/bench-lib/relay-prof.sh REL LIB OUTDIR bulk|setup stat|record|strace [BYTES|N]
#
# REL is a release target dir (tetherd, tether, bench-server, bench-client); LIB a libtether.so, or
# "floor" (setup only: bench-client/bench-server --rustls, the in-process rustls floor). bulk: one
# `bench-client bulk` of BYTES (default 512 MiB); setup: N (default 1000) sequential connrate
# connections, process key custody, no resumption (the issue-14 setup row). stat: perf stat per
# thread (context switches, task-clock, syscall counts); record: perf record -g of client and
# server (then `relay-prof.sh --cat FILE.data HZ`); strace: strace -f -c (200 connections).
#   scripts/bench-lib/relay-prof.sh --cat FILE.data [HZ]   # samples by thread and category, in ms
# Not part of scripts/bench; numbers it gave are in ARCHITECTURE.md "Relay throughput".
set -u
if [[ ${1:-} == --cat ]]; then
    hz=${3:-2000}
    perf report -i "$2" -n --no-children --sort comm,dso,sym --stdio -g none 2>/dev/null | grep -v '^#' | grep '%' | awk -v hz="$hz" '
    { n = $2; comm = $3; dso = $4; sym = $NF; c = "other-user"
      if (sym ~ /aes_gcm|gcm_|ghash|aes_hw|ring::aead|Tls13Message/) c = "crypto"
      else if (sym ~ /_copy_to_iter|_copy_from_iter|copy_page_|copy_user|rep_movs/) c = "kernel-copy"
      else if (sym ~ /memmove|memcpy/) c = "user-memcpy"
      else if (sym ~ /_raw_spin_unlock_irq|finish_task_switch|__schedule|try_to_wake_up/) c = "kernel-wake/sched"
      else if (dso ~ /kernel/) c = "other-kernel"
      ms = n / hz * 1000; tot[comm] += ms; cat[comm " " c] += ms }
    END { for (k in cat) printf "%-34s %8.1f ms\n", k, cat[k]; for (k in tot) printf "TOTAL %-28s %8.1f ms\n", k, tot[k] }' | sort
    exit 0
fi
(($# >= 5)) || { sed -n "2,14s/^# \\{0,1\\}//p" "$0"; exit 2; }
REL=$1 LIB=$2 OUT=$3 WORK=$4 MODE=$5 SIZE=${6:-}
mkdir -p "$OUT"
RUN=$(mktemp -d /tmp/tether-relay-prof.XXXXXX)
PORT=19442
source "$(dirname -- "${BASH_SOURCE[0]}")/ab-lib.sh"
bench_policy "$RUN/tetherd.toml" process $PORT
start_tetherd "$REL/tetherd" "$RUN/tetherd.toml" "$RUN/s.sock" "$RUN/state" "$RUN/tetherd.log" || { echo "tetherd did not start"; exit 1; }
E="LD_PRELOAD=$LIB TETHER_SOCKET=$RUN/s.sock TETHER_MODE=userspace TETHER_RESUMPTION=0" F=""
if [[ $LIB == floor ]]; then
    "$REL/tether" svid --socket "$RUN/s.sock" --out "$RUN/svid" >/dev/null
    E="X=1" F="--rustls $RUN/svid"
fi
# shellcheck disable=SC2086
env $E "$REL/bench-server" --port $PORT $F >/dev/null 2>&1 &
SP=$!
sleep 0.5
case $WORK in
bulk) work=(bulk --bytes "${SIZE:-$((1 << 29))}") warm=(bulk --bytes 1048576) ;;
setup) work=(connrate --n "${SIZE:-1000}") warm=(connrate --n 20) ;;
*) echo "unknown workload $WORK" >&2; exit 2 ;;
esac
[[ $MODE == strace && $WORK == setup ]] && work=(connrate --n 200)
# shellcheck disable=SC2086
env $E "$REL/bench-client" --port $PORT $F "${warm[@]}" >/dev/null
EV=context-switches,task-clock,syscalls:sys_enter_recvfrom,syscalls:sys_enter_sendto,syscalls:sys_enter_sendmsg,syscalls:sys_enter_epoll_wait
# shellcheck disable=SC2086
case $MODE in
stat)
    perf stat -e $EV --per-thread -p $SP -o "$OUT/$WORK-server.stat" & PR=$!
    sleep 0.3
    env $E perf stat -e $EV -o "$OUT/$WORK-client.stat" "$REL/bench-client" --port $PORT $F "${work[@]}"
    kill -INT $PR; wait $PR ;;
record)
    perf record -F 2000 -g -o "$OUT/$WORK-server.data" -p $SP 2>/dev/null & PR=$!
    sleep 0.3
    env $E perf record -F 2000 -g -o "$OUT/$WORK-client.data" "$REL/bench-client" --port $PORT $F "${work[@]}"
    kill -INT $PR; wait $PR ;;
strace)
    strace -f -c -p $SP -o "$OUT/$WORK-server.strace" & ST=$!
    sleep 0.5
    strace -f -c -o "$OUT/$WORK-client.strace" env $E "$REL/bench-client" --port $PORT $F "${work[@]}"
    kill -INT $ST; wait $ST ;;
*) echo "unknown mode $MODE" >&2 ;;
esac
kill $SP $TD
wait 2>/dev/null
rm -rf "$RUN"
