# call A (session 43, fresh machine): the attention's q/k/v and the MLP's gate/up projections as one product of
# stacked weights (`stacked_linear`, this tree) against main (this tree with HEAD d6d5712's modeling file,
# runs/main_modeling.py.gz), bench_gpu with
# CUDA graphs at batch 16 on fla's kernels, traces; HF Llama beside; then the owed GPU test of the training loop
# and train_hf.py's tokens/s (fla kernels, CUDA graphs)
# fla's site without FlashQLA (runs/gpu-site-fla.tar.xz: the files must stay under 64 MiB with the data)
[ -d /tmp/site/fla ] || { mkdir -p /tmp/site /tmp/kcache && tar -xJf runs/gpu-site-fla.tar.xz -C /tmp/site; }
. docs/results/h200_s36/common.sh
W=/tmp/r/cA; mkdir -p $W /tmp/main /tmp/data
cp -r llamathink benchmarks tests configuration train_hf.py /tmp/main/
gunzip -c runs/main_modeling.py.gz > /tmp/main/llamathink/modeling_llamathink.py; tar -xJf runs/english1k.tar.xz -C /tmp/data
python -c "import torch, triton, fla, transformers; print(torch.__version__, triton.__version__, fla.__version__, transformers.__version__)" 2>&1 | tail -1
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader
b() { local name=$1 dir=$2 lim=$3 models=$4; ( s=$(date +%s); cd $dir && PYTHONPATH=/tmp/site:$dir timeout $lim python benchmarks/bench_gpu.py --compiled-only --no-generate --steps 30 --models $models --budget-s 150 --trace $W/traces_$name --out $W/bench_$name.json > $W/bench_$name.txt 2>&1; echo "== bench $name rc=$? $(( $(date +%s) - s )) s"; grep '"model"' $W/bench_$name.txt | cut -c1-600 ); }
b main /tmp/main 160 llamathink:fla:cudagraphs
b stacked $R 320 llamathink:fla:cudagraphs,hf-llama:cudagraphs
tar -czf $OUT/cA.tgz -C /tmp/r cA
t loop $R $(left 430) "default_compiled_pretraining_replays"
tar -czf $OUT/cA.tgz -C /tmp/r cA
python - <<'PY'
import json; c = json.load(open("configuration/models/llamathink-95m.json")); c["gdn_backend"] = "fla"
json.dump(c, open("/tmp/m_fla.json", "w"))
PY
( s=$(date +%s); timeout $(left 590) python train_hf.py --config configuration/train/english_docs_1gpu.yaml --model_config /tmp/m_fla.json --data_dir /tmp/data/english1k --out_dir /tmp/r/run --compile true --max_steps 140 --log_every 20 --eval_every 100000 --sample_every 100000 --wandb_mode disabled --progress_bar false > $W/train.log 2>&1; echo "== train rc=$? $(( $(date +%s) - s )) s"; grep -E "^step|compile|kernels" $W/train.log | head -20 )
tar -czf $OUT/cA.tgz -C /tmp/r cA
echo "total $(( $(date +%s) - t0 )) s"
