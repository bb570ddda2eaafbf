# The User-Mode Linux kernels scripts/ktls-vm boots: where each comes from, fetching and caching
# them, and telling "this kernel does not boot on this CPU" apart from other failures.
# Sourced (by scripts/ktls-vm, scripts/test and scripts/lib/uml-kernels.test), not run.
# shellcheck shell=bash disable=SC2034 # UML_* results are read by the scripts that source this
#
# Kernels, newest first (`--kernel auto` tries them in this order):
#   7.2  Debian sid's user-mode-linux 7.2um1 (kernel 7.2.7). Boots on every x86 host of the pool,
#        including Intel hosts with AVX-512/AMX. It needs GLIBC_2.38, so it is fetched with sid's
#        libc6 into a private cache and its ELF interpreter and rpath are pointed at that libc
#        (patchelf). Nothing is installed into the system or put into a system path.
#   6.1  Debian bookworm's user-mode-linux (apt-get install, /usr/bin/linux.uml). Panics at init on
#        AVX-512/AMX Intel hosts ("userspace - ptrace set fp regs failed, errno = 14").
#
# Verification: fetched packages come from apt with a private sources list, lists dir and cache
# (the host's apt configuration is never read for sources and never changed). apt checks the
# InRelease signature against the Debian archive keyring and each .deb against the signed hashes.
#
# Callers provide die() (exits) and REPO_ROOT; tests may set UML_CPUINFO (default /proc/cpuinfo).

# KTLS_VM_KERNELS="A B" replaces the list (the harness tests use fake kernels' paths).
read -r -a UML_KERNELS <<<"${KTLS_VM_KERNELS:-7.2 6.1}"
readonly UML_SID_MIRROR=http://deb.debian.org/debian
readonly UML_KEYRING=/usr/share/keyrings/debian-archive-keyring.gpg

# The cache directory: /var/cache/tether/uml for root, else target/uml-kernels of this checkout
# ($KTLS_VM_CACHE overrides both; the tests use that).
uml_cache_dir() {
    if [[ -n ${KTLS_VM_CACHE:-} ]]; then
        echo "$KTLS_VM_CACHE"
    elif ((EUID == 0)); then
        echo /var/cache/tether/uml
    else
        echo "${CARGO_TARGET_DIR:-$REPO_ROOT/target}/uml-kernels"
    fi
}

