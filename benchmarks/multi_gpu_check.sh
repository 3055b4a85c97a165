#!/usr/bin/env bash
# Multi-GPU check of train_hf.py (issue 6), run from the repository root on a machine with N GPUs:
#   bash benchmarks/multi_gpu_check.sh N STEPS LONG_STEPS DATA_JSONL_GZ TOKENIZER_MODEL OUT
# Defaults: 2 50 300 .gpu-data/english-docs.jsonl.gz .gpu-data/tokenizer.model runs/multigpu. N is 2, 4 or 8 (the
# counts with an accelerate_configs/ddp_<N>gpu.yaml; in runs 1 and 2 each GPU takes 16 / N rows). The documents
# and the tokenizer are not in the repository: DATA_JSONL_GZ is prepared with TOKENIZER_MODEL into DATA_DIR (default
# runs/english/data) unless that folder holds a meta.json already, and every run loads TOKENIZER_MODEL.
# 1) the same global batch (16 x 1024) on 1 GPU and on N GPUs for STEPS steps: the loss curves must agree within
#    bf16 noise (each rank reads different windows; DDP averages the gradients; Muon shards its work over ranks);
# 2) checkpoints move: the N-GPU run's mid-way checkpoint resumes on 1 GPU and the 1-GPU one on N GPUs, and both
#    continuations follow the uninterrupted curves;
# 3) LONG_STEPS steps on N GPUs at the 1-GPU per-device batch (16): the longer run on real text, and tokens/s per
#    GPU against run 1's 1-GPU tokens/s = scaling efficiency.
# Uses accelerate_configs/ddp_<N>gpu.yaml. NVLink multicast stays off (the lending machines require it; it buys
# nothing at this size). Every run's log and history.json stay in OUT; the summary is OUT/summary.txt.
# For a dry run of the script itself on CPU (tiny model, gloo):
#   DATA_DIR=runs/quickstart/data LAUNCH="accelerate launch --cpu --num_processes 2" \
#   EXTRA_ARGS="--model_config configuration/models/llamathink-tiny.json --seq_len 64 --mixed_precision no" \
#   bash benchmarks/multi_gpu_check.sh 2 8 6 - builtin /tmp/mgc
set -euo pipefail
N=${1:-2}; STEPS=${2:-50}; LONG=${3:-300}; DATA=${4:-.gpu-data/english-docs.jsonl.gz}
TOK=${5:-.gpu-data/tokenizer.model}; OUT=${6:-runs/multigpu}
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1 PYTHONUNBUFFERED=1
HALF=$((STEPS / 2)); DATA_DIR=${DATA_DIR:-runs/english/data}
LAUNCH=${LAUNCH:-accelerate launch --config_file accelerate_configs/ddp_${N}gpu.yaml}
read -r -a extra <<< "${EXTRA_ARGS:-}"
mkdir -p "$OUT"
if [ ! -f "$DATA_DIR/meta.json" ]; then
  python3 -m llamathink.data prepare --input "$DATA" --tokenizer "$TOK" --out "$DATA_DIR" --val-docs 100 \
    --workers 16 --no-progress
fi
common=(--config configuration/train/english_docs_1gpu.yaml --data_dir "$DATA_DIR" --tokenizer "$TOK"
        --max_steps "$STEPS" --warmup_steps 5 --eval_every $((HALF / 2 > 0 ? HALF / 2 : 1)) --eval_batches 4
        --sample_every 100000 --save_every "$HALF" --keep_last 2 --log_every 5 --wandb_mode disabled --seed 7
        ${extra[@]+"${extra[@]}"})
one() { python3 train_hf.py "${common[@]}" --micro_batch_size 16 "$@"; }
many() { $LAUNCH train_hf.py "${common[@]}" "$@"; }
stage() { echo "== $1 ($(date +%T))"; }

