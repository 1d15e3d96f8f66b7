#!/usr/bin/env bash
# Every GPU check of the project in one run, for a lent GPU machine that has torch, triton and
# timm but no network: wheels for the rest (nnsight, the Lite weights) come from .whl/.
#   OUT=/some/dir [KERNELS_ONLY=1] bash benchmarks/gpu_checks.sh [kernel-benchmark budget in s]
# Writes under $OUT: env.txt, pytest.txt, kernels.csv/.txt, circuits.csv/.txt, explain.txt,
# throughput.csv/.txt.
set -u
OUT=${OUT:-/tmp/gpu_out}; mkdir -p "$OUT"
BUDGET=${1:-240}
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --target /tmp/site .whl/*.whl >/dev/null 2>&1
fi
# circuitlab itself, editable and offline: the kernels/ folder imports as circuitlab.kernels only
# through the install (pyproject's package-dir), not from a bare PYTHONPATH
python3 -m pip install -q --no-deps --no-build-isolation --no-index -e . >/dev/null 2>&1 ||
  echo "circuitlab did not install (needs setuptools >= 64 in this python)"
export PYTHONPATH=/tmp/site CIRCUITLAB_OFFLINE=1
{ nvidia-smi -L; python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)"; } >"$OUT/env.txt" 2>&1
cat "$OUT/env.txt"
t0=$SECONDS
timeout 200 python3 -m pytest -q -x -p no:cacheprovider tests/test_kernels.py tests/test_cuda.py \
  >"$OUT/pytest.txt" 2>&1; echo "pytest rc=$? ($((SECONDS - t0)) s)"; tail -3 "$OUT/pytest.txt"
t0=$SECONDS
timeout $((BUDGET + 120)) python3 benchmarks/kernels.py --budget-s "$BUDGET" --out "$OUT/kernels.csv" \
  >"$OUT/kernels.txt" 2>&1; echo "kernels rc=$? ($((SECONDS - t0)) s)"
[ "${KERNELS_ONLY:-0}" = 1 ] && { grep -v "^\s*$" "$OUT/kernels.txt" | tail -70; exit 0; }
t0=$SECONDS
timeout 150 python3 benchmarks/circuits.py --device cuda --out "$OUT/circuits.csv" \
  >"$OUT/circuits.txt" 2>&1; echo "circuits rc=$? ($((SECONDS - t0)) s)"; tail -8 "$OUT/circuits.txt"
t0=$SECONDS
timeout 90 python3 -m circuitlab.cli explain --model efficientnet_lite0 --image coffee \
  --out /tmp/gpu_coffee --device cuda --force >"$OUT/explain.txt" 2>&1
echo "explain rc=$? ($((SECONDS - t0)) s)"; tail -3 "$OUT/explain.txt"
t0=$SECONDS
timeout 240 python3 benchmarks/throughput.py --device cuda --model efficientnet_lite0 \
  --commands "explain --no-minimal,explain" --out "$OUT/throughput.csv" \
  >"$OUT/throughput.txt" 2>&1; echo "throughput rc=$? ($((SECONDS - t0)) s)"
tail -12 "$OUT/throughput.txt"
grep -v "^\s*$" "$OUT/kernels.txt" | tail -70
