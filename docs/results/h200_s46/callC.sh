# call C (session 46, fresh machine): the compiled layers' static inputs (RoPE tables of whole rows and CSA's
# FlexAttention masks marked static: CUDA graphs read them in place) and the embedding's index_add backward, against
# main (28a5474, runs/main_tree.tar.gz) with FlashQLA's kernels, HF Llama beside; GPU tests of the change first
[ -d /tmp/site/fla ] || { mkdir -p /tmp/site /tmp/kcache && tar -xJf runs/gpu-site-trim.tar.xz -C /tmp/site; }
. docs/results/h200_s36/common.sh
W=/tmp/r/cC; mkdir -p $W /tmp/main && tar -xzf runs/main_tree.tar.gz -C /tmp/main
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader
python -c "import torch, transformers, triton; print(torch.__version__, transformers.__version__, triton.__version__)"
t new $R 150 "embedding_lookup or flex_attention_with_the_sdpa or compiled_runs_of_layers"
tar -czf $OUT/cC.tgz -C /tmp/r cC
b() { local dir=$1; shift; ( s=$(date +%s); cd $dir && PYTHONPATH=/tmp/site:$dir:$dir/tests timeout $2 python benchmarks/bench_gpu.py --compiled-only --no-generate --models $3 --budget-s $4 --trace $W/traces_$1 --out $W/bench_$1.json > $W/bench_$1.txt 2>&1; echo "== bench $1 rc=$? $(( $(date +%s) - s )) s"; grep '"model"' $W/bench_$1.txt | cut -c1-330 ); }
b $R new1 $(left 320) llamathink:flash_qla:cudagraphs:prebuild,llamathink:flash_qla:cudagraphs 80
tar -czf $OUT/cC.tgz -C /tmp/r cC
b /tmp/main main $(left 430) llamathink:flash_qla:cudagraphs,hf-llama:cudagraphs 45
tar -czf $OUT/cC.tgz -C /tmp/r cC
b $R new2 $(left 525) llamathink:flash_qla:cudagraphs 45
tar -czf $OUT/cC.tgz -C /tmp/r cC
echo "total $(( $(date +%s) - t0 )) s"
