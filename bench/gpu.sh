#!/usr/bin/env bash
# The README's GPU figures in one run, on a machine with a CUDA GPU:
#   bash bench/gpu.sh [OUTDIR]        (default runs/gpu; each step's output in OUTDIR/STEP.txt)
# 1. tests/test_dtw_cuda.py: the Triton kernels on the GPU against the brute force and the float64 CPU wavefront
# 2. python train.py --smoke on the GPU (bf16 autocast, pinned batches, fused AdamW)
# 3. the default run on the GPU, timed, then eval.py on its base and its unified model
# 4. bench_dtw.py, bench_train.py (both presets; the long captions in one pass and in 4 chunks) and
#    bench_generate.py (float32 and bfloat16), --device cuda
# A failing step does not stop the next; the summary lists each step's exit status and wall time.
set -uo pipefail
cd "$(dirname "$0")/.."
out=${1:-runs/gpu}
mkdir -p "$out"
python -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)" 2>/dev/null \
  || { echo "bench/gpu.sh: this python's torch sees no CUDA GPU (or has no torch)" >&2; exit 1; }
export PYTHONUNBUFFERED=1
summary=()
step() {  # step NAME COMMAND...: run COMMAND, its output to OUTDIR/NAME.txt and the terminal
  local name=$1 t0=$SECONDS
  shift
  echo "== $name: $*"
  "$@" 2>&1 | tr '\r' '\n' | grep --line-buffered -v 'it/s\]\|s/it\]' | tee "$out/$name.txt"
  summary+=("$name: exit ${PIPESTATUS[0]}, $((SECONDS - t0)) s")
}
step device python -c "import torch, triton; print(torch.__version__, triton.__version__, torch.cuda.get_device_name())"
step test_dtw_cuda python -m pytest tests/test_dtw_cuda.py -q -p no:cacheprovider
step smoke python train.py --smoke --out "$out/smoke.pt"
step train python train.py --out "$out/unified.pt"
step eval_base python eval.py --ckpt "$out/unified.base.pt" --json "$out/unified.base.json"
step eval_unified python eval.py --ckpt "$out/unified.pt" --json "$out/unified.json"
step bench_dtw python bench/bench_dtw.py --device cuda --repeats 3
step bench_train python bench/bench_train.py --device cuda --presets cpu,gpu --caption-chunks 1,4
step bench_generate python bench/bench_generate.py --device cuda --repeats 3
step bench_generate_bf16 python bench/bench_generate.py --device cuda --dtype bfloat16 --repeats 3
printf '%s\n' "${summary[@]}" | tee "$out/summary.txt"
