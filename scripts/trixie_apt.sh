# Sourced by the fetch_ort_*.sh scripts: apt access to Debian trixie through the mirror this machine's
# apt is already configured with, using a temporary sources list and temporary apt state (the system's
# apt setup is left untouched; nothing is installed).
#
# trixie_apt_start NAME   makes a temporary folder $TRIXIE_WORK (removed on exit) and runs
#   `apt-get update`; afterwards apt-get "${TRIXIE_APT[@]}" ... and apt-cache "${TRIXIE_APT[@]}" ...
#   use trixie. Exits with a message naming the script NAME when trixie cannot be reached.

trixie_apt_start() {
  local name="$1" mirror="" f
  TRIXIE_WORK=$(mktemp -d)
  trap 'rm -rf "$TRIXIE_WORK"' EXIT
  local work="$TRIXIE_WORK"
  # The mirror: the first Debian archive URI in the apt configuration (deb822 or one-line form).
  for f in /etc/apt/sources.list.d/*.sources; do
    [[ -f "$f" ]] || continue
    mirror=$(awk '/^URIs:/ {for (i = 2; i <= NF; i++) if ($i ~ /debian\/?$/) {print $i; exit}}' "$f")
    [[ -n "$mirror" ]] && break
  done
  if [[ -z "$mirror" && -f /etc/apt/sources.list ]]; then
    mirror=$(awk '$1 == "deb" {for (i = 2; i <= NF; i++) if ($i ~ /^[a-z]+:\/\// && $i ~ /debian\/?$/) {print $i; exit}}' /etc/apt/sources.list)
  fi
  if [[ -z "$mirror" ]]; then
    echo "$name: no Debian mirror found in the apt configuration" >&2
    exit 1
  fi
  mkdir -p "$work/lists/partial" "$work/cache/archives/partial"
  echo "deb [signed-by=/usr/share/keyrings/debian-archive-keyring.gpg] $mirror trixie main" > "$work/sources.list"
  TRIXIE_APT=(-o "Dir::Etc::SourceList=$work/sources.list" -o Dir::Etc::SourceParts=/dev/null
              -o "Dir::State::Lists=$work/lists" -o "Dir::Cache=$work/cache" -o APT::Architecture=amd64
              -o APT::Sandbox::User=root)
  echo "$name: using trixie from $mirror" >&2
  if ! apt-get "${TRIXIE_APT[@]}" -qq update >&2; then
    echo "$name: cannot reach Debian trixie at $mirror" >&2
    exit 1
  fi
}
