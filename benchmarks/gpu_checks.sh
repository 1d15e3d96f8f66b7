#!/usr/bin/env bash
# Every GPU check of the project, for a lent GPU machine that has torch, triton and timm but no
# network: wheels for the rest (nnsight, the Lite weights) come from .whl/.
#   OUT=/some/dir [PARTS="tests kernels circuits explain throughput"] \
#     bash benchmarks/gpu_checks.sh [kernel-benchmark budget in s]
# PARTS picks the parts (default all; about 4 + 5 + 2.5 + 1.5 + 7 minutes at most): a device
# call is limited to 600 s, so a short lease runs them in two calls, e.g. PARTS="tests
# throughput" then PARTS="kernels circuits explain". KERNELS_ONLY=1 is PARTS="tests kernels".
# Writes under $OUT: env.txt, pytest.txt, kernels.csv/.txt, circuits.csv/.txt, explain.txt,
# throughput.csv/.txt.
set -u
OUT=${OUT:-/tmp/gpu_out}; mkdir -p "$OUT"
BUDGET=${1:-240}
PARTS=${PARTS:-tests kernels circuits explain throughput}
[ "${KERNELS_ONLY:-0}" = 1 ] && PARTS="tests kernels"
want() { case " $PARTS " in *" $1 "*) return 0 ;; *) return 1 ;; esac; }
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
if want tests; then
  t0=$SECONDS
  timeout 240 python3 -m pytest -q -x -p no:cacheprovider tests/test_kernels.py tests/test_cuda.py \
    >"$OUT/pytest.txt" 2>&1; echo "pytest rc=$? ($((SECONDS - t0)) s)"; tail -3 "$OUT/pytest.txt"
fi
if want kernels; then
  t0=$SECONDS
  timeout $((BUDGET + 60)) python3 benchmarks/kernels.py --budget-s "$BUDGET" --out "$OUT/kernels.csv" \
    >"$OUT/kernels.txt" 2>&1; echo "kernels rc=$? ($((SECONDS - t0)) s)"
  grep -v "^\s*$" "$OUT/kernels.txt" | tail -70
fi
if want circuits; then
  t0=$SECONDS
  timeout 150 python3 benchmarks/circuits.py --device cuda --out "$OUT/circuits.csv" \
    >"$OUT/circuits.txt" 2>&1; echo "circuits rc=$? ($((SECONDS - t0)) s)"; tail -8 "$OUT/circuits.txt"
fi
if want explain; then
  t0=$SECONDS
  timeout 90 python3 -m circuitlab.cli explain --model efficientnet_lite0 --image coffee \
    --out /tmp/gpu_coffee --device cuda --force >"$OUT/explain.txt" 2>&1
  echo "explain rc=$? ($((SECONDS - t0)) s)"; tail -3 "$OUT/explain.txt"
fi
if want throughput; then
  # 256 Lite0 images: one at a time (16 of them), batches 16 / 64 / 256, bf16 and CUDA graphs
  # at the two largest batches, every visible GPU under torchrun
  t0=$SECONDS
  timeout 420 python3 benchmarks/throughput.py --device cuda --model efficientnet_lite0 \
    --commands "${THROUGHPUT_COMMANDS:-explain}" --out "$OUT/throughput.csv" \
    >"$OUT/throughput.txt" 2>&1; echo "throughput rc=$? ($((SECONDS - t0)) s)"
  tail -16 "$OUT/throughput.txt"
fi
