# call B (session 38): (1) the ptxas probe; (2) GPU tests of the working tree: FlexAttention CSA against the SDPA
# model, the prebuild child after the ptxas changed; (3) the compiled batch-16 step of the working tree (CSA through
# FlexAttention) with HF Llama compiled beside it, then of main (treeM, HEAD) in its own process
. gpu_s38/common.sh
W=/tmp/r/cB; mkdir -p $W
python -c "import torch, triton, fla, transformers; print(torch.__version__, triton.__version__, fla.__version__, transformers.__version__)" 2>&1 | tail -1
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader
( PYTHONPATH=/tmp/site TORCHINDUCTOR_CACHE_DIR=/tmp/kcache/ind_d env -u TRITON_PTXAS_PATH timeout 60 python gpu_s38/diag_ptxas.py > $W/diag.txt 2>&1; cat $W/diag.txt | tail -5 )
T=tests/test_gpu.py
( s=$(date +%s); PYTHONPATH=/tmp/site:$R:$R/tests TORCHINDUCTOR_CACHE_DIR=/tmp/kcache/ind_tf timeout 220 python -m pytest -v -p no:cacheprovider --timeout 200 --tb=short -rfEs $T -k "flex_attention_with_the_sdpa or after_the_ptxas_changed" > $W/test_B.log 2>&1; echo "== tests rc=$? $(( $(date +%s) - s )) s"; grep -E "PASSED|FAILED|passed|failed|^E  " $W/test_B.log | cut -c1-800 | head -20 )
tar -czf $OUT/cB.tgz -C /tmp/r cB
p F16 $R $(left 440) 16 /tmp/kcache/ind_F16 --peers hf-llama
tar -czf $OUT/cB.tgz -C /tmp/r cB
p M16 $R/gpu_s38/treeM $(left 580) 16 /tmp/kcache/ind_M16
tar -czf $OUT/cB.tgz -C /tmp/r cB
echo "total $(( $(date +%s) - t0 )) s"
