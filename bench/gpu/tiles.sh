#!/usr/bin/env bash
# The tile-decoder benchmark on a GPU machine that has no package index (the `device` machines: Python 3.12 with
# numpy, tifffile, OpenCV, numba, Pillow and psutil, CUDA 13): bench/tiling.py with `--decoder nvimgcodec`, so
# each row adds ours through nvJPEG / nvJPEG2000, interleaved with the CPU path, the OpenSlide loop and the
# ceiling, and the GPU's pixels against the CPU path's.
#
#   bash bench/gpu/tiles.sh prepare      # here, with PyPI: .gpu-tiles/ = trimmed cp312 wheels + the sample slides
#   bash bench/gpu/tiles.sh run [tiling.py options]     # there, with .gpu-tiles carried; writes $OUT/tiles.json
#   DECODER=nvimgcodec-cpu bash bench/gpu/tiles.sh run   # a dry run of the packing on a machine without a GPU
#
# run first probes what nvImageCodec makes of Aperio 33003 tiles (bench/gpu/probe_j2k.py), which stay on the CPU.
#
# prepare keeps .gpu-tiles under 40 MB (the device carries 64 MiB with the repository): imagecodecs without the
# codecs the reader never calls, nvImageCodec without the other Pythons' bindings and its CPU OpenCV backend.
set -euo pipefail
root=$(cd "$(dirname "$0")/../.." && pwd)
cd "$root"
dir=.gpu-tiles
case "${1:-}" in
prepare)
  rm -rf "$dir" && mkdir -p "$dir/wheels" "$dir/slides"
  grep -qx "/$dir/" .git/info/exclude 2>/dev/null || echo "/$dir/" >>.git/info/exclude
  for spec in imagecodecs simplejpeg openslide-python openslide-bin "nvidia-nvimgcodec-cu13==0.9.0.20" \
    "nvidia-nvjpeg==13.0.4.44" "nvidia-nvjpeg2k-cu13==0.11.0.51"; do
    python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
      --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
      --platform manylinux1_x86_64 -d "$dir/wheels" "$spec"
  done
  python3 - "$dir/wheels" <<'EOF'
import re, sys, zipfile
from pathlib import Path
drop = re.compile(
    r"nvimgcodec_impl\.cpython-(?!312-)|libopencv_ext|"  # other Pythons; nvImageCodec's CPU OpenCV backend
    r"imagecodecs/_(?!imcd|shared|jpeg8|jpeg2k|jpeg\.|zlib|deflate|lzw|packbits|delta|predictor)[a-z0-9]+\.abi3\.so|"
    r"imagecodecs\.libs/lib(aom|jxl|avif|SZ3c|blosc2|zstd|dav1d|rav1e|heif|brunsli|lerc|lz4|lzma|snappy|zfp|"
    r"bz2|brotli|charls|jxr|spng|ultrahdr|webp|sharpyuv|hwy|cfitsio|bcn|zopfli|sperr|pcodec|libtiff|tiff)"
)
for whl in Path(sys.argv[1]).glob("*.whl"):
    with zipfile.ZipFile(whl) as z:
        keep = [i for i in z.infolist() if not drop.search(i.filename)]
        if len(keep) == len(z.infolist()):
            continue
        data = {i.filename: z.read(i) for i in keep}
    with zipfile.ZipFile(whl, "w", zipfile.ZIP_DEFLATED) as z:
        for name, blob in data.items():
            z.writestr(name, blob)
EOF
  cp -r ../shared/data/slides/CMU-1-Small-Region.svs ../shared/data/slides/tcga-cr-7395-01a-01-ts1.svs \
    ../shared/data/slides/test3-DAPI-2-387.ndpi ../shared/data/slides/dicom-cmu-1-small-region "$dir/slides/"
  # the 2,048 px Aperio 33003 slide (opj_compress builds it here; the GPU machine has none) for probe_j2k.py
  .venv/bin/python -c "import sys; sys.path.insert(0, 'bench'); import tiling; print(tiling.build_j2k_ycbcr())" >/dev/null
  cp out/bench/cmu-2048-33003.svs "$dir/"
  du -sh "$dir"
  ;;
run)
  shift
  test -d "$dir/wheels" || { echo "no $dir: run 'bash bench/gpu/tiles.sh prepare' where PyPI is reachable" >&2; exit 2; }
  site=/tmp/mstar-tiles-site
  python3 - "$dir/wheels" "$site" <<'EOF'
import sys, zipfile
from pathlib import Path
for whl in Path(sys.argv[1]).glob("*.whl"):  # wheels are zip files: unpacked as pip would, no index needed
    zipfile.ZipFile(whl).extractall(sys.argv[2])
EOF
  export PYTHONPATH="$site:$root" MSTAR_BENCH_SLIDES="$root/$dir/slides" OPENCV_LOG_LEVEL=ERROR PYTHONUNBUFFERED=1
  nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader || true
  decoder=${DECODER:-nvimgcodec}  # DECODER=nvimgcodec-cpu: a dry run of the packing where there is no GPU
  python3 -c "from service.slides.batchdecode import batch_decoder; print('decoder ok:', batch_decoder('$decoder').kind)"
  python3 bench/gpu/probe_j2k.py "$dir/cmu-2048-33003.svs" --kind "$decoder" 2>&1 | grep -v WARN || true
  out=${OUT:-out/bench}
  mkdir -p "$out"
  exec timeout --signal=INT --kill-after=20 "${LIMIT_S:-540}" python3 bench/tiling.py --decoder "$decoder" \
    --json "$out/tiles.json" "$@"
  ;;
*)
  sed -n '2,12p' "$0" >&2
  exit 2
  ;;
esac
