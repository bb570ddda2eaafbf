# fleet-spire.sh: scripts/test-fleet's SPIRE mode (sourced; uses test-fleet's helpers).
#
# One spire-server in the switch namespace (10.250.1.254:8081, join_token node attestor,
# sqlite datastore), one spire-agent per host a and b (unix workload attestor with
# discover_workload_path, admin socket, authorized_delegates = tetherd's ID, disk key manager so
# a restarted agent keeps its node SVID), and tetherd with [upstream] kind = "spire" on each.
# Registration entries give the workloads the same IDs the standalone mode derives, so the
# policies are the same.

readonly SPIRE_SERVER_IP=10.250.1.254 SPIRE_PORT=8081
readonly SPIRE_SVID_TTL=${TETHER_FLEET_SPIRE_SVID_TTL:-60}
SP=$T/spire
declare -A AGENT_PID=()

spire_admin_socket() { echo "$SP/$1/admin/admin.sock"; }
spire_server() { "$SPIRE_BIN/spire-server" "$@" -socketPath "$SP/server/api.sock"; }

start_spire_server() {
    mkdir -p "$SP/server/data"
    cat >"$SP/server/server.conf" <<HCL
server {
    bind_address = "$SPIRE_SERVER_IP"
    bind_port = "$SPIRE_PORT"
    socket_path = "$SP/server/api.sock"
    trust_domain = "$TD"
    data_dir = "$SP/server/data"
    log_level = "DEBUG"
    ca_ttl = "24h"
    default_x509_svid_ttl = "${SPIRE_SVID_TTL}s"
}
plugins {
    DataStore "sql" {
        plugin_data {
            database_type = "sqlite3"
            connection_string = "$SP/server/data/datastore.sqlite3"
        }
    }
    NodeAttestor "join_token" { plugin_data {} }
    KeyManager "memory" { plugin_data {} }
}
HCL
    bg sw "$SPIRE_BIN/spire-server" run -config "$SP/server/server.conf" >>"$T/logs/spire-server.log" 2>&1
    SPIRE_SERVER_PID=$BG
    PIDS+=("$BG")
    local i
    for ((i = 0; i < 600; i++)); do
        spire_server healthcheck >/dev/null 2>&1 && return 0
        kill -0 "$SPIRE_SERVER_PID" 2>/dev/null || break
        sleep 0.1
    done
    tail -20 "$T/logs/spire-server.log" >&2
    echo "test-fleet: spire-server did not become healthy" >&2
    exit 2
}

# write_agent_conf HOST: config, trust bundle and a one-time join token for HOST's agent.
write_agent_conf() {
    local h=$1 d=$SP/$1 token
    mkdir -p "$d/data" "$d/public" "$d/admin"
    spire_server bundle show >"$d/bootstrap.pem"
    token=$(spire_server token generate -spiffeID "spiffe://$TD/host/$h" | awk '/^Token:/ { print $2 }')
    [[ -n $token ]] || { echo "test-fleet: no join token for $h" >&2; exit 2; }
    cat >"$d/agent.conf" <<HCL
agent {
    data_dir = "$d/data"
    log_level = "DEBUG"
    server_address = "$SPIRE_SERVER_IP"
    server_port = "$SPIRE_PORT"
    socket_path = "$d/public/api.sock"
    # Not in (or under) the Workload API socket's directory: the agent refuses that.
    admin_socket_path = "$d/admin/admin.sock"
    authorized_delegates = ["spiffe://$TD/tetherd"]
    trust_bundle_path = "$d/bootstrap.pem"
    trust_domain = "$TD"
    join_token = "$token"
}
plugins {
    NodeAttestor "join_token" { plugin_data {} }
    KeyManager "disk" { plugin_data { directory = "$d/data" } }
    WorkloadAttestor "unix" { plugin_data { discover_workload_path = true } }
}
HCL
}

start_agent() {
    local h=$1 d=$SP/$1
    rm -f "$d/admin/admin.sock" "$d/public/api.sock"
    bg "$h" "$SPIRE_BIN/spire-agent" run -config "$d/agent.conf" >>"$T/logs/$h-spire-agent.log" 2>&1
    AGENT_PID[$h]=$BG
    PIDS+=("$BG")
    local i
    for ((i = 0; i < 600; i++)); do
        [[ -S $d/admin/admin.sock ]] && "$SPIRE_BIN/spire-agent" healthcheck -socketPath "$d/public/api.sock" >/dev/null 2>&1 && return 0
        kill -0 "${AGENT_PID[$h]}" 2>/dev/null || break
        sleep 0.1
    done
    tail -20 "$T/logs/$h-spire-agent.log" >&2
    echo "test-fleet: spire-agent on $h did not become healthy" >&2
    exit 2
}

