# call B (session 48, straight after call A, on its machine where it is still warm): the targets not measured lately,
# on this tree: eager LlamaThink (fla) against eager HF Qwen3.5 (fla's kernels too); batch 64 with FlashQLA against
# HF Llama; hyper-connections off against on (FlashQLA, batch 16); then the new tree and main once more at batch 16
[ -d /tmp/site/fla ] || { mkdir -p /tmp/site /tmp/kcache && tar -xJf runs/gpu-site-slim.tar.xz -C /tmp/site; }
. docs/results/h200_s36/common.sh
W=/tmp/r/cB; mkdir -p $W; [ -d /tmp/main/llamathink ] || { mkdir -p /tmp/main && tar -xzf runs/main_tree.tar.gz -C /tmp/main; }
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader > $W/gpu.txt; ls /tmp/kcache >> $W/gpu.txt
# e NAME LIMIT MODELS BUDGET [args]: bench_gpu rows of this tree with extra arguments
e() { local name=$1 lim=$2 models=$3 budget=$4; shift 4; ( s=$(date +%s); PYTHONPATH=/tmp/site:$R:$R/tests timeout $lim python benchmarks/bench_gpu.py --no-generate --models $models --budget-s $budget --out $W/bench_$name.json "$@" > $W/bench_$name.txt 2>&1; echo "== bench $name rc=$? $(( $(date +%s) - s )) s"; grep '"model"' $W/bench_$name.txt | cut -c1-330 ); }
e eager 150 llamathink:fla,hf-qwen3.5 70
tar -czf $OUT/cB.tgz -C /tmp/r cB
e b64 250 llamathink:flash_qla:cudagraphs:prebuild,hf-llama:cudagraphs 120 --compiled-only --batch 64
tar -czf $OUT/cB.tgz -C /tmp/r cB
e nohc 150 llamathink:flash_qla:cudagraphs:no-hc,llamathink:flash_qla:cudagraphs 70 --compiled-only
tar -czf $OUT/cB.tgz -C /tmp/r cB
echo "total $(( $(date +%s) - t0 )) s"
