# shellcheck shell=bash
# One half of scripts/bench: every configuration available on the running kernel, interleaved.
# Sourced by scripts/bench (which defines REPO_ROOT, TARGET_DIR, say, die, wait_socket)
# and called as: run_part ENV OUT QUICK
#   ENV   host | uml (what the results are labelled; uml adds the kTLS configurations)
#   OUT   directory for results.jsonl, meta.json and the shim logs (on the host's filesystem)
#   QUICK 1 for --quick sizes
#
# Configurations: plain, tether-ktls (uml), tether-user, stunnel, raw-ktls (uml), rustls (handshake
# floor: connection rate only); tether-ktls-pc (uml) and tether-user-pc: tether with
# key_custody = "process" (a second tetherd), connection rate only, beside the broker-custody
# default, to show the cost of tetherd signing each handshake. Each (configuration, repetition) gets fresh server, stunnel and
# redis processes, so the memory figures are per run. The order is reversed on every other
# repetition (A B C, C B A, ...) so a slow drift in background load hits all of them alike.

# Ports: the tether ones are the only ones tetherd protects.
readonly P_PLAIN=19101 P_TETHER=19102 P_RAWKTLS=19103 P_RUSTLS=19104
readonly P_ST_BACK=19105 P_ST_TLS=19106 P_ST_FRONT=19107
readonly R_PLAIN=19111 R_TETHER=19112 R_ST_BACK=19115 R_ST_TLS=19116 R_ST_FRONT=19117

