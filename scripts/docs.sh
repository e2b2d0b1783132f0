#!/bin/sh
# Builds loom's API reference from the installed headers' /// comments into build-docs/html
# (open build-docs/html/index.html). Any warning, such as a public declaration without a
# comment, fails the build. Installs Debian's doxygen when it is missing.
set -eu
cd "$(dirname "$0")/.."
if ! command -v doxygen >/dev/null 2>&1; then
    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq doxygen >/dev/null
fi
mkdir -p build-docs
LOOM_DOCS_OUT="$PWD/build-docs" doxygen docs/api/Doxyfile
echo "API reference: build-docs/html/index.html"
