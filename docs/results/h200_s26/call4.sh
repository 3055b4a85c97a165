# batch 64 (the FineWeb recipe's micro-batch): auto (CUDA graphs) against default, tokens/s and peak memory;
# then the loss change's profile at batch 16 against the tree before it (1253bc8), HF Llama beside
set -u
. gpu_s26/env.sh
L() { local name=$1; shift; timeout ${LT:-130} python train_hf.py --config configuration/train/english_docs_1gpu.yaml \
  --data_dir /tmp/data/english200 --out_dir /tmp/loop_$name --compile true --max_steps 60 --eval_every 60 \
  --micro_batch_size 64 --eval_batches 2 --sample_every 100000 --wandb_mode disabled --log_every 20 --progress_bar false \
  --tokenizer /tmp/llama2-tokenizer.model "$@" > $OUT/loop_$name.log 2>&1; echo "== $name"
  grep -E "compile_mode|tok|peak|Error" $OUT/loop_$name.log | cut -c1-200 | tail -5; }
L b64_auto
L b64_default --compile_mode default
prof() { local limit=$1 name=$2; shift 2; timeout "$limit" python benchmarks/profile_gpu.py --compile \
    --no-eager --no-decode --top-kernels 40 --batch 16 "$@" > "$OUT/kinds_$name.txt" 2>&1
    echo "== $name"; grep -E "^  [a-zA-Z].* ms .*%|wall time" "$OUT/kinds_$name.txt" || tail -3 "$OUT/kinds_$name.txt"; }
prof 150 b16 --peers hf-llama
(cd /tmp/old && PYTHONPATH=/tmp/old:/tmp/site prof 90 b16_old) 