run_part() {
    local env=$1 out=$2 quick=$3
    local rel=$TARGET_DIR/release
    local reps bulk_bytes conns redis_n file_mib
    if ((quick)); then
        reps=3 bulk_bytes=$((64 << 20)) conns=150 redis_n=3000 file_mib=32
    else
        reps=5 bulk_bytes=$((1 << 30)) conns=1000 redis_n=20000 file_mib=256
    fi
    if [[ $env == uml ]]; then
        # One CPU, generic C AES-GCM (~30 MiB/s) and ptrace'd syscalls: same shape, smaller sizes.
        if ((quick)); then
            bulk_bytes=$((8 << 20)) conns=30 redis_n=300 file_mib=8
        else
            # Ten configurations: at 5 x 256 MiB / 500 connections one part ran about an hour. 5 reps of
            # 64 MiB (interleaved, so the kTLS-vs-raw ratios keep their pairing) fit in ~20 min.
            bulk_bytes=$((64 << 20)) conns=200 redis_n=2000 file_mib=32
        fi
    fi
    local configs=(plain tether-user tether-user-pc tether-resumed stunnel rustls)
    # tether-ktls-padoff: tether kTLS with TETHER_KTLS_RX_NO_PAD=0 (bulk only), for the NO_PAD rows.
    # *-pc: process key custody (setup only), for the custody-cost rows. tether-resumed: setup only.
    [[ $env == uml ]] && configs=(plain tether-ktls tether-ktls-pc tether-ktls-padoff tether-user tether-user-pc tether-resumed raw-ktls stunnel rustls)

    local port
    for port in $P_PLAIN $P_TETHER $P_RAWKTLS $P_RUSTLS $P_ST_BACK $P_ST_TLS $P_ST_FRONT \
        $R_PLAIN $R_TETHER $R_ST_BACK $R_ST_TLS $R_ST_FRONT; do
        ! listening "$port" 1 || die "port $port is already in use (a leftover benchmark process?)"
    done
    mkdir -p "$out/logs"
    : >"$out/results.jsonl"
    RUN=$(mktemp -d /tmp/tether-bench.XXXXXX)
    PIDS=()
    trap 'part_cleanup' EXIT
    REL=$rel OUT=$out BENCH_ENV=$env

    cat >"$RUN/tetherd.toml" <<TOML
trust_domain = "bench.internal"
unmatched = "derive"
key_custody = "broker"
[[inbound]]
ports = [$P_TETHER, $R_TETHER]
allow = ["spiffe://bench.internal/*"]
[[outbound]]
to = ["127.0.0.1/32:$P_TETHER", "127.0.0.1/32:$R_TETHER"]
allow = ["spiffe://bench.internal/*"]
TOML
    SOCK=$RUN/tetherd.sock
    TETHERD_LOG=warn "$rel/tetherd" --config "$RUN/tetherd.toml" --socket "$SOCK" \
        --state-dir "$RUN/state" 2>"$out/logs/tetherd.log" &
    PIDS+=($!)
    wait_socket "$SOCK" || die "tetherd did not start (see $out/logs/tetherd.log)"
    # The same policy and CA, keys handed to the processes: the *-pc configurations.
    sed 's/^key_custody = "broker"/key_custody = "process"/' "$RUN/tetherd.toml" >"$RUN/tetherd-pc.toml"
    SOCK_PC=$RUN/tetherd-pc.sock
    TETHERD_LOG=warn "$rel/tetherd" --config "$RUN/tetherd-pc.toml" --socket "$SOCK_PC" \
        --state-dir "$RUN/state" 2>"$out/logs/tetherd-pc.log" &
    PIDS+=($!)
    wait_socket "$SOCK_PC" || die "tetherd (process custody) did not start (see $out/logs/tetherd-pc.log)"
    floor_svid
    write_stunnel_conf server
    write_stunnel_conf client
    head -c $((file_mib << 20)) /dev/urandom >"$RUN/payload"

    local r order c
    for ((r = 1; r <= reps; r++)); do
        order=("${configs[@]}")
        if ((r % 2 == 0)); then
            local rev=() i
            for ((i = ${#configs[@]} - 1; i >= 0; i--)); do rev+=("${configs[i]}"); done
            order=("${rev[@]}")
        fi
        for c in "${order[@]}"; do
            say "$env rep $r/$reps: $c"
            run_config "$env" "$c" "$r" "$bulk_bytes" "$conns" "$redis_n"
        done
    done
    # tether kTLS against the raw pair: the gap to judge is a few per cent and single UML bulk
    # runs swing by ±15 %, so many short paired rounds (the ratio is taken per round).
    [[ $env == uml ]] && ktls_pair_rounds "$env" $((quick ? 3 : 30)) $((quick ? 8 << 20 : 32 << 20))
    verify_stunnel
    if ((quick)) || [[ $env == uml ]]; then
        count_syscalls "$env" 10 40
    else
        count_syscalls "$env" 20 220
    fi
    for ((r = 1; r <= reps; r++)); do
        count_cpu "$env" "$r" $((conns * 4))
    done
    # tetherd's signing rate is a property of the host's cores (issue 11 budget: >= 20,000/s on 2).
    if [[ $env == host ]]; then
        for ((r = 1; r <= (reps < 3 ? reps : 3); r++)); do
            count_signing "$env" "$r" $((quick ? 2 : 5))
        done
    fi
    write_meta "$env" "$quick" "$reps" "$bulk_bytes" "$conns" "$redis_n" "$file_mib"
}

part_cleanup() {
    local p
    for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null || true; done
    for p in "${PIDS[@]}"; do wait "$p" 2>/dev/null || true; done
    rm -rf "$RUN"
}

# ROUNDS rounds of one bulk write() and one sendfile() of BYTES each through tether kTLS and
# the raw fixed-key kTLS pair, back to back (order swapped every round), each against its own
# server started once: records "pair_write"/"pair_sendfile" with rep = the round, so that
# report.py can take the tether / raw ratio within each round.
ktls_pair_rounds() { # ENV ROUNDS BYTES
    local env=$1 rounds=$2 bytes=$3 r c wl j pre=() spids=()
    read -r -a pre <<<"$(under tether-ktls server)"
    env "${pre[@]}" "$REL/bench-server" --port "$P_TETHER" >/dev/null 2>>"$OUT/logs/stderr.log" &
    spids+=($!)
    "$REL/bench-server" --port "$P_RAWKTLS" --ktls-fixed >/dev/null 2>>"$OUT/logs/stderr.log" &
    spids+=($!)
    PIDS+=("${spids[@]}")
    listening "$P_TETHER" && listening "$P_RAWKTLS" || die "kTLS pair rounds: a server did not listen"
    local order=(tether-ktls raw-ktls) client cpre=()
    read -r -a cpre <<<"$(under tether-ktls client)"
    local -a tether_client=(env "${cpre[@]}" "$REL/bench-client" --port "$P_TETHER")
    local -a raw_client=("$REL/bench-client" --port "$P_RAWKTLS" --ktls-fixed)
    for ((r = 1; r <= rounds; r++)); do
        say "$env kTLS pair round $r/$rounds"
        for wl in write sendfile; do
            for c in "${order[@]}"; do
                if [[ $c == raw-ktls ]]; then client=("${raw_client[@]}"); else client=("${tether_client[@]}"); fi
                if [[ $wl == write ]]; then
                    j=$(timeout 600 "${client[@]}" bulk --bytes "$bytes") || die "$c: pair write failed"
                else
                    j=$(timeout 600 "${client[@]}" bulk --bytes "$bytes" --sendfile "$RUN/payload") || die "$c: pair sendfile failed"
                fi
                emit "\"env\":\"$env\",\"config\":\"$c\",\"rep\":$r,\"workload\":\"pair_$wl\",${j:1:-1}"
            done
        done
        order=("${order[1]}" "${order[0]}")
    done
    for c in "${spids[@]}"; do stop_pid "$c"; done
}

# After the measured runs: 20 connections through the stunnel pair at log level info, to record
# that every handshake was a full one (no resumption) and the negotiated suite.
verify_stunnel() {
    local side p pids=()
    floor_svid
    "$REL/bench-server" --port "$P_ST_BACK" >/dev/null 2>>"$OUT/logs/stderr.log" &
    pids+=($!)
    for side in server client; do
        sed 's/^debug = warning/debug = info/' "$RUN/stunnel-$side.conf" >"$RUN/stunnel-$side-info.conf"
        : >"$RUN/stunnel-$side.log"
        stunnel4 "$RUN/stunnel-$side-info.conf" 2>>"$OUT/logs/stderr.log" &
        pids+=($!)
    done
    PIDS+=("${pids[@]}")
    listening "$P_ST_TLS" && listening "$P_ST_FRONT" && listening "$P_ST_BACK" &&
        "$REL/bench-client" --port "$P_ST_FRONT" connrate --n 20 >/dev/null
    for p in "${pids[@]}"; do stop_pid "$p"; done
}

write_stunnel_conf() { # server|client
    local side=$1 f=$RUN/stunnel-$1.conf
    {
        echo "foreground = yes"
        echo "pid ="
        # warning, not info: info logging costs stunnel ~30 ms per connection here.
        echo "debug = warning"
        echo "output = $RUN/stunnel-$side.log"
        echo "socket = l:TCP_NODELAY=1"
        echo "socket = r:TCP_NODELAY=1"
        local svc accept connect
        for svc in bench redis; do
            if [[ $side == server ]]; then
                [[ $svc == bench ]] && accept=$P_ST_TLS connect=$P_ST_BACK
                [[ $svc == redis ]] && accept=$R_ST_TLS connect=$R_ST_BACK
            else
                [[ $svc == bench ]] && accept=$P_ST_FRONT connect=$P_ST_TLS
                [[ $svc == redis ]] && accept=$R_ST_FRONT connect=$R_ST_TLS
            fi
            echo "[$svc]"
            [[ $side == client ]] && echo "client = yes"
            echo "accept = 127.0.0.1:$accept"
            echo "connect = 127.0.0.1:$connect"
            echo "cert = $RUN/svid/svid.pem"
            echo "key = $RUN/svid/svid.key"
            echo "CAfile = $RUN/svid/bundle.pem"
            echo "verifyChain = yes"
            echo "sslVersionMin = TLSv1.3"
            echo "sslVersionMax = TLSv1.3"
            echo "sessionResume = no"
            echo "TIMEOUTclose = 0"
        done
    } >"$f"
}

# Environment prefix for a program under the configuration: `env` arguments. tether-ktls and
# tether-user make full handshakes only (TETHER_RESUMPTION=0); tether-resumed has TLS 1.3
# resumption (the default) on the kernel's best path (kTLS in UML, the relay on the host),
# measured for connection setup only.
under() { # CONFIG ROLE
    case $1 in
    tether-ktls) echo "LD_PRELOAD=$REL/libtether.so TETHER_SOCKET=$SOCK TETHER_MODE=ktls TETHER_RESUMPTION=0 TETHER_LOG=$OUT/logs/$1-$2.log" ;;
    tether-user) echo "LD_PRELOAD=$REL/libtether.so TETHER_SOCKET=$SOCK TETHER_MODE=userspace TETHER_RESUMPTION=0 TETHER_LOG=$OUT/logs/$1-$2.log" ;;
    tether-ktls-padoff) echo "LD_PRELOAD=$REL/libtether.so TETHER_SOCKET=$SOCK TETHER_MODE=ktls TETHER_RESUMPTION=0 TETHER_KTLS_RX_NO_PAD=0 TETHER_LOG=$OUT/logs/$1-$2.log" ;;
    tether-ktls-pc) echo "LD_PRELOAD=$REL/libtether.so TETHER_SOCKET=$SOCK_PC TETHER_MODE=ktls TETHER_RESUMPTION=0 TETHER_LOG=$OUT/logs/$1-$2.log" ;;
    tether-user-pc) echo "LD_PRELOAD=$REL/libtether.so TETHER_SOCKET=$SOCK_PC TETHER_MODE=userspace TETHER_RESUMPTION=0 TETHER_LOG=$OUT/logs/$1-$2.log" ;;
    tether-resumed)
        local mode=userspace
        [[ ${BENCH_ENV:-host} == uml ]] && mode=ktls
        echo "LD_PRELOAD=$REL/libtether.so TETHER_SOCKET=$SOCK TETHER_MODE=$mode TETHER_LOG=$OUT/logs/$1-$2.log"
        ;;
    *) echo "BENCH_CONFIG=$1" ;;
    esac
}

