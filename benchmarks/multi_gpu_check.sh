#!/usr/bin/env bash
# Multi-GPU check of train_hf.py (issue 6), run from the repository root on a machine with N GPUs:
#   bash benchmarks/multi_gpu_check.sh N STEPS DATA_JSONL_GZ TOKENIZER_MODEL OUT
# 1) the same global batch (16 x 1024) on 1 GPU and on N GPUs: the loss curves must agree within bf16 noise;
# 2) N GPUs at the 1-GPU per-device batch (16): tokens/s per GPU against 1 GPU = scaling efficiency.
# NVLink multicast stays off (the lending machines require it; it buys nothing at this size).
set -euo pipefail
N=${1:-2}; STEPS=${2:-40}; DATA=${3:-.gpu-data/english-docs.jsonl.gz}; TOK=${4:-.gpu-data/tokenizer.model}
OUT=${5:-runs/multigpu}
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1 PYTHONUNBUFFERED=1
mkdir -p "$OUT"
if [ ! -f runs/english/data/meta.json ]; then
  python3 -m llamathink.data prepare --input "$DATA" --tokenizer "$TOK" --out runs/english/data --val-docs 100 \
    --workers 16 --no-progress
fi
common=(--config configuration/train/english_docs_1gpu.yaml --tokenizer "$TOK" --max_steps "$STEPS" --warmup_steps 5
        --eval_every 20 --eval_batches 4 --sample_every 100000 --save_every 100000 --log_every 5 --wandb_mode disabled
        --seed 7 --resume none)
python3 train_hf.py "${common[@]}" --out_dir "$OUT/gpu1_b16" --micro_batch_size 16 > "$OUT/gpu1_b16.log" 2>&1
accelerate launch --multi_gpu --num_processes "$N" --mixed_precision bf16 train_hf.py "${common[@]}" \
  --out_dir "$OUT/gpu${N}_b$((16 / N))" --micro_batch_size $((16 / N)) > "$OUT/gpu${N}_same_global.log" 2>&1
accelerate launch --multi_gpu --num_processes "$N" --mixed_precision bf16 train_hf.py "${common[@]}" \
  --max_steps 20 --out_dir "$OUT/gpu${N}_b16" --micro_batch_size 16 > "$OUT/gpu${N}_b16.log" 2>&1
python3 - "$OUT" "$N" <<'PY'
import json, sys
out, n = sys.argv[1], int(sys.argv[2])
h1 = json.load(open(f"{out}/gpu1_b16/history.json"))
hn = json.load(open(f"{out}/gpu{n}_b{16 // n}/history.json"))
ht = json.load(open(f"{out}/gpu{n}_b16/history.json"))
l1, ln = h1["losses"], hn["losses"]
diffs = [abs(l1[s] - ln[s]) for s in l1 if s in ln]
print("loss 1 GPU vs", n, "GPUs, same global batch: max |diff| over", len(diffs), "steps =", max(diffs))
print("eval 1 GPU:", h1["eval"], f"\neval {n} GPUs:", hn["eval"])
def tps(h):  # median tokens/s of the logged windows after the first
    v = sorted(m["perf/tokens_per_s"] for k, m in list(h["perf"].items())[1:])
    return v[len(v) // 2]
t1, tn = tps(h1), tps(ht)
print(f"tokens/s: 1 GPU {t1:,.0f}; {n} GPUs {tn:,.0f} ({tn / n:,.0f} per GPU); scaling efficiency {tn / (n * t1):.1%}")
PY
