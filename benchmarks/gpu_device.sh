#!/usr/bin/env bash
# The GPU benchmark through the device tool, in two steps.
#   here, once per checkout:   bash benchmarks/gpu_device.sh prep
#       (wheels of what the GPU machine lacks into .whl/, the baseline script into .bench/, both git-ignored)
#   there:  run(command="bash benchmarks/gpu_device.sh run", carry=[".whl", ".bench"], timeout_s=590)
# The results come back as $OUT/bench.tgz (refreshed after every section, so a run cut short
# returns what it measured) and $OUT/summary.txt; unpack into benchmarks/results/.
set -u
case "${1:-}" in
prep)
  grep -qx "/.bench/" .git/info/exclude || echo "/.bench/" >> .git/info/exclude
  grep -qx "/.whl/" .git/info/exclude || echo "/.whl/" >> .git/info/exclude
  mkdir -p .bench .whl && cp ../shared/bench/monai_baseline.py .bench/
  # antlr4 (omegaconf's parser) 4.9.3 is published as source only: built here, pure Python
  python3 -m pip wheel -q --no-deps -w .whl antlr4-python3-runtime==4.9.3 || exit 1
  for pkg in monai==1.6.1 nibabel==5.4.2 pydicom==3.0.2 hydra-core==1.3.8 omegaconf==2.3.1; do
    python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
      --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
      -d .whl "$pkg" || exit 1
  done
  ls .whl .bench ;;
run)
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
    .whl/*.whl || exit 1
  export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1
  nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
  bash benchmarks/gpu_all.sh .bench/monai_baseline.py /tmp/bench "$OUT/bench.tgz" | tee "$OUT/summary.txt" ;;
*)
  echo "usage: bash benchmarks/gpu_device.sh prep|run" >&2; exit 2 ;;
esac
