#!/usr/bin/env bash
# Every section of benchmarks/gpu.py, each in its own process under its own time limit (a section
# that runs long loses only itself, and what it measured so far is kept), then the summary.
#   bash benchmarks/gpu_all.sh BASELINE OUT [ARCHIVE.tgz] [--tiny]
# BASELINE: ../shared/bench/monai_baseline.py; OUT: the results folder; ARCHIVE, if given, is
# rewritten with all of OUT after every section. The limits fit one ~9-minute device call on an
# H200; SECTIONS="train2d ldm128" runs a subset.
set -u
BASELINE=$1 OUT=$2 ARCHIVE=
shift 2
case "${1:-}" in *.tgz) ARCHIVE=$1; shift ;; esac
PY=${PYTHON:-python3}
mkdir -p "$OUT"
declare -A LIMIT=([train2d]=170 [sample2d]=70 [train3d]=100 [sample3d]=55 [memory3d]=40 [ldm128]=125)
for section in ${SECTIONS:-train2d sample2d train3d sample3d memory3d ldm128}; do
  echo "=== $section (limit ${LIMIT[$section]} s)"
  timeout --kill-after=10 "${LIMIT[$section]}" "$PY" benchmarks/gpu.py --section "$section" \
    --baseline "$BASELINE" --out "$OUT" "$@" 2> "$OUT/stderr-$section.txt"  # progress bars, warnings
  code=$?
  echo "=== $section exit $code"
  [ $code -eq 0 ] || tail -n 5 "$OUT/stderr-$section.txt"
  [ -z "$ARCHIVE" ] || tar czf "$ARCHIVE" -C "$OUT" .
done
"$PY" benchmarks/gpu.py --section summary --out "$OUT"
[ -z "$ARCHIVE" ] || tar czf "$ARCHIVE" -C "$OUT" .
