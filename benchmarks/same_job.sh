#!/usr/bin/env bash
# Does a change keep behaviour? Runs the same short demo job (prepare -> train -> sample -> evaluate -> export,
# same seed) at two commits and compares their samples and metrics.json. Run by hand from the repo root:
#   bash benchmarks/same_job.sh 57c1eb7 HEAD          # prints identical / differing / new metrics, max |sample diff|
set -euo pipefail
a=${1:?first commit}; b=${2:-HEAD}
py=${PYTHON:-$PWD/.venv/bin/python}
work=$(mktemp -d)
trap 'git worktree remove --force "$work/a" >/dev/null 2>&1 || true; git worktree remove --force "$work/b" >/dev/null 2>&1 || true' EXIT
for side in a b; do
  rev=$([ $side = a ] && echo "$a" || echo "$b")
  git worktree add --detach -q "$work/$side" "$rev"
  (cd "$work/$side" && "$py" -m pipelines.run experiment=demo_2d "paths.output_dir=$work/out_$side" \
     training.max_steps=40 training.ckpt_every=40 sample.num_per_class=12 evaluate.classifier_steps=60 \
     >"$work/$side.log" 2>&1) || { echo "the job failed at $rev: $work/$side.log"; exit 1; }
done
"$py" - "$work" <<'PY'
import json, math, sys
import torch
w = sys.argv[1]
a, b = (json.load(open(f"{w}/out_{s}/eval/metrics.json")) for s in "ab")
same = lambda x, y: x == y or (isinstance(x, float) and isinstance(y, float) and math.isclose(x, y, abs_tol=1e-9))
shared = [k for k in a if k in b]
diff = [(k, a[k], b[k]) for k in shared if not same(a[k], b[k])]
print(f"metrics: {len(a)} before, {len(b)} after, {len(shared) - len(diff)} identical, {len(diff)} differ, "
      f"{len(set(b) - set(a))} new, {len(set(a) - set(b))} gone")
for d in diff:
    print("  differs:", *d)
xa, xb = (torch.load(f"{w}/out_{s}/samples/samples.pt")["images"] for s in "ab")
print("samples max |diff|:", (xa - xb).abs().max().item() if xa.shape == xb.shape else f"shapes {xa.shape} {xb.shape}")
PY
