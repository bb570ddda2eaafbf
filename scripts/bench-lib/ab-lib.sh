# Shared by the A/B and profiling scripts of this folder (custody-ab, ktls-ab, relay-ab, relay-prof,
# accept-ab); scripts/bench's own part.sh writes its policy itself. Source it.

# bench_policy FILE CUSTODY PORT...: a tetherd config for trust domain bench.internal with
# mutual inbound and outbound rules on 127.0.0.1:PORT... ; CUSTODY is broker, process or "" (the
# default, broker).
bench_policy() {
    local file=$1 custody=$2 p ports="" to=""
    shift 2
    for p in "$@"; do
        ports+="${ports:+, }$p"
        to+="${to:+, }\"127.0.0.1/32:$p\""
    done
    {
        echo 'trust_domain = "bench.internal"'
        echo 'unmatched = "derive"'
        [[ -n $custody ]] && echo "key_custody = \"$custody\""
        echo '[[inbound]]'
        echo "ports = [$ports]"
        echo 'allow = ["spiffe://bench.internal/*"]'
        echo '[[outbound]]'
        echo "to = [$to]"
        echo 'allow = ["spiffe://bench.internal/*"]'
    } >"$file"
}

# start_tetherd TETHERD CONFIG SOCKET STATE_DIR LOG: tetherd in the background (its pid in TD),
# returning once SOCKET exists (up to 10 s; 1 if it never does).
start_tetherd() {
    TETHERD_LOG=warn "$1" --config "$2" --socket "$3" --state-dir "$4" 2>"$5" &
    TD=$!
    local i
    for i in $(seq 100); do [ -S "$3" ] && return 0; sleep 0.1; done
    return 1
}
