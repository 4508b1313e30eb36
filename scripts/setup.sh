#!/usr/bin/env bash
# Prepare this machine and the repository for hybrid: Debian packages, kernel
# headers for bcc, tracefs/debugfs/bpffs mounts, the .venv with hybrid
# installed in editable mode, and Debian's bcc module inside the venv.
#
# Idempotent: every step checks first and does nothing when already done, so
# a second run is quick and silent apart from a final "ready" line.
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.."

PACKAGES=(python3-bpfcc bpfcc-tools linux-headers-amd64 clang llvm bpftool libbpf-dev gcc make systemtap-sdt-dev)
PYTHON=${PYTHON:-python3}
VENV=.venv
STAMP=$VENV/.stamp
BCC_SRC=/usr/lib/python3/dist-packages/bcc

log() { echo "setup: $*"; }
warn() { echo "setup: warning: $*" >&2; }
die() { echo "setup: error: $*" >&2; exit 1; }

is_root() { [ "$(id -u)" -eq 0 ]; }

is_mounted() { awk -v d="$1" '$2 == d { found = 1 } END { exit !found }' /proc/self/mounts; }

# --- 1. Debian packages --------------------------------------------------
missing=()
for pkg in "${PACKAGES[@]}"; do
    status=$(dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null || true)
    [ "$status" = "install ok installed" ] || missing+=("$pkg")
done
if [ ${#missing[@]} -gt 0 ]; then
    is_root || die "missing Debian packages: ${missing[*]} (run as root, or: apt-get install ${missing[*]})"
    log "installing ${missing[*]}"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    apt-get install -y -qq "${missing[@]}" >/dev/null
fi

# --- 2. kernel headers where bcc looks for them -----------------------------
# The running kernel has no headers package; bcc compiles fine against
# Debian's (older) linux-headers-amd64.  Like Debian's own /lib/modules/<v>,
# `build` points at the arch directory and `source` at the -common one (bcc
# needs both: include/linux/kconfig.h lives in -common).
kdir=/lib/modules/$(uname -r)
if [ ! -e "$kdir/build" ] || [ ! -e "$kdir/source" ]; then
    headers=$(find /usr/src -maxdepth 1 -type d -name 'linux-headers-*-amd64' | sort -V | tail -n 1)
    [ -n "$headers" ] || die "no /usr/src/linux-headers-*-amd64 directory (is linux-headers-amd64 installed?)"
    common=${headers%-amd64}-common
    [ -d "$common" ] || die "$common not found (it should come with $headers)"
    for link in "build:$headers" "source:$common"; do
        name=${link%%:*}
        target=${link#*:}
        [ -e "$kdir/$name" ] && continue
        is_root || die "$kdir/$name is missing; as root run: mkdir -p $kdir && ln -sfn $target $kdir/$name"
        log "linking $kdir/$name -> $target"
        mkdir -p "$kdir"
        ln -sfn "$target" "$kdir/$name"
    done
fi

# --- 3. pseudo filesystems --------------------------------------------------
# debugfs first: mounting it can bring tracefs along under debug/tracing.
for spec in debugfs:/sys/kernel/debug tracefs:/sys/kernel/tracing bpf:/sys/fs/bpf; do
    fstype=${spec%%:*}
    dir=${spec#*:}
    is_mounted "$dir" && continue
    if is_root && mount -t "$fstype" "$fstype" "$dir" 2>/dev/null; then
        log "mounted $fstype on $dir"
    else
        warn "could not mount $fstype on $dir (tests that need it will be skipped)"
    fi
done

# --- 4. virtualenv ------------------------------------------------------------
if [ ! -x "$VENV/bin/python" ] || ! "$VENV/bin/python" -I -S -c '' 2>/dev/null; then
    "$PYTHON" -c 'import sys; sys.exit(sys.version_info < (3, 11))' \
        || die "$PYTHON is older than 3.11 (set PYTHON=/path/to/python3.11+)"
    log "creating $VENV with $(command -v "$PYTHON")"
    rm -rf "$VENV"
    "$PYTHON" -m venv "$VENV"
fi

# --- 5. editable install, redone only when the inputs changed ---------------
inputs_hash() {
    # Everything that changes metadata, dependencies or the native module.
    {
        cat "$VENV/pyvenv.cfg"
        cat pyproject.toml setup.py
        find hybrid/native -maxdepth 2 -type f \( -name '*.c' -o -name '*.h' -o -name '*.py' \) | LC_ALL=C sort | xargs cat
    } | sha256sum | cut -d' ' -f1
}
native_built() { compgen -G 'hybrid/_native*.so' >/dev/null && compgen -G 'hybrid/libhybrid_preload*.so' >/dev/null; }

want=$(inputs_hash)
have=$(cat "$STAMP" 2>/dev/null || true)
if [ "$want" != "$have" ] || ! native_built; then
    log "installing hybrid into $VENV (pip install -e '.[dev]')"
    "$VENV/bin/python" -m pip install -q --disable-pip-version-check -e '.[dev]'
    native_built || die "pip install succeeded but hybrid/_native*.so was not built"
    echo "$want" > "$STAMP"
fi

# --- 6. Debian's bcc inside the venv ------------------------------------------
# Only the bcc package itself, not the whole dist-packages directory.
[ -d "$BCC_SRC" ] || die "$BCC_SRC not found (is python3-bpfcc installed?)"
site=$(compgen -G "$VENV/lib/python3*/site-packages" | head -n 1)
[ -n "$site" ] || die "no site-packages directory under $VENV/lib"
if [ "$(readlink "$site/bcc" 2>/dev/null || true)" != "$BCC_SRC" ]; then
    log "linking $site/bcc -> $BCC_SRC"
    rm -rf "${site:?}/bcc"
    ln -s "$BCC_SRC" "$site/bcc"
fi

log "ready"