# The host CPU in one line: model name, plus the FPU features that matter to UML.
uml_cpu_desc() {
    local info=${UML_CPUINFO:-/proc/cpuinfo} model flags extra=()
    model=$(awk -F': *' '/^model name/ { print $2; exit }' "$info" 2>/dev/null)
    flags=" $(awk -F': *' '/^flags/ { print $2; exit }' "$info" 2>/dev/null) "
    [[ $flags == *" avx512f "* ]] && extra+=(AVX-512)
    [[ $flags == *" amx_tile "* ]] && extra+=(AMX)
    if ((${#extra[@]})); then
        echo "${model:-unknown CPU} with ${extra[*]}"
    else
        echo "${model:-unknown CPU}"
    fi
}

# uml_cpu_problem LOG KERNEL: when UML's log shows the known "does not boot on this CPU" failure,
# print a one-line reason naming it and return 0; else return 1 (print nothing).
uml_cpu_problem() {
    local log=$1 kernel=$2 sig
    sig=$(grep -m1 -aoE 'userspace - ptrace (set|get) fp regs failed, errno = [0-9]+' "$log" 2>/dev/null) ||
        return 1
    echo "UML kernel $kernel does not boot on this CPU ($(uml_cpu_desc)): it panics at init with" \
        "\"$sig\" (this UML cannot pass the CPU's large XSAVE state, AVX-512/AMX, through ptrace);" \
        "use --kernel auto (or --kernel ${UML_KERNELS[0]})"
}

# The key of a boot verdict: the CPU model and flags, and the kernel binary's version.
uml_verdict_file() { # KERNEL_VERSION
    local key
    key=$(printf '%s\n%s\n' "$(uml_cpu_desc)" "$1" | sha256sum | cut -c1-16)
    echo "$(uml_cache_dir)/verdicts/$key"
}

# uml_record_verdict KERNEL_VERSION VERDICT: "boots" or "does not boot: REASON" (atomic write).
uml_record_verdict() {
    local f tmp
    f=$(uml_verdict_file "$1")
    mkdir -p "$(dirname -- "$f")" || die "cannot create $(dirname -- "$f")"
    tmp=$(mktemp "$f.XXXXXX") || die "mktemp $f failed"
    if ! { echo "$2" >"$tmp" && mv -f -- "$tmp" "$f"; }; then
        rm -f -- "$tmp"
        die "cannot write $f"
    fi
}

# uml_loud LINE...: a banner nobody scrolls past (stderr).
uml_loud() {
    local bar='!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!'
    printf '%s\n' "$bar" >&2
    printf '!!! %s\n' "$@" >&2
    printf '%s\n' "$bar" >&2
}

# uml_boot_matrix KTLS_VM: boot-check every kernel of UML_KERNELS with KTLS_VM (scripts/ktls-vm).
# Sets UML_BOOTED (the kernels that boot, newest first) and UML_LEFT_OUT ("K: reason" for each that
# does not boot on this CPU, each announced with a banner). Returns 0 when some kernel boots, 1 when
# none does (banner), 2 when a boot check failed for another reason (nothing may be skipped then).
uml_boot_matrix() {
    local vm=$1 k rc why err
    UML_BOOTED=()
    UML_LEFT_OUT=()
    err=$(mktemp) || return 2
    for k in "${UML_KERNELS[@]}"; do
        rc=0
        "$vm" --kernel "$k" --boot-check 2>"$err" || rc=$?
        cat "$err" >&2
        case $rc in
        0) UML_BOOTED+=("$k") ;;
        3)
            why=$(sed -n 's/^ktls-vm: \(.*does not boot on this CPU.*\)/\1/p' "$err" | head -n1)
            UML_LEFT_OUT+=("$k: ${why:-does not boot on this CPU}")
            uml_loud "LEFT OUT: UML kernel $k does not boot on this CPU; its tests do NOT run on this host." \
                "${why:-does not boot on this CPU}"
            ;;
        *)
            echo "boot check of UML kernel $k failed (exit $rc), and not because of this CPU: nothing is skipped" >&2
            rm -f "$err"
            return 2
            ;;
        esac
    done
    rm -f "$err"
    if ((${#UML_BOOTED[@]} == 0)); then
        uml_loud "NO UML kernel boots on this CPU ($(uml_cpu_desc)): kTLS cannot be tested here." "${UML_LEFT_OUT[@]}"
        return 1
    fi
}

# uml_resolve SPEC: set UML_BIN (the kernel binary), UML_MODDIR (its modules) and UML_VERSION
# (e.g. 7.2.7) for SPEC = a version from UML_KERNELS or the path of a linux.uml binary (its modules
# are looked up in ../lib/uml/modules/VERSION beside it, else /usr/lib/uml/modules/VERSION).
# Fetches or installs the kernel when needed. Calls die on failure.
uml_resolve() {
    local spec=$1
    case $spec in
    6.1)
        if ! command -v linux.uml >/dev/null 2>&1; then
            uml_apt_install user-mode-linux
        fi
        UML_BIN=$(command -v linux.uml) || die "linux.uml not found even after installing user-mode-linux"
        ;;
    */*)
        [[ -f $spec && -x $spec ]] || die "--kernel $spec: not an executable file"
        UML_BIN=$(cd -- "$(dirname -- "$spec")" && pwd -P)/$(basename -- "$spec")
        ;;
    [0-9]*.[0-9]*)
        UML_BIN=$(uml_fetch_sid "$spec")/usr/bin/linux.uml || exit $?
        ;;
    *) die "--kernel $spec: expected auto, one of ${UML_KERNELS[*]}, or the path of a linux.uml" ;;
    esac
    UML_VERSION=$("$UML_BIN" --version 2>/dev/null | head -n1) || true
    [[ $UML_VERSION =~ ^[0-9]+\.[0-9]+ ]] || die "$UML_BIN --version printed '$UML_VERSION', not a kernel version"
    if [[ $spec != */* && $UML_VERSION != "$spec" && $UML_VERSION != "$spec".* ]]; then
        die "--kernel $spec: $UML_BIN is kernel $UML_VERSION"
    fi
    local d
    for d in "$(dirname -- "$UML_BIN")/../lib/uml/modules/$UML_VERSION" "/usr/lib/uml/modules/$UML_VERSION"; do
        if [[ -f $d/kernel/net/tls/tls.ko ]]; then
            UML_MODDIR=$(cd -- "$d" && pwd -P) # read by scripts/ktls-vm
            return 0
        fi
    done
    die "no UML modules with tls.ko for kernel $UML_VERSION (looked beside $UML_BIN and in /usr/lib/uml/modules)"
}

uml_apt_install() {
    ((EUID == 0)) || die "missing package $*: run as root or install it (apt-get install $*)"
    echo "ktls-vm: installing $* (apt-get)" >&2
    local opts=(-y -qq --no-install-recommends)
    if ! DEBIAN_FRONTEND=noninteractive apt-get install "${opts[@]}" "$@" >&2; then
        apt-get update -qq >&2 || die "apt-get update failed"
        DEBIAN_FRONTEND=noninteractive apt-get install "${opts[@]}" "$@" >&2 || die "apt-get install $* failed"
    fi
}

# uml_fetch_sid VERSION: print the root of an unpacked, patched user-mode-linux VERSIONum* from
# Debian sid (cached; fetched once). The tree holds usr/bin/linux.uml (interpreter and rpath point
# at the tree's own sid libc6), usr/lib/uml/modules/KVER and SOURCE (what was fetched, sha256s).
uml_fetch_sid() {
    local want=$1 cache root
    cache=$(uml_cache_dir)
    for root in "$cache"/user-mode-linux_"$want"um*; do
        [[ -f $root/SOURCE && -x $root/usr/bin/linux.uml ]] && { echo "$root"; return 0; }
    done
    command -v patchelf >/dev/null 2>&1 || uml_apt_install patchelf
    [[ -f $UML_KEYRING ]] || uml_apt_install debian-archive-keyring
    mkdir -p "$cache" || die "cannot create $cache"
    (
        # One fetch at a time per cache (another run may be fetching the same kernel).
        exec 9>"$cache/.lock"
        flock -w 600 9 || die "timed out waiting for $cache/.lock"
        for root in "$cache"/user-mode-linux_"$want"um*; do
            [[ -f $root/SOURCE && -x $root/usr/bin/linux.uml ]] && { echo "$root"; exit 0; }
        done
        uml_fetch_sid_locked "$want" "$cache"
    )
}

