#!/usr/bin/env bash
# One-shot bundle init (compose service `bundle-init`, Helm init container): makes $MSTAR_BUNDLE_DIR (default
# /models) hold a complete, checksum-verified model bundle before Triton and the workers start.
#   1. the folder already holds a bundle that verifies              -> nothing to do (restarts are cheap)
#   2. MSTAR_BUNDLE_SOURCE names a bundle folder or a .tar/.tar.gz   -> import it (e.g. `mstar export` output)
#   3. otherwise, MSTAR_BUNDLE_BUILD_DEMO=1 (default)                 -> train the demo bundle (synthetic, NOT
#                                                                       clinical; a few minutes on 2 CPU cores)
# The new bundle is staged in $MSTAR_BUNDLE_DIR/.incoming and moved in only once it verifies; Triton and the workers
# start only after this exits 0, and a run interrupted mid-swap leaves a bundle that fails to verify, so the next
# run replaces it. Exit 0 = bundle ready; 2 = refused, with one `error [...]` line.
set -euo pipefail
dest=${MSTAR_BUNDLE_DIR:-/models}
src=${MSTAR_BUNDLE_SOURCE:-}
py=${MSTAR_PYTHON:-python}

verify() {  # prints one line; exit status 0 when $1 holds a bundle whose every file matches its checksum
  "$py" - "$1" <<'PY'
import sys
from service.inference.bundle import load_bundle
try:
    b = load_bundle(sys.argv[1], verify_checksums=True)
except Exception as err:  # the bundle loader's own message says which file or field is wrong
    print(f"{type(err).__name__}: {err}")
    sys.exit(1)
print(f"{len(b.manifest.models)} models, demo={b.manifest.demo}")
PY
}

fail() { echo "error [$1]: $2" >&2; exit 2; }

mkdir -p "$dest"
if [[ -f "$dest/bundle.json" ]] && out=$(verify "$dest"); then
  echo "bundle-init: $dest already holds a verified bundle ($out)"
  exit 0
fi
# staged inside $dest: the same filesystem (moves are renames) even when $dest is a volume's mount point
stage="$dest/.incoming"
rm -rf "$stage"
mkdir -p "$stage"
trap 'rm -rf "$stage"' EXIT

if [[ -n "$src" ]]; then
  if [[ -d "$src" ]]; then
    cp -a "$src/." "$stage/"
  elif [[ -f "$src" && "$src" =~ \.(tar|tar\.gz|tgz)$ ]]; then
    tar -xf "$src" -C "$stage" --no-same-owner --no-same-permissions
    # a tarball of the folder itself: step into its single top-level folder
    if [[ ! -f "$stage/bundle.json" ]] && [[ $(find "$stage" -mindepth 1 -maxdepth 1 | wc -l) -eq 1 ]]; then
      inner=$(find "$stage" -mindepth 1 -maxdepth 1 -type d)
      [[ -n "$inner" ]] && { mv "$inner" "$stage.inner"; rm -rf "$stage"; mv "$stage.inner" "$stage"; }
    fi
  else
    fail bundle_source "MSTAR_BUNDLE_SOURCE=$src is neither a folder nor a .tar/.tar.gz file"
  fi
  echo "bundle-init: imported $src"
elif [[ "${MSTAR_BUNDLE_BUILD_DEMO:-1}" == "1" ]]; then
  echo "bundle-init: no bundle in $dest and no MSTAR_BUNDLE_SOURCE; training the demo bundle (not clinical)"
  "$py" -c 'import sys; from training.demo import build_demo_bundle; build_demo_bundle(sys.argv[1])' "$stage" \
    || fail bundle_build "the demo bundle build failed (see above)"
else
  fail bundle_missing "no bundle in $dest, MSTAR_BUNDLE_SOURCE unset and MSTAR_BUNDLE_BUILD_DEMO=0"
fi

out=$(verify "$stage") || fail bundle_invalid "the new bundle does not verify: $out"
# swap: remove the old bundle (not the mount point, not hidden entries such as .incoming), move the new one in
find "$dest" -mindepth 1 -maxdepth 1 ! -name '.*' -exec rm -rf '{}' +
find "$stage" -mindepth 1 -maxdepth 1 -exec mv '{}' "$dest/" ';'
echo "bundle-init: bundle ready in $dest ($out)"