# Wait (up to ~15 s) until 127.0.0.1:PORT is listening. Reads /proc/net/tcp only: the UML guest
# has no /proc/net/tcp6, and a probe connection would cost a failed handshake on tether ports.
listening() { # PORT [TRIES]
    local hex i
    hex=$(printf ':%04X' "$1")
    for i in $(seq "${2:-150}"); do
        awk -v p="$hex" '$4 == "0A" && substr($2, length($2) - 4) == p { found = 1 } END { exit !found }' \
            /proc/net/tcp && return 0
        sleep 0.1
    done
    return 1
}

status_kib() { # PID FIELD -> KiB (0 if gone)
    awk -v f="$2:" '$1 == f {print $2; found=1} END {if (!found) print 0}' "/proc/$1/status" 2>/dev/null || echo 0
}

emit() { # JSON object fields (without braces)
    echo "{$1}" >>"$OUT/results.jsonl"
}

start_bg() { # LOGNAME CMD... ; sets BG_PID
    "$@" >"$RUN/$1.out" 2>>"$OUT/logs/stderr.log" &
    BG_PID=$!
    PIDS+=("$BG_PID")
}

stop_pid() {
    kill "$1" 2>/dev/null || true
    wait "$1" 2>/dev/null || true
}

# The SVID the in-process rustls floor and stunnel run with, fetched afresh before each of their
# runs (written atomically): it lives svid_ttl (10 min by default), and a UML part outlasts that
# (on one EPYC host its count_cpu step met an expired certificate).
floor_svid() {
    "$REL/tether" svid --socket "$SOCK" --out "$RUN/svid" >>"$OUT/logs/svid.txt"
}

