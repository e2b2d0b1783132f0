#!/usr/bin/env bash
# Installs loom into a temporary prefix, then compiles and runs an outside program exactly as
# a user would: c++ -std=c++20 app.cpp $(pkg-config --cflags --libs loom).
set -euo pipefail
build=$1
program=$2
prefix=$(mktemp -d)
trap 'rm -rf "$prefix"' EXIT

meson install -C "$build" --destdir "$prefix" --no-rebuild --quiet
installed=$prefix$(meson introspect "$build" --buildoptions | grep -o '"name": "prefix", "value": "[^"]*"' | sed 's/.*"value": "//; s/"$//')
pcdir=$(dirname "$(find "$installed" -name loom.pc | head -n 1)")
test -f "$installed/include/loom/loom.hpp"

# The .pc file names the configured prefix; point it at where the files really are.
flags=$(PKG_CONFIG_PATH="$pcdir" pkg-config --define-variable=prefix="$installed" --cflags --libs loom)
c++ -std=c++20 "$program" $flags -o "$prefix/app"
LD_LIBRARY_PATH="$(dirname "$(find "$installed" -name 'libloom.so' | head -n 1)")" "$prefix/app"
