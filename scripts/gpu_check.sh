#!/usr/bin/env bash
# `make gpu-check`: on a machine with an NVIDIA GPU (the CUDA `vllm` installed by `make install`),
# run what cannot run here: the test suite, compressed checkpoints served compiled, with FP8 and
# under tensor/expert parallel on 2 GPUs (benchmarks/gpu_check.py), and the serving benchmark's
# interleaved A/B. Results land in benchmarks/results/gpu/ (commit them); a phase that fails does
# not stop the next.
#     bash scripts/gpu_check.sh [tests] [serve] [bench]     (default: all three, in that order)
set -u
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
OUT=benchmarks/results/gpu
if ! nvidia-smi -L >/dev/null 2>&1; then
    echo "gpu-check needs an NVIDIA GPU: nvidia-smi sees none (on a CPU machine run make test)" >&2
    exit 2
fi
mkdir -p "$OUT"
nvidia-smi > "$OUT/nvidia-smi.txt"
phases=${*:-tests serve bench}
failed=()
for phase in $phases; do
    echo "== gpu-check: $phase ($(date -u +%H:%M:%S))"
    case $phase in
        tests) $PY -m pytest -q --junitxml="$OUT/pytest.xml" 2>&1 | tee "$OUT/pytest.log"; rc=${PIPESTATUS[0]} ;;
        serve) $PY benchmarks/gpu_check.py --out "$OUT"; rc=$? ;;
        bench) $PY benchmarks/serving.py --out "$OUT" --rounds 3 --soak-requests 300; rc=$? ;;
        *) echo "unknown phase $phase (tests, serve, bench)" >&2; rc=2 ;;
    esac
    [ "$rc" -eq 0 ] || failed+=("$phase (exit $rc)")
done
if [ ${#failed[@]} -gt 0 ]; then
    echo "gpu-check: failed: ${failed[*]}; results so far in $OUT" >&2
    exit 1
fi
echo "gpu-check: all phases passed; results in $OUT"
