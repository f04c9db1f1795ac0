#!/usr/bin/env bash
# Every GPU check of the course in one call, for a lent GPU machine (device tool) that has torch
# with CUDA, transformers, scikit-learn and matplotlib but no Jupyter stack and no network.
#   here, once:   bash scripts/gpu_wheels.sh                       (fills .whl/)
#   device call:  carry [".whl"], command "bash scripts/gpu_check.sh [runner options]"
# It runs the course runner on the GPU and writes nvidia-smi.txt, run.log, summary.md and
# summary.json to $OUT (./gpu_out elsewhere). With no arguments it runs the lessons whose GPU
# sections need nothing the GPU machine lacks: all-MiniLM-L6-v2 (an 88 MB package, too big to
# carry) and GPTQModel/torchao are not there (so not lesson 04, which needs torchao). Arguments
# replace that default selection; lesson 03 (GPTQ) runs in any case. Before the lessons, a short
# check quantizes the zoo LM with lessons_lib.gptq on the GPU and on the CPU and compares them.
set -uo pipefail
cd "$(dirname "$0")/.."
out=${OUT:-gpu_out}
mkdir -p "$out"
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
export PYTHONPATH="/tmp/site:$PWD" PYTHONUNBUFFERED=1 GPTQMODEL_CPU_WORKERS=2
nvidia-smi > "$out/nvidia-smi.txt" 2>&1
python3 -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda, torch.cuda.get_device_name(0))" | tee "$out/run.log"
# GPTQ on the GPU (lessons_lib.gptq, issue 16): the zoo LM quantized with the model on "cuda" (Hessians, column
# loop and activations there) against the same run on the CPU: results on the GPU, codes and perplexity alike.
python3 - <<'PYEOF' 2>&1 | tee -a "$out/run.log"
import copy, time, torch
from lessons_lib import data, evaluate, gptq, zoo
lm = zoo.load_teacher("lm").float().eval()
T = lm.config.max_position_embeddings
train, val = data.lm_tokens("train"), data.lm_tokens("val")[: 32 * T]
cal = torch.stack([train[i * T : (i + 1) * T] for i in range(32)])
ok = True
for cfg in (gptq.GPTQConfig(bits=4), gptq.GPTQConfig(bits=3, group_size=64), gptq.GPTQConfig(bits=3, group_size=64, act_order=True)):
    runs = {}
    for dev in ("cpu", "cuda"):
        model = copy.deepcopy(lm).to(dev)
        start = time.perf_counter()
        res = gptq.quantize_model_(model, cal, cfg)
        torch.cuda.synchronize()
        runs[dev] = (res, time.perf_counter() - start, evaluate.perplexity(model, val, T, device=dev))
    (rc, tc, pc), (rg, tg, pg) = runs["cpu"], runs["cuda"]
    on_gpu = all(q.qweight.device.type == "cuda" and q.scale.device.type == "cuda" for q in rg.values())
    same = sum(int((rc[n].qweight == rg[n].qweight.cpu()).sum()) for n in rc) / sum(q.qweight.numel() for q in rc.values())
    good = on_gpu and same > 0.9 and abs(pg / pc - 1) < 0.02
    ok &= good
    print(f"GPTQ on cuda {cfg.bits}-bit group {cfg.group_size} act_order {cfg.act_order}: {tg:.1f} s (cpu {tc:.1f} s), "
          f"results on the GPU {on_gpu}, codes equal to the CPU run {same:.1%}, perplexity {pg:.3f} (cpu {pc:.3f}): {'ok' if good else 'FAILED'}")
raise SystemExit(0 if ok else 1)
PYEOF
gptq_status=${PIPESTATUS[0]}
if [ "$#" -eq 0 ]; then set -- --only 01 03 05 -p run_gptqmodel false; fi
python3 -m lessons_lib run --runs-dir /tmp/course-runs -p device cuda "$@" 2>&1 | tee -a "$out/run.log"
status=${PIPESTATUS[0]}
# Lesson 03 (GPTQ) on the GPU once more when the arguments above left it out.
if [[ " $* " != *" 03 "* && " $* " != *" 03_gptq "* ]]; then
  python3 -m lessons_lib run --runs-dir /tmp/course-runs-03 --only 03 -p device cuda -p run_gptqmodel false 2>&1 | tee -a "$out/run.log"
  status=$(( status || PIPESTATUS[0] ))
  cp /tmp/course-runs-03/*/summary.md "$out/summary_03.md" 2>/dev/null
fi
cp /tmp/course-runs/*/summary.md /tmp/course-runs/*/summary.json "$out/" 2>/dev/null
[ "$status" -eq 0 ] && exit "$gptq_status"
exit "$status"
