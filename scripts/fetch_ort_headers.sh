#!/usr/bin/env bash
# Fetch ONNX Runtime's C/C++ headers (API 21) from Debian trixie's libonnxruntime-dev package.
#
# No PyPI wheel ships these headers. We download the .deb through the Debian mirror this machine's apt
# is already configured with (a temporary sources list and temporary apt state: the system's apt setup
# is left untouched), and unpack only usr/include/onnxruntime. Nothing is installed with dpkg.
#
# Usage: fetch_ort_headers.sh [DEST]   (DEST defaults to ~/.cache/onnx-perforate/ort-headers-1.21)
# Prints the include directory (DEST/include/onnxruntime) on its last line.
#
# `fetch_ort_headers.sh .ort-headers` fills the repository's own ignored folder, where the CMake build
# looks too; it copies the default cache when that holds the headers already (no network then). That
# folder can travel with a copy of the working tree to a machine with no network (scripts/gpu_check.sh).
set -euo pipefail

CACHE="${XDG_CACHE_HOME:-$HOME/.cache}/onnx-perforate/ort-headers-1.21"
DEST="${1:-$CACHE}"
INC="$DEST/include/onnxruntime"
if [[ -f "$INC/onnxruntime_cxx_api.h" ]]; then
  echo "$INC"
  exit 0
fi
if [[ -f "$CACHE/include/onnxruntime/onnxruntime_cxx_api.h" ]]; then
  mkdir -p "$DEST/include"
  rm -rf "$INC.tmp" && cp -r "$CACHE/include/onnxruntime" "$INC.tmp" && mv "$INC.tmp" "$INC"
  if [[ -f "$CACHE/SOURCE_PACKAGE" ]]; then cp "$CACHE/SOURCE_PACKAGE" "$DEST/"; fi
  echo "$INC"
  exit 0
fi

source "$(dirname "$0")/trixie_apt.sh"
trixie_apt_start fetch_ort_headers
work="$TRIXIE_WORK"
echo "fetch_ort_headers: downloading libonnxruntime-dev" >&2
(cd "$work" && apt-get "${TRIXIE_APT[@]}" -qq download libonnxruntime-dev >&2)
deb=$(ls "$work"/libonnxruntime-dev_*.deb)
dpkg-deb -x "$deb" "$work/root"
mkdir -p "$DEST/include"
rm -rf "$INC.tmp" && cp -r "$work/root/usr/include/onnxruntime" "$INC.tmp" && mv "$INC.tmp" "$INC"
basename "$deb" > "$DEST/SOURCE_PACKAGE"
echo "$INC"
