# call B (session 43, fresh or call A's machine): the training loop as users run it (train_hf.py, fla's kernels,
# CUDA graphs, Muon) against bench_quality's loop of the same model and HF Llama (Muon, no per-step read of the
# loss), one machine; then the owed GPU test of the training loop (host-checked batches, pinned copies)
[ -d /tmp/site/fla ] || { mkdir -p /tmp/site /tmp/kcache && tar -xJf runs/gpu-site-fla.tar.xz -C /tmp/site; }
. docs/results/h200_s36/common.sh
W=/tmp/r/cB; mkdir -p $W /tmp/data
[ -d /tmp/data/english1k ] || tar -xJf runs/english1k.tar.xz -C /tmp/data
python - <<'PY'
import json; c = json.load(open("configuration/models/llamathink-95m.json")); c["gdn_backend"] = "fla"
json.dump(c, open("/tmp/m_fla.json", "w"))
PY
( s=$(date +%s); timeout 150 python train_hf.py --config configuration/train/english_docs_1gpu.yaml --model_config /tmp/m_fla.json --tokenizer runs/llama2-tokenizer.model --data_dir /tmp/data/english1k --out_dir /tmp/r/run --compile true --max_steps 160 --log_every 20 --eval_every 100000 --sample_every 100000 --wandb_mode disabled --progress_bar false > $W/train.log 2>&1; echo "== train rc=$? $(( $(date +%s) - s )) s"; grep -E "^step|compile|kernels|error" $W/train.log | head -20 )
( s=$(date +%s); timeout 200 python benchmarks/bench_quality.py --data /tmp/data/english1k --val-docs 50 --steps 160 --eval-every 160 --eval-windows 4 --speed-from 40 --out $W/q --run lt:compile=1,gdn_backend=fla --run llama:model=hf-llama,compile=1,compile_mode=reduce-overhead,combo_kernels=1 > $W/quality.log 2>&1; echo "== quality rc=$? $(( $(date +%s) - s )) s"; grep -E "final|first|Error" $W/quality.log | head )
tar -czf $OUT/cB.tgz -C /tmp/r cB
t loop $R $(left 590) "default_compiled_pretraining_replays"
tar -czf $OUT/cB.tgz -C /tmp/r cB
echo "total $(( $(date +%s) - t0 )) s"
