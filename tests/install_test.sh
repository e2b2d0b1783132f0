#!/usr/bin/env bash
# Installs loom into a temporary prefix, then builds and runs programs outside the tree exactly
# as users would: with pkg-config (c++ app.cpp $(pkg-config --cflags --libs loom)), and with
# CMake (find_package(loom CONFIG REQUIRED), linking loom::loom); where loom::dist was built,
# also a dist program with CMake (loom::dist) and with pkg-config (loom-dist), run under
# mpirun -np 2.
# $1: the build folder; $2: the plain outside program; $3: the dist outside program.
set -euo pipefail
build=$1
program=$(realpath "$2")
dist_program=$(realpath "$3")
prefix=$(mktemp -d)
trap 'rm -rf "$prefix"' EXIT

meson install -C "$build" --destdir "$prefix" --no-rebuild --quiet
installed=$prefix$(meson introspect "$build" --buildoptions | grep -o '"name": "prefix", "value": "[^"]*"' | sed 's/.*"value": "//; s/"$//')
pcdir=$(dirname "$(find "$installed" -name loom.pc | head -n 1)")
libdir=$(dirname "$(find "$installed" -name 'libloom.so' | head -n 1)")
test -f "$installed/include/loom/loom.hpp"
test -f "$(find "$installed" -name loomConfig.cmake | head -n 1)"
test -f "$(find "$installed" -name loomConfigVersion.cmake | head -n 1)"
export LD_LIBRARY_PATH=$libdir

# pkg-config. The .pc file names the configured prefix; point it at where the files really are.
flags=$(PKG_CONFIG_PATH="$pcdir" pkg-config --define-variable=prefix="$installed" --cflags --libs loom)
c++ -std=c++20 "$program" $flags -o "$prefix/app"
"$prefix/app"

# CMake, from a project of its own that knows only the prefix.
consumer() {  # consumer NAME SOURCE TARGET
    mkdir -p "$prefix/$1"
    cp "$2" "$prefix/$1/main.cpp"
    cat > "$prefix/$1/CMakeLists.txt" <<CMAKE
cmake_minimum_required(VERSION 3.20)
project($1 CXX)
find_package(loom 0.1 CONFIG REQUIRED)
add_executable($1 main.cpp)
target_link_libraries($1 PRIVATE $3)
CMAKE
    cmake -S "$prefix/$1" -B "$prefix/$1/build" -DCMAKE_PREFIX_PATH="$installed" > "$prefix/$1.log" 2>&1 \
        || { cat "$prefix/$1.log"; exit 1; }
    cmake --build "$prefix/$1/build" >> "$prefix/$1.log" 2>&1 || { cat "$prefix/$1.log"; exit 1; }
}
consumer cmake_app "$program" loom::loom
"$prefix/cmake_app/build/cmake_app" | sed 's/^/cmake: /'

if [ -f "$libdir/libloom_dist.so" ]; then
    export OMPI_MCA_btl_vader_single_copy_mechanism=none
    mpirun=(timeout 60 mpirun -np 2 --oversubscribe --allow-run-as-root)
    consumer cmake_dist "$dist_program" loom::dist
    "${mpirun[@]}" "$prefix/cmake_dist/build/cmake_dist" | sed 's/^/cmake: /'
    flags=$(PKG_CONFIG_PATH="$pcdir" pkg-config --define-variable=prefix="$installed" --cflags --libs loom-dist)
    c++ -std=c++20 "$dist_program" $flags -o "$prefix/dist_app"
    "${mpirun[@]}" "$prefix/dist_app" | sed 's/^/pkg-config: /'
fi
