# call F (session 43, fresh machine): train_hf.py (fla's kernels, CUDA graphs, Muon, batch 16 x 1024) with each
# step's loss and gradient norm read two steps late (`StepValues`, this tree) against main's loop (HEAD d6d5712's
# loop.py, runs/main_loop.py.gz), which waits for both before each update; one machine, one after the other
[ -d /tmp/site/fla ] || { mkdir -p /tmp/site /tmp/kcache && tar -xJf runs/gpu-site-fla.tar.xz -C /tmp/site; }
. docs/results/h200_s36/common.sh
W=/tmp/r/cF; mkdir -p $W /tmp/data /tmp/main
[ -d /tmp/data/english1k ] || tar -xJf runs/english1k.tar.xz -C /tmp/data
cp -r llamathink configuration train_hf.py /tmp/main/; gunzip -c runs/main_loop.py.gz > /tmp/main/llamathink/train/loop.py
python - <<'PY'
import json; c = json.load(open("configuration/models/llamathink-95m.json")); c["gdn_backend"] = "fla"
json.dump(c, open("/tmp/m_fla.json", "w"))
PY
trn() { local name=$1 dir=$2; ( s=$(date +%s); cd $dir && PYTHONPATH=/tmp/site:$dir timeout $3 python train_hf.py --config configuration/train/english_docs_1gpu.yaml --model_config /tmp/m_fla.json --tokenizer $R/runs/llama2-tokenizer.model --data_dir /tmp/data/english1k --out_dir /tmp/r/run_$name --compile true --max_steps 200 --log_every 20 --eval_every 100000 --sample_every 100000 --wandb_mode disabled --progress_bar false > $W/train_$name.log 2>&1; echo "== train $name rc=$? $(( $(date +%s) - s )) s"; grep -E "^step" $W/train_$name.log | tr '\n' ' ' | cut -c1-900; echo; cp /tmp/r/run_$name/history.json $W/history_$name.json ); }
trn deferred $R 150
trn main /tmp/main 120
trn deferred2 $R 100
tar -czf $OUT/cF.tgz -C /tmp/r cF
echo "total $(( $(date +%s) - t0 )) s"