run_config() { # ENV CONFIG REP BULK CONNS REDIS_N
    local env=$1 c=$2 rep=$3 bulk=$4 conns=$5 redis_n=$6
    local port srv_flags=() cli_flags=() pids_server=() pids_client=() tag
    tag="\"env\":\"$env\",\"config\":\"$c\",\"rep\":$rep"
    local -a pre
    read -r -a pre <<<"$(under "$c" server)"
    case $c in
    plain | tether-*) port=$P_PLAIN; [[ $c == tether-* ]] && port=$P_TETHER ;;
    raw-ktls) port=$P_RAWKTLS srv_flags=(--ktls-fixed) cli_flags=(--ktls-fixed) ;;
    rustls) port=$P_RUSTLS srv_flags=(--rustls "$RUN/svid") cli_flags=(--rustls "$RUN/svid") ;;
    stunnel) port=$P_ST_BACK ;;
    esac
    [[ $c == rustls || $c == stunnel ]] && floor_svid
    # Server side.
    env "${pre[@]}" "$REL/bench-server" --port "$port" "${srv_flags[@]}" >"$RUN/server.out" 2>>"$OUT/logs/stderr.log" &
    local spid=$!
    PIDS+=("$spid")
    pids_server+=("$spid")
    if [[ $c == stunnel ]]; then
        stunnel4 "$RUN/stunnel-server.conf" 2>>"$OUT/logs/stderr.log" &
        pids_server+=($!) && PIDS+=($!)
        stunnel4 "$RUN/stunnel-client.conf" 2>>"$OUT/logs/stderr.log" &
        pids_client+=($!) && PIDS+=($!)
        listening "$P_ST_TLS" || die "stunnel server did not listen"
        listening "$P_ST_FRONT" || die "stunnel client did not listen"
        port=$P_ST_FRONT
    fi
    listening "$port" || die "$c: server did not listen on $port"
    kill -0 "$spid" 2>/dev/null || die "$c: bench-server exited (see $OUT/logs/stderr.log)"

    local -a cpre
    read -r -a cpre <<<"$(under "$c" client)"
    local client=(env "${cpre[@]}" timeout 600 "$REL/bench-client" --port "$port" "${cli_flags[@]}")
    local j
    # Connection rate first, on fresh processes in every configuration: the custody (*-pc) and
    # resumption (tether-resumed) rows run no bulk transfer, and a comparison with rows measured
    # after 2 GiB of bulk in the same processes was not like with like (until 2026-12-07 it put
    # the broker-custody row 84 µs above process custody where paired runs measured 34-46 µs).
    if [[ $c != tether-ktls-padoff ]]; then
        j=$("${client[@]}" connrate --n "$conns") || die "$c: connrate failed"
        emit "$tag,\"workload\":\"connrate\",${j:1:-1}"
    fi
    # Bulk write, bulk sendfile (the custody comparison (*-pc) and tether-resumed are about
    # setup only). Where the kernel
    # has kTLS, the /proc/net/tls_stat counters each transfer moved are recorded with it.
    # The rustls floor runs write() only (sendfile does not apply to a userspace TLS library): the
    # relay's bulk cost judged against in-process TLS on the same machine.
    if [[ $c != *-pc && $c != tether-resumed ]]; then
        local wl before wls=(write sendfile)
        [[ $c == rustls ]] && wls=(write)
        for wl in "${wls[@]}"; do
            before=$(tls_stat)
            if [[ $wl == write ]]; then
                j=$("${client[@]}" bulk --bytes "$bulk") || die "$c: bulk write failed"
            else
                j=$("${client[@]}" bulk --bytes "$bulk" --sendfile "$RUN/payload") || die "$c: bulk sendfile failed"
            fi
            emit "$tag,\"workload\":\"$wl\",${j:1:-1}$(tls_stat_delta "$before" "$(tls_stat)")"
        done
    fi
    if [[ $c == tether-ktls-padoff ]]; then
        local p
        for p in "${pids_client[@]}" "${pids_server[@]}"; do stop_pid "$p"; done
        return 0
    fi
    # Memory: the bench-server (+ server stunnel) and the write client (+ client stunnel).
    local p srv_hwm=0 srv_rss=0 st_cli_hwm=0 st_cli_rss=0
    for p in "${pids_server[@]}"; do
        srv_hwm=$((srv_hwm + $(status_kib "$p" VmHWM))) srv_rss=$((srv_rss + $(status_kib "$p" VmRSS)))
    done
    for p in "${pids_client[@]}"; do
        st_cli_hwm=$((st_cli_hwm + $(status_kib "$p" VmHWM))) st_cli_rss=$((st_cli_rss + $(status_kib "$p" VmRSS)))
    done
    emit "$tag,\"workload\":\"memory\",\"server_hwm_kib\":$srv_hwm,\"server_rss_kib\":$srv_rss,\"sidecar_client_hwm_kib\":$st_cli_hwm,\"sidecar_client_rss_kib\":$st_cli_rss"

    # redis: both sides under the configuration (not for the raw kTLS pair or the rustls floor).
    if [[ $c == plain || $c == tether-ktls || $c == tether-user || $c == stunnel ]]; then
        local rport=$R_PLAIN rfront
        [[ $c == tether-* ]] && rport=$R_TETHER
        [[ $c == stunnel ]] && rport=$R_ST_BACK
        rfront=$rport
        [[ $c == stunnel ]] && rfront=$R_ST_FRONT
        env "${pre[@]}" redis-server --port "$rport" --bind 127.0.0.1 --save '' --appendonly no \
            --protected-mode no --daemonize no --logfile '' >/dev/null 2>>"$OUT/logs/stderr.log" &
        local rpid=$!
        PIDS+=("$rpid")
        listening "$rport" || die "redis-server did not listen"
        local csv
        csv=$(env "${cpre[@]}" timeout 600 redis-benchmark -p "$rfront" -t set,get -n "$redis_n" -c 1 --csv) ||
            die "$c: redis-benchmark failed"
        local name rps p50 p99
        while IFS=, read -r name rps _ _ p50 _ p99 _; do
            name=${name//\"/}
            [[ $name == SET || $name == GET ]] || continue
            emit "$tag,\"workload\":\"redis_${name,,}\",\"rps\":${rps//\"/},\"p50_ms\":${p50//\"/},\"p99_ms\":${p99//\"/}"
        done <<<"$csv"
        stop_pid "$rpid"
    fi
    for p in "${pids_client[@]}" "${pids_server[@]}"; do stop_pid "$p"; done
}