uml_fetch_sid_locked() {
    local want=$1 cache=$2 work apt
    work=$(mktemp -d "$cache/.fetch.XXXXXX") || die "mktemp in $cache failed"
    # shellcheck disable=SC2064 # expand now: the trap runs in this subshell only
    trap "rm -rf -- '$work'" EXIT
    apt=$work/apt
    chmod 0755 "$work"
    mkdir -p "$apt/lists/partial" "$apt/cache/archives/partial" "$apt/empty.d" "$work/debs" "$work/root"
    # Only the Packages index (no translations, DEP-11 or Contents).
    echo "deb [signed-by=$UML_KEYRING] $UML_SID_MIRROR sid main" >"$apt/sources.list"
    local o=(-o "Dir::Etc::SourceList=$apt/sources.list" -o "Dir::Etc::SourceParts=$apt/empty.d"
        -o "Dir::State::Lists=$apt/lists" -o "Dir::Cache=$apt/cache"
        -o Dir::Etc::Preferences=/dev/null -o "Dir::Etc::PreferencesParts=$apt/empty.d"
        -o Acquire::Languages=none -o APT::Get::List-Cleanup=false -q
        -o Acquire::IndexTargets::deb::DEP-11::DefaultEnabled=false
        -o Acquire::IndexTargets::deb::DEP-11-icons::DefaultEnabled=false
        -o Acquire::IndexTargets::deb::DEP-11-icons-small::DefaultEnabled=false
        -o Acquire::IndexTargets::deb::DEP-11-icons-hidpi::DefaultEnabled=false)
    # apt drops to _apt to download: let it write into the private dirs.
    if ((EUID == 0)) && id _apt >/dev/null 2>&1; then
        chown -R _apt "$apt/lists" "$apt/cache" "$work/debs"
    fi
    echo "ktls-vm: fetching Debian sid's user-mode-linux $want and libc6 into $cache (apt, signed Release)" >&2
    apt-get "${o[@]}" --error-on=any update >&2 || die "apt-get update of Debian sid failed (network? signature?)"
    local uml_ver libc_ver
    uml_ver=$(apt-cache "${o[@]}" show --no-all-versions user-mode-linux 2>/dev/null | awk '/^Version:/ { print $2; exit }')
    libc_ver=$(apt-cache "${o[@]}" show --no-all-versions libc6 2>/dev/null | awk '/^Version:/ { print $2; exit }')
    [[ -n $uml_ver && -n $libc_ver ]] || die "Debian sid lists have no user-mode-linux or libc6"
    [[ $uml_ver == "$want"um* ]] ||
        die "Debian sid now has user-mode-linux $uml_ver, not $want: update UML_KERNELS in scripts/lib/uml-kernels.sh"
    (cd "$work/debs" && apt-get "${o[@]}" download "user-mode-linux=$uml_ver" "libc6=$libc_ver" >&2) ||
        die "apt-get download of user-mode-linux $uml_ver / libc6 $libc_ver failed"
    local deb
    for deb in "$work"/debs/*.deb; do
        dpkg-deb -x "$deb" "$work/root" || die "dpkg-deb -x $deb failed"
    done
    local root=$work/root libdir=$work/root/usr/lib/x86_64-linux-gnu
    local final=$cache/user-mode-linux_$uml_ver
    [[ -x $root/usr/bin/linux.uml && -x $libdir/ld-linux-x86-64.so.2 ]] ||
        die "the sid packages lack usr/bin/linux.uml or ld-linux-x86-64.so.2"
    # Point the kernel at the libc in its final place (the tree is renamed there below).
    patchelf --set-interpreter "$final/usr/lib/x86_64-linux-gnu/ld-linux-x86-64.so.2" \
        --set-rpath "$final/usr/lib/x86_64-linux-gnu" "$root/usr/bin/linux.uml" ||
        die "patchelf on linux.uml failed"
    {
        echo "fetched $(date -u +%FT%TZ) from $UML_SID_MIRROR sid (InRelease verified with $UML_KEYRING)"
        echo "user-mode-linux $uml_ver, libc6 $libc_ver"
        (cd "$work/debs" && sha256sum -- *.deb)
    } >"$root/SOURCE"
    rm -rf -- "$final"
    mv -T -- "$root" "$final" || die "cannot move the kernel into $final"
    "$final/usr/bin/linux.uml" --version >/dev/null 2>&1 || die "$final/usr/bin/linux.uml does not run after patchelf"
    echo "$final"
}
