#!/usr/bin/env bash
# Every GPU check of the course in one call, for a lent GPU machine (device tool) that has torch
# with CUDA, transformers, scikit-learn and matplotlib but no Jupyter stack and no network.
#   here, once:   bash scripts/gpu_wheels.sh                       (fills .whl/)
#   device call:  carry [".whl"], command "bash scripts/gpu_check.sh [runner options]"
# It runs the course runner on the GPU and writes nvidia-smi.txt, run.log, summary.md and
# summary.json to $OUT (./gpu_out elsewhere). With no arguments it runs the lessons whose GPU
# sections need nothing the GPU machine lacks: all-MiniLM-L6-v2 (an 88 MB package, too big to
# carry) and GPTQModel/torchao are not there (so not lesson 04, which needs torchao). Arguments
# replace that default selection.
set -uo pipefail
cd "$(dirname "$0")/.."
out=${OUT:-gpu_out}
mkdir -p "$out"
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
export PYTHONPATH="/tmp/site:$PWD" PYTHONUNBUFFERED=1 GPTQMODEL_CPU_WORKERS=2
nvidia-smi > "$out/nvidia-smi.txt" 2>&1
python3 -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda, torch.cuda.get_device_name(0))" | tee "$out/run.log"
if [ "$#" -eq 0 ]; then set -- --only 01 03 05 -p run_gptqmodel false; fi
python3 -m lessons_lib run --runs-dir /tmp/course-runs -p device cuda "$@" 2>&1 | tee -a "$out/run.log"
status=${PIPESTATUS[0]}
cp /tmp/course-runs/*/summary.md /tmp/course-runs/*/summary.json "$out/" 2>/dev/null
exit "$status"