# /proc/net/tls_stat as "Name value" lines (empty without kTLS).
tls_stat() {
    [[ -r /proc/net/tls_stat ]] && cat /proc/net/tls_stat || true
}

# JSON fields (with a leading comma) for the counters that moved between two tls_stat snapshots:
# ,"tls_stat":{"TlsRxSw":2,...}; nothing when the kernel has no kTLS.
tls_stat_delta() { # BEFORE AFTER
    [[ -n $1 && -n $2 ]] || return 0
    awk 'NR == FNR { b[$1] = $2; next } { d = $2 - b[$1]; if (d != 0) { printf "%s\"%s\":%d", sep, $1, d; sep = "," } }
        BEGIN { printf ",\"tls_stat\":{" } END { printf "}" }' <(echo "$1") <(echo "$2")
}

# The setup configurations of ENV, into the caller's `cfgs`.
setup_configs() { # ENV
    cfgs=(plain tether-user tether-resumed rustls)
    [[ $1 == uml ]] && cfgs=(plain tether-ktls tether-user tether-resumed rustls)
    return 0
}

# For CONFIG: the caller's `port` and `flags` (bench-server/bench-client arguments) and `pre`/`cpre`
# (server/client environment).
setup_target() { # CONFIG
    port=$P_PLAIN flags=()
    [[ $1 == tether-* ]] && port=$P_TETHER
    if [[ $1 == rustls ]]; then
        port=$P_RUSTLS flags=(--rustls "$RUN/svid")
        floor_svid
    fi
    read -r -a pre <<<"$(under "$1" server)"
    read -r -a cpre <<<"$(under "$1" client)"
}

