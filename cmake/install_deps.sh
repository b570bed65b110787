#!/bin/sh
# Installs what densegrad needs to build, test and train on Debian 12 (bookworm), via apt.
# Idempotent: checks with dpkg-query first and does nothing when all is present.
# Set DENSEGRAD_SKIP_APT=1 to skip it (e.g. when you provide the dependencies yourself).
set -eu

# clang-14, libclang-rt-14-dev (libFuzzer, sanitizer runtimes) and llvm-14 (llvm-symbolizer, for
# readable sanitizer reports) build and run the fuzz tests of tests/fuzz and the sanitizer build
# (preset asan), which needs clang's OpenMP runtime, libomp-14-dev, too.
# ocl-icd-opencl-dev: Debian's libdnnl-dev only recommends it, yet its CMake package config
# requires the OpenCL headers (it was built with oneDNN's OpenCL GPU runtime).
PACKAGES="build-essential cmake ninja-build pkg-config libeigen3-dev libdnnl-dev catch2 \
libcli11-dev zlib1g-dev libopenmpi-dev openmpi-bin dataset-fashion-mnist ocl-icd-opencl-dev \
clang-14 libclang-rt-14-dev libomp-14-dev llvm-14"

say() { echo "install_deps: $*"; }
die() { echo "install_deps: error: $*" >&2; exit 1; }

if [ "${DENSEGRAD_SKIP_APT:-0}" = "1" ]; then
    say "DENSEGRAD_SKIP_APT=1, not checking or installing packages"
    exit 0
fi

if ! command -v apt-get >/dev/null 2>&1 || ! command -v dpkg-query >/dev/null 2>&1; then
    die "apt-get/dpkg-query not found; this script is for Debian 12 (or a derivative).
Install the equivalents of these yourself, then rerun with DENSEGRAD_SKIP_APT=1:
  $PACKAGES"
fi

missing="" count=0
for pkg in $PACKAGES; do
    count=$((count + 1))
    if ! dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q 'ok installed'; then
        missing="$missing $pkg"
    fi
done
if [ -z "$missing" ]; then
    say "all $count packages already installed"
    exit 0
fi

if [ "$(id -u)" -eq 0 ]; then
    SUDO=""
elif command -v sudo >/dev/null 2>&1; then
    SUDO="sudo"
else
    die "not root and no sudo; as root run: apt-get install$missing"
fi

say "missing:$missing"
say "running: ${SUDO:+$SUDO }apt-get update"
$SUDO apt-get update || die "apt-get update failed"
say "running: ${SUDO:+$SUDO }apt-get install -y --no-install-recommends$missing"
# shellcheck disable=SC2086  # $missing is a list of words on purpose
$SUDO env DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends $missing ||
    die "apt-get install failed for:$missing"
say "done"
