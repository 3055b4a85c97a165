# the training loop at batch 16: compile_mode auto (CUDA graphs) against default, HF Llama compiled beside
set -u
. gpu_s26/env.sh
L() { local name=$1; shift; timeout ${LT:-170} python train_hf.py --config configuration/train/english_docs_1gpu.yaml \
  --data_dir /tmp/data/english200 --out_dir /tmp/loop_$name --compile true --max_steps ${STEPS:-200} --eval_every 200 \
  --eval_batches 4 --sample_every 100000 --wandb_mode disabled --log_every 50 --progress_bar false \
  --tokenizer /tmp/llama2-tokenizer.model "$@" > $OUT/loop_$name.log 2>&1; echo "== $name"
  grep -E "compile_mode|tok|peak|step 200|Error" $OUT/loop_$name.log | cut -c1-220 | tail -7; }
L auto
L default --compile_mode default
L auto_2
timeout 170 python benchmarks/bench_quality.py --data /tmp/data/english200 --steps 200 --eval-every 200 --eval-windows 16 \
  --speed-from 50 --out $OUT/llama --run hf-llama:model=hf-llama,compile=1 > $OUT/loop_llama.log 2>&1
echo "== hf-llama"; grep -iE "tok|final" $OUT/loop_llama.log | tail -4