# Syscalls per connection, client and server (strace -f -c, threads included), for the setup
# configurations: the difference between a run of N1 and one of N2 sequential connections,
# divided by N2 - N1, so process start-up and the SVID fetch cancel out. Not timed.
count_syscalls() { # ENV N1 N2
    local env=$1 n1=$2 n2=$3 c n port flags spid kid
    command -v strace >/dev/null || { say "no strace: syscall counts skipped"; return 0; }
    local cfgs
    setup_configs "$env"
    for c in "${cfgs[@]}"; do
        say "$env syscalls: $c"
        local -a pre cpre
        setup_target "$c"
        for n in "$n1" "$n2"; do
            strace -f -c -o "$RUN/sys-srv-$c-$n" env "${pre[@]}" "$REL/bench-server" --port "$port" "${flags[@]}" \
                >/dev/null 2>>"$OUT/logs/stderr.log" &
            spid=$!
            PIDS+=("$spid")
            listening "$port" || { say "syscalls $c: server did not listen; counts skipped"; return 0; }
            strace -f -c -o "$RUN/sys-cli-$c-$n" env "${cpre[@]}" "$REL/bench-client" --port "$port" "${flags[@]}" \
                connrate --n "$n" >/dev/null 2>>"$OUT/logs/stderr.log" || { say "syscalls $c: connrate under strace failed; counts skipped"; return 0; }
            # Stop the traced server (strace's child) so strace writes its summary.
            kid=$(pgrep -P "$spid" | head -1 || true)
            [[ -n $kid ]] && kill "$kid" 2>/dev/null
            wait "$spid" 2>/dev/null || true
            while listening "$port" 1; do sleep 0.1; done
        done
        calls() { awk '$NF == "total" {print $4}' "$1"; }
        local f
        for f in "$RUN/sys-cli-$c-$n1" "$RUN/sys-srv-$c-$n1" "$RUN/sys-cli-$c-$n2" "$RUN/sys-srv-$c-$n2"; do
            [[ $(calls "$f") =~ ^[0-9]+$ ]] || { say "syscalls $c: no strace summary in ${f##*/}; counts skipped"; return 0; }
        done
        emit "\"env\":\"$env\",\"config\":\"$c\",\"rep\":0,\"workload\":\"syscalls\",\"n1\":$n1,\"n2\":$n2,\"client_per_conn\":$(( ($(calls "$RUN/sys-cli-$c-$n2") - $(calls "$RUN/sys-cli-$c-$n1")) * 10 / (n2 - n1) ))e-1,\"server_per_conn\":$(( ($(calls "$RUN/sys-srv-$c-$n2") - $(calls "$RUN/sys-srv-$c-$n1")) * 10 / (n2 - n1) ))e-1"
        for n in "$n1" "$n2"; do
            cp "$RUN/sys-cli-$c-$n" "$OUT/logs/strace-client-$c-$n.txt"
            cp "$RUN/sys-srv-$c-$n" "$OUT/logs/strace-server-$c-$n.txt"
        done
    done
}

