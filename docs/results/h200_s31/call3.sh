# call 3 (carry runs/gpu-site.tar.xz): the two changes of this session (fla's conv ops take inductor's padded rows;
# l2norm as an rms_norm) against the code before them (72ea121's two files in old/; the tree the call ran in held the branch's), GPU kernels of one compiled
# training step at batch 16 (default options: combo kernels), each tree its own process, then HF Llama beside the
# new tree; then the GPU tests of the changed paths (new tree), and the new no-copy test on the old tree (must fail)
t0=$(date +%s)
mkdir -p /tmp/site /tmp/kcache && tar -xJf runs/gpu-site.tar.xz -C /tmp/site
. docs/results/h200_s31/env.sh
rm -rf /tmp/old && mkdir -p /tmp/old && cp -r llamathink benchmarks tests setup.py /tmp/old/ && cp old/llamathink/*.py /tmp/old/llamathink/  # old/llamathink: git show 72ea121:llamathink/<modeling_llamathink.py, kernels_llamathink.py>
python -c "import torch, triton, fla, transformers; print(torch.__version__, triton.__version__, fla.__version__, transformers.__version__)"
mkdir -p $OUT/c3
s=$(date +%s)
(cd /tmp/old && PYTHONPATH=/tmp/site:/tmp/old:/tmp/old/tests timeout 150 python benchmarks/profile_gpu.py --compile --no-eager --no-decode --top-kernels 60 --batch 16 --backend fla > $OUT/c3/kinds_b16_old.txt 2>&1)
echo "== old rc=$? $(( $(date +%s) - s )) s"; grep -E "^  [a-zA-Z].* ms .*%|wall time|GPU kernel time" $OUT/c3/kinds_b16_old.txt
s=$(date +%s)
timeout 200 python benchmarks/profile_gpu.py --compile --no-eager --no-decode --top-kernels 60 --batch 16 --backend fla --peers hf-llama > $OUT/c3/kinds_b16_new.txt 2>&1
echo "== new rc=$? $(( $(date +%s) - s )) s"; grep -E "^  [a-zA-Z].* ms .*%|wall time|GPU kernel time" $OUT/c3/kinds_b16_new.txt
t() { local name=$1 dir=$2; shift 2; ( s=$(date +%s); cd $dir && PYTHONPATH=/tmp/site:$dir:$dir/tests timeout $(( 590 - $(date +%s) + t0 )) python -m pytest -v -p no:cacheprovider --tb=short -rfEs --durations=6 tests/test_gpu.py -k "$@" > $OUT/c3/$name.log 2>&1; echo "== $name rc=$? $(( $(date +%s) - s )) s" ) & }
t conv $PWD "fla_causal_conv or hands_its_padded or fla_chunk_matches or compiled_fla_training"
t layers $PWD "(compiled_layers_train_like_eager or packed_training_on_gpu) and not flash_qla"
t graphs $PWD "(cuda_graph_gradients_equal and bf16 and not flash_qla and not torch) or cuda_graph_replay_trains"
t old /tmp/old "hands_its_padded"
wait
grep -h -E "PASSED|FAILED|ERROR|passed|failed|s call|^E  .*assert" $OUT/c3/{conv,layers,graphs,old}.log | head -60
echo "total $(( $(date +%s) - t0 )) s"