stage "1 GPU, batch 16"
one --out_dir "$OUT/gpu1" --resume none --overwrite true > "$OUT/gpu1.log" 2>&1
stage "$N GPUs, batch $((16 / N)) each (same global batch)"
many --out_dir "$OUT/gpu$N" --micro_batch_size $((16 / N)) --resume none --overwrite true > "$OUT/gpu$N.log" 2>&1
# resume from the other run's mid-way checkpoint: a copy of it is the only checkpoint in a fresh out_dir
for pair in "gpu$N:to1" "gpu1:to$N"; do
  src=${pair%%:*}; dst="$OUT/${src}_${pair##*:}"
  rm -rf "$dst" && mkdir -p "$dst/checkpoints"
  for ckpt in "$OUT/$src"/checkpoints/step_*; do
    name=$(basename "$ckpt"); [ "$((10#${name#step_}))" = "$HALF" ] && cp -r "$ckpt" "$dst/checkpoints/"
  done
  [ -n "$(ls "$dst/checkpoints")" ] || { echo "no checkpoint of step $HALF in $OUT/$src"; exit 1; }
done
stage "resume the $N-GPU checkpoint of step $HALF on 1 GPU"
one --out_dir "$OUT/gpu${N}_to1" --resume auto > "$OUT/gpu${N}_to1.log" 2>&1
stage "resume the 1-GPU checkpoint of step $HALF on $N GPUs"
many --out_dir "$OUT/gpu1_to$N" --micro_batch_size $((16 / N)) --resume auto > "$OUT/gpu1_to$N.log" 2>&1
stage "$N GPUs, batch 16 each, $LONG steps"
many --out_dir "$OUT/gpu${N}_long" --micro_batch_size 16 --max_steps "$LONG" --eval_every 100 --save_every 100000 \
  --resume none --overwrite true > "$OUT/gpu${N}_long.log" 2>&1
stage "summary"
python3 - "$OUT" "$N" "$HALF" <<'PY' | tee "$OUT/summary.txt"
import json, sys
out, n, half = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
def hist(name):
    h = json.load(open(f"{out}/{name}/history.json"))
    return {int(k): v for k, v in h["losses"].items()}, h
def compare(a, b, steps):
    diffs = [abs(a[s] - b[s]) / abs(b[s]) for s in steps]
    return f"max rel |diff| {max(diffs):.2e}, mean {sum(diffs) / len(diffs):.2e} over steps {steps[0]}-{steps[-1]}"
l1, h1 = hist("gpu1")
ln, hn = hist(f"gpu{n}")
r1, _ = hist(f"gpu{n}_to1")
rn, _ = hist(f"gpu1_to{n}")
steps = sorted(l1)
print(f"1 GPU vs {n} GPUs, same global batch: {compare(ln, l1, steps)}")
print(f"  loss at steps 1/{half}/{steps[-1]}: 1 GPU {l1[1]:.4f}/{l1[half]:.4f}/{l1[steps[-1]]:.4f}, "
      f"{n} GPUs {ln[1]:.4f}/{ln[half]:.4f}/{ln[steps[-1]]:.4f}")
print("  eval 1 GPU:", h1["eval"], f"| eval {n} GPUs:", hn["eval"])
later = [s for s in steps if s > half]
print(f"{n}-GPU checkpoint resumed on 1 GPU vs uninterrupted {n}-GPU run: {compare(r1, ln, later)}")
print(f"1-GPU checkpoint resumed on {n} GPUs vs uninterrupted 1-GPU run: {compare(rn, l1, later)}")
lt, ht = hist(f"gpu{n}_long")
print(f"{n} GPUs, batch 16 each: loss {lt[1]:.3f} -> {lt[max(lt)]:.3f} over {max(lt)} steps; eval {ht['eval']}")
def tps(h):  # median tokens/s of the logged windows after the first two (warm-up, first eval)
    v = [m["perf/tokens_per_s"] for m in h["perf"].values()]
    v = sorted(v[2:] or v)
    return v[len(v) // 2]
t1, tn = tps(h1), tps(ht)
print(f"tokens/s (median of logged windows): 1 GPU {t1:,.0f}; {n} GPUs {tn:,.0f} = {tn / n:,.0f} per GPU; "
      f"scaling efficiency {tn / (n * t1):.1%}")
PY
