#!/usr/bin/env bash
# The GPU figures of the real-scale benchmarks in one short run (each under a time limit, 10 min in all at most):
# WeakTr's two training steps, the AD-CAM Conformer step and the AFA step with the loader
# feeding it, each at the paper's sizes in fp32 and bf16, the loaders with 0 / 4 / 8 workers,
# and the inference stages (CAMs, pseudo masks, single- and multi-scale segmentation) of the
# voc suite's recipes.
# Every figure goes to OUTDIR (one log per benchmark, plus nvidia-smi's view of the machine).
#
#   benchmarks/gpu_figures.sh OUTDIR [VOC2012-folder]     # default: ../shared/data/voc-mini/VOC2012
#
# Needs a CUDA machine with the project's environment: the Python of $PYTHON, else the repo's
# .venv/bin/python (`make install`), else python3. Stops at once (exit 2) when that Python sees
# no CUDA device. Backbones start from random init: weights do not change the speed, and
# nothing is downloaded.
set -uo pipefail
out=$(realpath -m "${1:?usage: benchmarks/gpu_figures.sh OUTDIR [VOC2012-folder]}")  # absolute: we cd below
data=$(realpath -m "${2:-$(dirname "$0")/../../shared/data/voc-mini/VOC2012}")
cd "$(dirname "$0")/.." || exit 2
py=${PYTHON:-$( [ -x .venv/bin/python ] && echo .venv/bin/python || echo python3 )}
if ! "$py" -c "import torch" 2>/dev/null; then
    echo "gpu_figures: $py has no torch; nothing measured (set PYTHON to the project's Python, or run make install)" >&2
    exit 2
fi
if ! "$py" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)" 2>/dev/null; then
    echo "gpu_figures: $py sees no CUDA device; nothing measured" >&2
    exit 2
fi
mkdir -p "$out"
export PYTHONUNBUFFERED=1
nvidia-smi > "$out/nvidia-smi.txt" 2>&1
status=0
run() {  # run NAME SECONDS ARGS...: one benchmark, its output in OUTDIR/NAME.log, a time limit
    local name=$1 limit=$2
    shift 2
    echo "== $name: $*" | tee -a "$out/summary.log"
    timeout "$limit" "$py" "$@" > "$out/$name.log" 2>&1 || { echo "   failed or timed out (see $name.log)" | tee -a "$out/summary.log"; status=1; }
    tail -n 12 "$out/$name.log" >> "$out/summary.log"
}
run weaktr 100 benchmarks/perf_weaktr.py --config paper --device cuda --bf16 --warmup 2 --iters 10 --json "$out/weaktr.json"
run adcam_fp32 50 benchmarks/perf_adcam.py --part train --device cuda --arch conformer_s --crop 384 --batch 16 --warmup 2 --iters 10
run adcam_bf16 50 benchmarks/perf_adcam.py --part train --device cuda --arch conformer_s --crop 384 --batch 16 --warmup 2 --iters 10 --bf16 --channels-last
run afa_fp32 100 benchmarks/perf_afa.py --suite voc --data "$data" --device cuda --workers 8 --warmup 3 --steps 30
run afa_bf16 120 benchmarks/perf_afa.py --suite voc --data "$data" --device cuda --workers 8 --warmup 3 --steps 30 --bf16 --profile 2
run loaders 90 benchmarks/perf_data.py --data "$data" --workers 0 4 8 --images 256 --json "$out/loaders.json"
run stages 80 benchmarks/perf_stages.py --suite voc --methods cam,weaktr,afa,adcam --data "$data" --device cuda --images 10 --threads 4
exit $status
