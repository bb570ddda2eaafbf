# Shared helpers for scripts/*: sourced, not run.
# shellcheck shell=bash

REPO_ROOT=$(cd -- "$(dirname -- "${BASH_SOURCE[0]}")/../.." && pwd -P)
export REPO_ROOT
TARGET_DIR=${CARGO_TARGET_DIR:-$REPO_ROOT/target}
export TARGET_DIR

say() { printf '\033[1m==> %s\033[0m\n' "$*" >&2; }
die() { printf 'error: %s\n' "$*" >&2; exit 1; }

_apt_updated=0
# ensure_pkgs CMD:PKG ...  installs PKG with apt-get when CMD is not on PATH (or PKG is a path that is missing).
ensure_pkgs() {
    local want=() spec cmd pkg
    for spec in "$@"; do
        cmd=${spec%%:*}
        pkg=${spec#*:}
        if [[ $cmd == /* ]]; then
            [[ -e $cmd ]] || want+=("$pkg")
        else
            command -v "$cmd" >/dev/null 2>&1 || want+=("$pkg")
        fi
    done
    ((${#want[@]})) || return 0
    [[ $(id -u) == 0 ]] || die "missing packages (${want[*]}); run as root or install them"
    say "installing ${want[*]}"
    if ((!_apt_updated)); then
        DEBIAN_FRONTEND=noninteractive apt-get update -qq >/dev/null
        _apt_updated=1
    fi
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${want[@]}" >/dev/null
}

# A Rust toolchain: the machine's rustup one, else Debian's (which may be too old for rustls).
ensure_rust() {
    if ! command -v cargo >/dev/null 2>&1 && [[ -x $HOME/.cargo/bin/cargo ]]; then
        export PATH=$HOME/.cargo/bin:$PATH
    fi
    ensure_pkgs cargo:cargo cc:gcc
    local v
    v=$(rustc --version | awk '{print $2}')
    if [[ $(printf '%s\n1.80.0\n' "$v" | sort -V | head -1) != 1.80.0 ]]; then
        die "rustc $v is too old: tether needs Rust >= 1.80 (install it with rustup)"
    fi
}

# Build the workspace (dev profile: our crates debuggable, dependencies optimised).
# `build_workspace strict` also builds tests and benches and fails on any warning (scripts/test).
build_workspace() {
    local log args=(--workspace)
    [[ ${1:-} == strict ]] && args+=(--all-targets)
    say "cargo build ${args[*]}"
    log=$(mktemp)
    if ! (cd "$REPO_ROOT" && cargo build "${args[@]}" --color never) >"$log" 2>&1; then
        cat "$log" >&2
        rm -f "$log"
        die "build failed"
    fi
    if [[ ${1:-} == strict ]] && grep -q '^warning' "$log"; then
        cat "$log" >&2
        rm -f "$log"
        die "the build has warnings"
    fi
    rm -f "$log"
}

# Wait until a Unix socket exists (up to ~10 s).
wait_socket() {
    local i
    for i in $(seq 100); do
        [[ -S $1 ]] && return 0
        sleep 0.1
    done
    return 1
}

# Wait until something listens on TCP PORT (up to ~15 s). Reads /proc/net/tcp{,6} rather than
# connecting, so a protected server does not log a probe as a failed handshake.
wait_port() {
    local hex i
    hex=$(printf ':%04X' "$1")
    local tables=()
    for t in /proc/net/tcp /proc/net/tcp6; do
        [[ -r $t ]] && tables+=("$t") # a kernel without IPv6 (User-Mode Linux here) has no tcp6
    done
    for i in $(seq 150); do
        awk -v p="$hex" '$4 == "0A" && substr($2, length($2) - 4) == p { found = 1 } END { exit !found }' \
            "${tables[@]}" && return 0
        sleep 0.1
    done
    return 1
}
