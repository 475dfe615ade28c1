#!/usr/bin/env bash
# Installs the Debian packages whose real servers the integration tests start (Redis, PostgreSQL, Orthanc).
# Idempotent: does nothing when they are already there. Needs root (as on CI) or passwordless sudo.
set -euo pipefail
pkgs=(redis-server postgresql orthanc orthanc-dicomweb orthanc-wsi default-jre-headless)
missing=()
for p in "${pkgs[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
[ ${#missing[@]} -eq 0 ] && exit 0
SUDO=""; [ "$(id -u)" -ne 0 ] && SUDO="sudo -n"
echo "installing Debian packages: ${missing[*]}"
$SUDO apt-get update -qq
DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
