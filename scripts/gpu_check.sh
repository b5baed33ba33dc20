#!/usr/bin/env bash
# Prepared GPU check (scripts/gpu_check.py): the real pipeline up to a trained 2D-ice model and one sampled
# test patient, each solver, the sampler benchmark and U-Net TFLOP/s -> <out>/gpu_check.json.
#   bash scripts/gpu_check.sh [--device cuda|cpu] [--out DIR] [--tiny]     (defaults: --device cuda --out gpu_check)
# Full mode fits 8 minutes on one H100/H200; --device cpu --tiny is a 2-3 minute smoke test on 2 cores.
# Exit 0 only when every step succeeded; a failed step's error is in the JSON and the others still run.
set -euo pipefail

here="$(pwd)"
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
device=cuda
out=gpu_check
tiny=()
while [[ $# -gt 0 ]]; do
    case "$1" in
        --device) device="${2:?--device needs cuda or cpu}"; shift 2 ;;
        --out) out="${2:?--out needs a folder}"; shift 2 ;;
        --tiny) tiny=(--tiny); shift ;;
        -h|--help) sed -n '2,6p' "$root/scripts/gpu_check.sh"; exit 0 ;;
        *) echo "gpu_check.sh: unknown argument $1 (usage: [--device cuda|cpu] [--out DIR] [--tiny])" >&2; exit 2 ;;
    esac
done

[[ "$out" = /* ]] || out="$here/$out"   # --out is relative to where the check was started
cd "$root"   # the repo root: Snakefile, config/ and scripts/ are relative to it
if [[ -x .venv/bin/python ]]; then
    PY=.venv/bin/python
else
    PY=python3
fi
exec "$PY" scripts/gpu_check.py --device "$device" --out "$out" "${tiny[@]}"
