#!/usr/bin/env bash
# Installs, with apt-get, whichever of loom's build and test dependencies are missing; with
# --tests, also what only the suite needs: headless Chromium to render an HTML report, and zlib
# to read its screenshot.
set -euo pipefail
packages=(g++ meson ninja-build pkgconf cmake libopenblas-dev libfmt-dev doctest-dev libbenchmark-dev nlohmann-json3-dev libcli11-dev libutfcpp-dev graphviz libopenmpi-dev openmpi-bin protobuf-compiler)
if [ "${1:-}" = --tests ]; then packages+=(chromium zlib1g-dev); fi
missing=()
for p in "${packages[@]}"; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if ((${#missing[@]})); then
    echo "installing: ${missing[*]}"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    apt-get install -y -qq --no-install-recommends "${missing[@]}"
fi
