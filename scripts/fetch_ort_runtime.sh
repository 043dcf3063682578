#!/usr/bin/env bash
# Fetch ONNX Runtime's shared library from Debian trixie's libonnxruntime1.21 (the package family of
# the headers scripts/fetch_ort_headers.sh fetches, API 21), for C++ programs such as
# examples/cpp_client. Its run-time dependencies come with it, trixie's glibc and dynamic loader
# included, so that it also runs on an older system: start programs through DEST/lib/ld-linux-x86-64.so.2
# --library-path DEST/lib. Downloaded like the headers (temporary apt state); unpacked, never installed.
#
# Usage: fetch_ort_runtime.sh [DEST]   (DEST defaults to ~/.cache/onnx-perforate/ort-runtime-1.21)
# Prints the library directory (DEST/lib) on its last line.
set -euo pipefail

PACKAGE=libonnxruntime1.21
DEST="${1:-${XDG_CACHE_HOME:-$HOME/.cache}/onnx-perforate/ort-runtime-1.21}"
LIB="$DEST/lib"
if [[ -f "$LIB/libonnxruntime.so" && -f "$LIB/ld-linux-x86-64.so.2" ]]; then
  echo "$LIB"
  exit 0
fi

source "$(dirname "$0")/trixie_apt.sh"
trixie_apt_start fetch_ort_runtime
work="$TRIXIE_WORK"
# The package and everything it depends on, recursively (real packages only).
packages=$(apt-cache "${TRIXIE_APT[@]}" depends --recurse --no-recommends --no-suggests --no-conflicts \
             --no-breaks --no-replaces --no-enhances "$PACKAGE" | grep -v '^[ <]' | sort -u)
echo "fetch_ort_runtime: downloading $(echo $packages | wc -w) packages:" $packages >&2
(cd "$work" && apt-get "${TRIXIE_APT[@]}" -qq download $packages >&2)
for deb in "$work"/*.deb; do
  dpkg-deb -x "$deb" "$work/root"
done
rm -rf "$LIB.tmp" && mkdir -p "$LIB.tmp"
cp -a "$work"/root/usr/lib/x86_64-linux-gnu/*.so* "$LIB.tmp/"
ln -sf "$(basename "$(ls "$LIB.tmp"/libonnxruntime.so.1.*.* | head -1)")" "$LIB.tmp/libonnxruntime.so"
rm -rf "$LIB" && mv "$LIB.tmp" "$LIB"
(cd "$work" && ls *.deb) > "$DEST/SOURCE_PACKAGES"
echo "$LIB"
