# call B (session 44, fresh machine): the optimizer's GPU tests again (the eager step now shares the graph's
# arithmetic), bench_optimizer.py for this tree and main's, then train_hf.py (fla's kernels, CUDA graphs, Muon,
# batch 16 x 1024) with this tree's optimizer and main's (HEAD 203fbdd, runs/main_tree.tar.gz), one after the other,
# and HF Llama's training loop (bench_quality's: Muon, compiled, CUDA graphs) as the peer in the same call
[ -d /tmp/site/fla ] || { mkdir -p /tmp/site /tmp/kcache && tar -xJf runs/gpu-site-fla.tar.xz -C /tmp/site; }
. docs/results/h200_s36/common.sh
W=/tmp/r/cB; mkdir -p $W /tmp/data /tmp/main
[ -d /tmp/data/english1k ] || tar -xJf runs/english1k.tar.xz -C /tmp/data
tar -xzf runs/main_tree.tar.gz -C /tmp/main
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader
python -c "import torch, transformers, triton; print(torch.__version__, transformers.__version__, triton.__version__)"
( s=$(date +%s); timeout 100 python -m pytest -q -p no:cacheprovider -rfEs tests/test_muon.py -m gpu > $W/test_muon.log 2>&1; echo "== muon gpu tests rc=$? $(( $(date +%s) - s )) s"; tail -3 $W/test_muon.log )
bo() { ( s=$(date +%s); cd $2 && PYTHONPATH=/tmp/site:$2 timeout $3 python benchmarks/bench_optimizer.py --models llamathink --out $W/optimizer_$1.json > $W/optimizer_$1.log 2>&1; echo "== bench_optimizer $1 rc=$? $(( $(date +%s) - s )) s"; grep '"muon"' $W/optimizer_$1.log | cut -c1-200 ); }
bo new $R 60
bo main /tmp/main 60
python - <<'PY'
import json; c = json.load(open("configuration/models/llamathink-95m.json")); c["gdn_backend"] = "fla"
json.dump(c, open("/tmp/m_fla.json", "w"))
PY
trn() { local name=$1 dir=$2; ( s=$(date +%s); cd $dir && PYTHONPATH=/tmp/site:$dir timeout $3 python train_hf.py --config configuration/train/english_docs_1gpu.yaml --model_config /tmp/m_fla.json --tokenizer $R/runs/llama2-tokenizer.model --data_dir /tmp/data/english1k --out_dir /tmp/r/run_$name --compile true --max_steps 200 --log_every 20 --eval_every 100000 --sample_every 100000 --wandb_mode disabled --progress_bar false > $W/train_$name.log 2>&1; echo "== train $name rc=$? $(( $(date +%s) - s )) s"; grep -E "^step" $W/train_$name.log | tr '\n' ' ' | cut -c1-1200; echo; cp /tmp/r/run_$name/history.json $W/history_$name.json ); }
trn new $R 140
trn main /tmp/main 110
tar -czf $OUT/cB.tgz -C /tmp/r cB
( s=$(date +%s); timeout $(left 560) python benchmarks/bench_quality.py --data /tmp/data/english1k --val-docs 50 --steps 160 --eval-every 160 --eval-windows 4 --speed-from 40 --out $W/q --run llama:model=hf-llama,compile=1,compile_mode=reduce-overhead,combo_kernels=1 > $W/quality.log 2>&1; echo "== quality rc=$? $(( $(date +%s) - s )) s"; grep -E "final|first|tokens|Error" $W/quality.log | head )
tar -czf $OUT/cB.tgz -C /tmp/r cB
echo "total $(( $(date +%s) - t0 )) s"