# entry HOST SPIFFE_ID SELECTOR|-federatesWith=TD...: a registration entry under HOST's node;
# prints its ID.
entry() {
    local h=$1 id=$2 args=()
    shift 2
    for s in "$@"; do
        case $s in
        -federatesWith=*) args+=(-federatesWith "${s#-federatesWith=}") ;;
        *) args+=(-selector "$s") ;;
        esac
    done
    spire_server entry create -parentID "spiffe://$TD/host/$h" -spiffeID "$id" -x509SVIDTTL "$SPIRE_SVID_TTL" "${args[@]}" \
        | awk '/^Entry ID/ { print $NF }'
}

# until_ok SECONDS CMD...: retry CMD every 0.5 s until it succeeds; the time taken in WAITED.
until_ok() {
    local limit=$1 t0
    shift
    t0=$(date +%s.%N)
    while :; do
        if "$@"; then
            WAITED=$(python3 -c "print(f'{$(date +%s.%N)-$t0:.1f}')")
            return 0
        fi
        (($(date +%s) - ${t0%.*} >= limit)) && return 1
        sleep 0.5
    done
}
curl_ok() { shimmed a "curl-$1" curl -sS --fail --max-time 10 -o /dev/null "http://${IP[b]}:8080/$MARKER.bin" 2>>"$T/logs/a-curl-$1.err"; }
curl_refused() { ! curl_ok "$1"; }

run_spire() {
    local L=spire t_spire
    t_spire=$(date +%s)
    FLEET_MODE=spire
    in_ns sw ip addr add "$SPIRE_SERVER_IP/24" dev br0
    start_spire_server
    local py redis_cli psql nginx redis_server postgres tetherd
    tetherd=$(readlink -f "$BIN/tetherd")
    # The interpreter itself (python3 on PATH may be a wrapper script, e.g. pyenv's shim).
    py=$(python3 -c 'import os, sys; print(os.path.realpath(sys.executable))')
    redis_cli=$(readlink -f "$(command -v redis-cli)")
    redis_server=$(readlink -f "$(command -v redis-server)")
    nginx=$(readlink -f "$(command -v nginx)")
    psql=$(readlink -f "$PG_BIN/psql")
    postgres=$(readlink -f "$PG_BIN/postgres")
    local pg_uid
    pg_uid=$(id -u postgres)
    for h in a b; do
        write_agent_conf "$h"
        entry "$h" "spiffe://$TD/tetherd" unix:uid:0 "unix:path:$tetherd" >/dev/null
    done
    CURL_ENTRY=$(entry a "$ID_CURL" unix:uid:0 unix:path:/usr/bin/curl)
    entry a "$ID_REDIS_CLI" unix:uid:0 "unix:path:$redis_cli" >/dev/null
    entry a "$ID_PSQL" unix:uid:0 "unix:path:$psql" >/dev/null
    entry a "spiffe://$TD/python" unix:uid:0 "unix:path:$py" >/dev/null
    NGINX_ENTRY=$(entry b "spiffe://$TD/nginx" unix:uid:0 "unix:path:$nginx")
    entry b "spiffe://$TD/redis" unix:uid:0 "unix:path:$redis_server" >/dev/null
    entry b "spiffe://$TD/postgres" "unix:uid:$pg_uid" "unix:path:$postgres" >/dev/null
    [[ -n $CURL_ENTRY ]] || { echo "test-fleet: could not create the SPIRE entries" >&2; exit 2; }
    for h in a b; do start_agent "$h"; done
    for h in a b; do start_tetherd "$h"; done
    make_file
    start_nginx
    # The agents sync entries from the server every few seconds: wait for curl's first SVID.
    if until_ok 60 curl_ok first; then
        pass "$L: first SVIDs from the SPIRE agents after ${WAITED}s"
    else
        fail "$L: no working curl -> nginx within 60 s: $(tail -3 "$T/logs/a-curl-first.err"); tetherd a: $(tail -3 "$T/logs/a-tetherd.log")"
    fi
    check_curl $L
    start_redis
    check_redis $L
    start_postgres
    check_psql $L
    check_refused $L
    if log_has a-tetherd 'SVID from the SPIRE agent'; then
        pass "$L: tetherd on a took the SVIDs from its SPIRE agent"
    else
        fail "$L: tetherd on a logged no SVID from the SPIRE agent"
    fi
    # The pidfd rule: each finished client's subscription ended with its process.
    local ended
    ended=$(grep -c "process exited; SPIRE subscription ended" "$T/logs/a-tetherd.log" || true)
    if ((${ended:-0} >= 3)); then
        pass "$L: tetherd on a ended $ended subscriptions when their processes exited (pidfd readable)"
    else
        fail "$L: tetherd on a ended ${ended:-0} subscriptions on process exit (want >= 3: curl, redis-cli, psql)"
    fi

    # 6. Agent restart: established connections untouched, new ones fail closed while it is
    #    down, and work again once it is back, with the same tetherd.
    local tetherd_a=${TETHERD_PID[a]} slow=$T/a/slow.out
    shimmed a curl-slow curl -sS --fail --max-time 120 --limit-rate 2M -o "$slow" "http://${IP[b]}:8080/$MARKER.bin" 2>"$T/logs/a-curl-slow.err" &
    local slow_pid=$!
    # Established means body bytes arrived: under load curl's first SVID (a SPIRE delegate
    # fetch) can take longer than any fixed sleep, and the agent must stop only after it.
    slow_started() { [[ -s $slow ]] || ! kill -0 "$slow_pid" 2>/dev/null; }
    if ! until_ok 60 slow_started || ! [[ -s $slow ]]; then
        fail "$L: the slow transfer never started: $(cat "$T/logs/a-curl-slow.err")"
    fi
    stop_pid "${AGENT_PID[a]}"
    if curl_refused down; then
        pass "$L: with a's agent down, a new curl connection is refused (fails closed)"
    else
        fail "$L: a new connection succeeded with a's agent down"
    fi
    if log_has a-tetherd "SPIRE agent unavailable"; then
        pass "$L: tetherd on a says why: $(grep -o 'SPIRE agent unavailable[^"]*' "$T/logs/a-tetherd.log" | tail -1 | cut -c1-160)"
    else
        fail "$L: tetherd on a did not log the agent as unavailable"
    fi
    start_agent a
    if until_ok 60 curl_ok back; then
        pass "$L: a new curl connection works ${WAITED}s after the agent restart"
    else
        fail "$L: no new connection within 60 s of the agent restart: $(tail -3 "$T/logs/a-curl-back.err")"
    fi
    if [[ ${TETHERD_PID[a]} == "$tetherd_a" ]] && kill -0 "$tetherd_a" 2>/dev/null; then
        pass "$L: ... with the same tetherd (pid $tetherd_a, not restarted)"
    else
        fail "$L: tetherd on a was restarted or died"
    fi
    if wait "$slow_pid" && cmp -s "$slow" "$file"; then
        pass "$L: the transfer running across the agent restart completed intact"
    else
        fail "$L: the transfer across the agent restart broke: $(cat "$T/logs/a-curl-slow.err")"
    fi

    # 7. Another trust domain: host c runs a standalone tetherd of other.test (its own root,
    #    SPIRE's bundle as its federated bundle). b's policy allows c's curl by ID, so only the
    #    trust domain can refuse it: refused until SPIRE federates nginx's entry with other.test.
    ca init --out "$T/rootx" --trust-domain "$TD_FOREIGN"
    ca intermediate --host c --root "$T/rootx" --out "$T/c/cax" --ttl 1h
    cat >"$T/c/extra.toml" <<TOML