# CPU time per connection (user + system, client and server processes, all threads) over N
# sequential connections: unlike latency, it does not depend on how busy the machine is.
count_cpu() { # ENV REP N
    local env=$1 rep=$2 n=$3 c port flags spid s0 s1 ct tick
    tick=$(getconf CLK_TCK)
    local cfgs
    setup_configs "$env"
    for c in "${cfgs[@]}"; do
        local -a pre cpre
        setup_target "$c"
        env "${pre[@]}" "$REL/bench-server" --port "$port" "${flags[@]}" >/dev/null 2>>"$OUT/logs/stderr.log" &
        spid=$!
        PIDS+=("$spid")
        listening "$port" || { say "cpu $c: server did not listen; skipped"; return 0; }
        # One warm-up connection (SVID fetch, first full handshake) outside the count.
        env "${cpre[@]}" "$REL/bench-client" --port "$port" "${flags[@]}" connrate --n 1 >/dev/null 2>>"$OUT/logs/stderr.log" || true
        s0=$(awk '{print $14 + $15}' "/proc/$spid/stat")
        ct=$({ TIMEFORMAT='%U %S'; time env "${cpre[@]}" "$REL/bench-client" --port "$port" "${flags[@]}" \
            connrate --n "$n" >/dev/null 2>>"$OUT/logs/stderr.log"; } 2>&1 | tail -1) ||
            { say "cpu $c: connrate failed (see $OUT/logs/stderr.log): $(tail -n 3 "$OUT/logs/stderr.log" | tr '\n' ' ')"; stop_pid "$spid"; return 1; }
        s1=$(awk '{print $14 + $15}' "/proc/$spid/stat")
        stop_pid "$spid"
        while listening "$port" 1; do sleep 0.1; done
        emit "\"env\":\"$env\",\"config\":\"$c\",\"rep\":$rep,\"workload\":\"cpu\",\"n\":$n,$(awk -v n="$n" '{printf "\"client_cpu_us\":%.1f", ($1 + $2) * 1e6 / n}' <<<"$ct"),\"server_cpu_us\":$(( (s1 - s0) * 1000000 / tick / n ))"
    done
}

# Broker key custody: CertificateVerify signatures per second from the part's tetherd (one
# `tether bench-sign` process, 1/8/64 threads each on its own connection, every request attested),
# and with a new connection per signature as the shim makes them (1 client).
count_signing() { # ENV REP SECONDS
    local env=$1 rep=$2 secs=$3 n fresh line fields
    for n in 1 8 64 fresh; do
        fresh=()
        if [[ $n == fresh ]]; then fresh=(--fresh) n=1; fi
        say "$env rep $rep: tetherd signatures, $n client(s)${fresh[0]:+, a new connection each}"
        line=$("$REL/tether" bench-sign --socket "$SOCK" --clients "$n" --seconds "$secs" "${fresh[@]}" 2>>"$OUT/logs/stderr.log") ||
            { say "bench-sign failed (see $OUT/logs/stderr.log); skipped"; return 0; }
        echo "$line" >>"$OUT/logs/bench-sign.txt"
        fields=$(sed -n 's/.*signatures=\([0-9]*\) errors=\([0-9]*\) rate=\([0-9]*\)\/s p50=\([0-9]*\)us p99=\([0-9]*\)us.*/"signatures":\1,"errors":\2,"rate":\3,"p50_us":\4,"p99_us":\5/p' <<<"$line")
        [[ -n $fields ]] || { say "bench-sign printed no figures: $line; skipped"; return 0; }
        emit "\"env\":\"$env\",\"config\":\"tetherd\",\"rep\":$rep,\"workload\":\"signing\",\"clients\":$n,\"fresh\":$([[ ${#fresh[@]} -gt 0 ]] && echo true || echo false),$fields"
    done
}

write_meta() { # ENV QUICK REPS BULK CONNS REDIS_N FILE_MIB
    local env=$1 f
    # Modes and ciphers the shim reported, per log file.
    local modes=""
    for f in "$OUT"/logs/tether-*.log; do
        [[ -f $f ]] || continue
        modes+=$(printf '"%s": {"modes": "%s", "detail": "%s"},' "$(basename "$f" .log)" \
            "$(grep -o 'mode=[a-z]*\|rx_no_pad=[a-z]*' "$f" | sort | uniq -c | awk '{printf "%s×%s ", $2, $1}')" \
            "$(grep -o 'detail=[^ ]*' "$f" | sort | uniq -c | awk '{printf "%s×%s ", $2, $1}' | tr -d '"')")
    done
    local st_new st_reused
    st_new=$(grep -c 'TLS connected: new session' "$RUN/stunnel-client.log" 2>/dev/null || true)
    st_reused=$(grep -c 'TLS connected: previous session reused' "$RUN/stunnel-client.log" 2>/dev/null || true)
    local st_cipher
    st_cipher=$(grep -o 'TLSv1.3 ciphersuite: [A-Z0-9_]*' "$RUN/stunnel-client.log" 2>/dev/null | sort | uniq -c | head -1 | awk '{print $4}' || true)
    cp "$RUN/stunnel-client.log" "$OUT/logs/" 2>/dev/null || true
    cat >"$OUT/meta.json" <<JSON
{"env": "$env", "quick": $2, "reps": $3, "bulk_bytes": $4, "conns": $5, "redis_n": $6, "sendfile_file_mib": $7,
 "kernel": "$(uname -r)", "nproc": $(nproc), "cpu": "$(awk -F': ' '/model name/ {print $2; exit}' /proc/cpuinfo)",
 "aes_ni_flag": $(grep -qw aes /proc/cpuinfo && echo true || echo false),
 "gcm_driver": "$(awk -F': *' '/^name/ {n=$2} /^driver/ && n=="gcm(aes)" {print $2; exit}' /proc/crypto)",
 "loadavg_end": "$(cut -d' ' -f1-3 /proc/loadavg)",
 "shim_logs": {${modes%,}},
 "stunnel": {"verify_conns": 20, "new_sessions": ${st_new:-0}, "resumed": ${st_reused:-0}, "cipher": "${st_cipher:-?}", "version": "$(stunnel4 -version 2>&1 | awk '/^stunnel/ {print $2; exit}')"},
 "rustls_floor_cipher": "rustls ring default (TLS13_AES_256_GCM_SHA384, X25519)"}
JSON
}