unmatched = "derive"
ca_cert = "$T/c/cax/intermediate.pem"
ca_key = "$T/c/cax/intermediate.key"
ca_bundle = "$T/c/cax/bundle.pem"
federated_bundles = { "$TD" = "$SP/a/bootstrap.pem" }
TOML
    TETHERD_TD=$TD_FOREIGN TETHERD_EXTRA_CONF=$T/c/extra.toml start_tetherd c
    c_curl() { shimmed c "curl-$1" curl -sS --fail --max-time 10 -o /dev/null "http://${IP[b]}:8080/$MARKER.bin" 2>>"$T/logs/c-curl-$1.err"; }
    if c_curl foreign; then
        fail "$L: c's curl ($ID_FOREIGN_CURL) was served although $TD_FOREIGN is not federated"
    else
        pass "$L: c's curl of trust domain $TD_FOREIGN is refused by b (not federated)"
    fi
    spire_server bundle set -format pem -id "spiffe://$TD_FOREIGN" -path "$T/rootx/root.pem" >/dev/null
    spire_server entry delete -entryID "$NGINX_ENTRY" >/dev/null
    NGINX_ENTRY=$(entry b "spiffe://$TD/nginx" unix:uid:0 "unix:path:$nginx" "-federatesWith=spiffe://$TD_FOREIGN")
    # nginx takes the federated bundle with a new SVID: restart it until b's agent has synced.
    fed_ok() { stop_nginx; start_nginx; c_curl federated; }
    if until_ok 90 fed_ok; then
        pass "$L: once nginx's SPIRE entry federates with $TD_FOREIGN, c's curl is served (${WAITED}s)"
    else
        fail "$L: c's curl still refused 90 s after federating: $(tail -2 "$T/logs/c-curl-federated.err")"
    fi

    # 7b. exec keeps the pid and the start time: python3 (its own SPIRE identity, refused by b)
    #     execs curl in the same process, which must be asked about again and get curl's ID.
    local code="import os, urllib.request
try:
    urllib.request.urlopen('http://${IP[b]}:8080/$MARKER.bin', timeout=10).read(1)
except Exception:
    pass
os.execv('/usr/bin/curl', ['curl', '-sS', '--fail', '--max-time', '10', '-o', '/dev/null', 'http://${IP[b]}:8080/$MARKER.bin'])"
    if shimmed a exec python3 -c "$code" 2>"$T/logs/a-exec.err" && log_has a-tetherd "process changed since its SPIRE subscription"; then
        pass "$L: python3 exec'ing curl (same pid) is re-attested by SPIRE and served as curl"
    else
        fail "$L: after python3 exec'd curl: $(tail -2 "$T/logs/a-exec.err"); $(tail -2 "$T/logs/a-exec.log")"
    fi

    # 8. (last) The curl entry deleted at runtime: new curl connections stop within one SVID TTL,
    #    and so do a curl that was already running (its key, held by tetherd under broker
    #    custody, stops signing once the agent withdraws the identity: no wait for the SVID to
    #    expire). a's other workloads keep their identities. The running curl makes a new
    #    connection (full handshake: TETHER_RESUMPTION=0, a resumed one signs nothing) 4 times a
    #    second and prints each status on stderr: 404 = served over mTLS, 000 = refused.
    local urls=() i running_pid
    for i in $(seq 400); do urls+=("http://${IP[b]}:8080/running-$i"); done
    # shellcheck disable=SC2046 # reason: shim_env prints words without spaces
    bg a env $(shim_env a curl-running) TETHER_RESUMPTION=0 curl -s --rate 4/s -H 'Connection: close' \
        --max-time 5 -o /dev/null -w '%{stderr}%{http_code}\n' "${urls[@]}" 2>"$T/logs/a-curl-running.codes"
    running_pid=$BG
    until_ok 20 grep -q '^404$' "$T/logs/a-curl-running.codes" ||
        fail "$L: the running curl never got through before the deletion: $(tail -3 "$T/logs/a-curl-running.codes")"
    local served_before
    served_before=$(grep -c '^404$' "$T/logs/a-curl-running.codes" || true)
    spire_server entry delete -entryID "$CURL_ENTRY" >/dev/null
    running_refused() { tail -n +"$((served_before + 1))" "$T/logs/a-curl-running.codes" | grep -q '^000$'; }
    # Within a quarter of the SVID TTL: before the key could simply expire (the agent serves
    # SVIDs with at least half their TTL left), so this fails without the withdrawal.
    if until_ok $((SPIRE_SVID_TTL / 4)) running_refused && kill -0 "$running_pid" 2>/dev/null; then
        pass "$L: the curl already running when its entry was deleted (same process) is refused ${WAITED}s after the deletion"
    else
        fail "$L: the running curl kept connecting after its entry was deleted: $(tail -3 "$T/logs/a-curl-running.codes")"
    fi
    if log_has a-tetherd "withdrew this process's identity"; then
        pass "$L: tetherd on a destroyed the running curl's key (identity withdrawn by SPIRE)"
    else
        fail "$L: tetherd on a did not log the withdrawn identity"
    fi
    kill "$running_pid" 2>/dev/null || true
    if until_ok "$SPIRE_SVID_TTL" curl_refused deleted; then
        pass "$L: curl's entry deleted: its new connections refused after ${WAITED}s (SVID TTL ${SPIRE_SVID_TTL}s)"
    else
        fail "$L: curl still connects ${SPIRE_SVID_TTL}s after its entry was deleted"
    fi
    if log_has a-tetherd "no identity"; then
        pass "$L: tetherd on a refused curl: no identity from SPIRE"
    else
        fail "$L: tetherd on a did not log curl's missing identity"
    fi
    local get_out
    get_out=$(shimmed a redis-cli redis-cli -h "${IP[b]}" -p 6379 GET fleet-key 2>&1 || true)
    if [[ $get_out == "$MARKER" ]]; then
        pass "$L: redis-cli on a (entry kept) still connects"
    else
        fail "$L: redis-cli on a stopped working after curl's entry was deleted: $get_out"
    fi
    echo "test-fleet: SPIRE mode took $(($(date +%s) - t_spire))s"
}
