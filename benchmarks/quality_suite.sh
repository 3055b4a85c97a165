#!/usr/bin/env bash
# The GPU runs behind BENCHMARKS.md section 2 (equal-token quality), in commands of under 10 minutes each on a
# two-GPU machine (kind nvidia-h200-x2), with fla-core + tilelang installed (../shared/gpu/stage-wheels.sh) and the
# English sample prepared with 200 held-out documents (100 validation + 100 test):
#   python -m llamathink.data prepare --input english-docs.jsonl.gz --tokenizer llama2-tokenizer.model \
#       --out runs/english200 --val-docs 200
#   DATA=runs/english200 OUT=results bash benchmarks/quality_suite.sh ablate  # init ablations + lr sweeps, eager
#   DATA=runs/english200 OUT=results bash benchmarks/quality_suite.sh ablate2 # the same at the new default
#   DATA=runs/english200 OUT=results bash benchmarks/quality_suite.sh packed  # document masking on vs off
#   DATA=runs/english200 OUT=results bash benchmarks/quality_suite.sh final   # 800 steps: ours vs HF Qwen3.5 vs
#                                                                           # HF Llama on GPU 0; rest of the sweep
#   DATA=runs/english200 OUT=results bash benchmarks/quality_suite.sh long    # the three models at 1600 steps
#   DATA=runs/english200 OUT=results bash benchmarks/quality_suite.sh seeds   # 800 steps, model seeds 0-2 of each
#                                                                           # model (ours + HF Llama on GPU 0)
#   DATA=runs/english200 OUT=results bash benchmarks/quality_suite.sh seeds_long  # 1600 steps: ours at seeds
#                                                                           # 1 and 2, the peers at seed 1
#   DATA=runs/english200 OUT=results bash benchmarks/quality_suite.sh csa     # the CSA layers over seeds: their
#                                                                           # compressors' init and optimizer, the
#                                                                           # pattern; CUDA-graph GPU tests first
#   DATA=runs/english200 OUT=results bash benchmarks/quality_suite.sh csa3    # paired controls: Qwen3.5's pattern
#                                                                           # from the default's own weights, CSA's
#                                                                           # window alone, window + blocks in one
#                                                                           # softmax (csa_blend=joint)
#   DATA=runs/english200 OUT=results bash benchmarks/quality_suite.sh csa4    # the blend gate started closed (a
#                                                                           # learned bias at -4 / -2), seeds 0-2
#   DATA=runs/english200 OUT=results bash benchmarks/quality_suite.sh csa5    # CSA with NSA's top-k block selection
#                                                                           # (csa_blend=select), seeds 0-2
#   DATA=runs/english200 OUT=results bash benchmarks/quality_suite.sh csa6    # GPU 1 only: CSA with a 256-token window
#   DATA=runs/english200 OUT=results bash benchmarks/quality_suite.sh csa7    # GPU 1 only: that window alone
#   DATA=runs/english200 OUT=results bash benchmarks/quality_suite.sh csa8    # that window, the blend gate started closed
#   DATA=runs/english200 OUT=results bash benchmarks/quality_suite.sh cand    # the candidate default (window 256,
#                                                                           # gate started closed), HF Qwen3.5 and
#                                                                           # HF Llama, seeds 0-2, 800 steps
#   DATA=runs/english200 OUT=results bash benchmarks/quality_suite.sh cand_long  # the same at 1600 steps
#   DATA=runs/english200 OUT=results bash benchmarks/quality_suite.sh long5   # 1600 steps: the default and HF
#                                                                           # Qwen3.5 at seeds 3-4, a 512 window
#   DATA=runs/english200 OUT=results bash benchmarks/quality_suite.sh w512    # the 512 window at seeds 1-2, full
#                                                                           # attention in the CSA layers (1600)
#   DATA=runs/english200 OUT=results bash benchmarks/quality_suite.sh w512_1gpu  # w512's runs on one GPU
#   DATA=runs/english200 OUT=results bash benchmarks/quality_suite.sh w512_800   # the 512 window, 800 steps, seeds 0-2
#   DATA=runs/english200 OUT=results bash benchmarks/quality_suite.sh w512_long5 # the 512 window, 1600 steps, seeds 3-4
#   DATA=runs/english200 OUT=results bash benchmarks/quality_suite.sh sweep512   # today's default: Muon and AdamW
#                                                                           # lr sweeps, time to loss beside HF
#                                                                           # Llama, zero residual outputs s0-2
#   DATA=runs/english200 OUT=results bash benchmarks/quality_suite.sh more800    # seeds 3-4 of the default, the
#                                                                           # zero start and HF Qwen3.5; AdamW 0.001;
#                                                                           # the shipped fla configs' GPU test first
#   DATA=runs/english200 OUT=results bash benchmarks/quality_suite.sh zero1600   # the zero start, 1600 steps, s0-4
#   DATA=runs/english200 OUT=results bash benchmarks/quality_suite.sh csa2    # GPU 1 only: the CSA layer with its
#                                                                           # window over the whole sequence, and
#                                                                           # without compressed blocks
# The parts before `cand` ran when the default CSA layer was the seed's (csa_window 64, no blend bias): their
# "default" rows mean that model; rerun them as they ran at commit 14ef0ad. The parts from `cand` to `w512_long5`
# ran when the default window was 256 tokens (512 since session 16): their "default" rows mean csa_window=256
# (commit 3f9e9db), and W512 is today's default.
# The parts from `sweep512` on ran when the residual projections started N(0, 0.02) (commit 3a9dff0): their
# `default` rows mean that start (today `zero_init_residual=false`), and `init.residual_out=0` is today's default.
# `ablate` ran two eager processes per GPU: together they were no faster than one, so its seconds and tokens/s are
# not throughput figures. `final` times the three models one after the other in one process on GPU 0 (the
# time-to-loss comparison); `long` runs ours + HF Llama and HF Qwen3.5 in one process per GPU.
# Every process writes its JSON after each run; everything is packed into $OUT/results.tgz.
set -u
DATA=${DATA:?set DATA to a prepared folder}
OUT=${OUT:-results}
PART=${1:-ablate}
SECONDS_LEFT=${SECONDS_LEFT:-560}  # the wall-clock budget of a part's longest process
mkdir -p "$OUT" /tmp/kcache
export TRITON_CACHE_DIR=/tmp/kcache/triton TILELANG_CACHE_DIR=/tmp/kcache/tilelang PYTHONUNBUFFERED=1
export TORCHINDUCTOR_CACHE_DIR=/tmp/kcache/inductor
nvidia-smi --query-gpu=index,name,driver_version --format=csv,noheader | tee "$OUT/gpu.txt"
# Every part measures with fla's kernels: without them the runs would silently take the PyTorch GDN fallback.
python - <<'PY' || exit 2
import sys, torch
from llamathink.kernels_llamathink import _fla_ops, fla_backward_problem
if not torch.cuda.is_available():
    sys.exit("fla cannot train here: no CUDA device")
if _fla_ops() is None:
    sys.exit("fla cannot train here: it is not importable (install fla-core + tilelang)")
if fla_backward_problem(torch.device("cuda")):
    sys.exit(f"fla cannot train here: {fla_backward_problem(torch.device('cuda'))}")
PY
q() {  # q GPU LIMIT NAME [bench_quality.py args...]
    local gpu=$1 limit=$2 name=$3; shift 3
    CUDA_VISIBLE_DEVICES=$gpu timeout "$limit" python benchmarks/bench_quality.py --data "$DATA" \
        --out "$OUT/$name" "$@" > "$OUT/$name.log" 2>&1
}
A1='A_init_range=[1,16]'  # the lr sweep and the old init keep the seed's decay range, as in the first ablations
W512=compile=1,csa_window=512  # the 512-token CSA window (long5, w512*)
FULL=compile=1,pattern=linear/linear/full/full,init.shared_from_default=1  # full attention in the CSA layers, paired
if [ "$PART" = ablate ]; then
    # Four processes, two per GPU, about 300 s per run: only the FIRST run of each process finished inside the
    # call (2026-11-30); the others are the ablations still to measure, one process per GPU next time.
    q 0 560 init_a --run new-default:$A1 --run rescale-residual:rescale_prenorm_residual=true,$A1 \
        --run "old-init:rescale_prenorm_residual=true,init.conv=uniform,$A1" &
    q 0 560 init_b --run "A-0.01-16:A_init_range=[0.01,16]" --run "dt-0.001-0.1:dt_init_range=[0.001,0.1],$A1" \
        --run compress-identity:init.compress=identity,$A1 &
    q 1 560 sweep_muon --run muon-0.01:muon_lr=0.01,$A1 --run muon-0.04:muon_lr=0.04,$A1 \
        --run no-hc:hyper_connections=false,$A1 --run embed-0.05:init.embed=0.05,$A1 &
    q 1 560 sweep_adamw --run adamw-0.001:optimizer=adamw,adamw_lr=0.001,$A1 \
        --run adamw-0.002:optimizer=adamw,adamw_lr=0.002,$A1 --run adamw-0.004:optimizer=adamw,adamw_lr=0.004,$A1 &
    wait
elif [ "$PART" = ablate2 ]; then  # the init ablations at the new default, one eager process per GPU
    q 0 540 ablate2_a --run "dt-0.001-0.1:dt_init_range=[0.001,0.1]" --run embed-0.05:init.embed=0.05 \
        --run rescale-residual:rescale_prenorm_residual=true &
    q 1 540 ablate2_b --run no-hc:hyper_connections=false --run compress-identity:init.compress=identity \
        --run default-seed1:seed=1 &
    wait
elif [ "$PART" = packed ]; then  # document masking (issue 16): quality eager on GPU 0; GPU tests, then compiled speed
    q 0 545 packed_eager --run masked:document_masking=1 --run unmasked &
    (CUDA_VISIBLE_DEVICES=1 timeout 240 python -m pytest -q -p no:cacheprovider tests/test_gpu.py > "$OUT/test_gpu.log" 2>&1
     q 1 300 packed_compiled --steps 200 --eval-every 200 --eval-windows 64 \
        --run c-masked:compile=1,document_masking=1 --run c-unmasked:compile=1) &
    wait
    tail -5 "$OUT/test_gpu.log"
elif [ "$PART" = packed2 ]; then  # the same, shorter (400 steps), unmasked first; only the GPU tests of packing
    q 0 275 packed_400 --steps 400 --eval-every 400 --time-limit 150 --run unmasked --run masked:document_masking=1 &
    (CUDA_VISIBLE_DEVICES=1 timeout 270 python -m pytest -q -p no:cacheprovider tests/test_gpu.py \
        -k "variable_length or packed_training" > "$OUT/test_gpu.log" 2>&1) &
    wait
    tail -5 "$OUT/test_gpu.log"
elif [ "$PART" = final ]; then  # the new defaults against the peers (timed), and the rest of the sweep
    q 0 560 final_800 --steps 800 &
    q 1 560 sweep_rest --run adamw-0.002:optimizer=adamw,adamw_lr=0.002,$A1 \
        --run adamw-0.004:optimizer=adamw,adamw_lr=0.004,$A1 --run muon-0.04:muon_lr=0.04,$A1 \
        --run "old-init:rescale_prenorm_residual=true,init.conv=uniform,$A1" &
    wait
elif [ "$PART" = long ]; then  # 1600 steps; two GPUs, one process each
    q 0 560 final_1600 --steps 1600 --eval-every 200 --run llamathink:compile=1 --run hf-llama:model=hf-llama,compile=1 &
    q 1 560 final_1600_qwen --steps 1600 --eval-every 200 --run hf-qwen3.5:model=hf-qwen3.5 &
    wait
elif [ "$PART" = seeds ]; then  # the seed noise of the three-model comparison: each model at seeds 0, 1, 2
    q 0 590 seeds_800 --steps 800 --run lt-s0:compile=1 --run llama-s0:model=hf-llama,compile=1 \
        --run lt-s1:compile=1,seed=1 --run llama-s1:model=hf-llama,compile=1,seed=1 \
        --run lt-s2:compile=1,seed=2 --run llama-s2:model=hf-llama,compile=1,seed=2 &
    q 1 590 seeds_800_qwen --steps 800 --run qwen-s0:model=hf-qwen3.5 --run qwen-s1:model=hf-qwen3.5,seed=1 \
        --run qwen-s2:model=hf-qwen3.5,seed=2 &
    wait
elif [ "$PART" = seeds_long ]; then  # 1600 steps, ours at seeds 1 and 2, the peers at seed 1 (seed 0: `long`)
    q 0 590 seeds_1600 --steps 1600 --eval-every 200 --run lt-s1:compile=1,seed=1 \
        --run llama-s1:model=hf-llama,compile=1,seed=1 --run lt-s2:compile=1,seed=2 &
    q 1 590 seeds_1600_qwen --steps 1600 --eval-every 200 --run qwen-s1:model=hf-qwen3.5,seed=1 &
    wait
elif [ "$PART" = csa ]; then  # 800 steps, CUDA graphs (what compile=1 gives llamathink on a GPU now), eval every 200
    CG=compile=1,compile_mode=reduce-overhead
    CSA_ADAMW=adamw_suffixes=compress_k.weight/compress_v.weight/blend_proj.weight
    (CUDA_VISIBLE_DEVICES=0 timeout 260 python -m pytest -q -p no:cacheprovider tests/test_gpu.py -k cuda_graph \
        > "$OUT/test_gpu_cuda_graph.log" 2>&1
     q 0 $((SECONDS_LEFT - 270)) csa_a --steps 800 --eval-every 200 --run adamw-s0:$CG,$CSA_ADAMW \
        --run adamw-s1:$CG,$CSA_ADAMW,seed=1 --run qwenpattern-s0:$CG,pattern=linear/linear/full/full) &
    q 1 "$SECONDS_LEFT" csa_b --steps 800 --eval-every 200 --run identity-s0:$CG,init.compress=identity \
        --run identity-s1:$CG,init.compress=identity,seed=1 --run identity-s2:$CG,init.compress=identity,seed=2 \
        --run adamw-s2:$CG,$CSA_ADAMW,seed=2 --run qwenpattern-s1:$CG,pattern=linear/linear/full/full,seed=1 \
        --run default-s0:$CG &
    wait
    tail -5 "$OUT/test_gpu_cuda_graph.log"
elif [ "$PART" = csa2 ]; then  # which half of a CSA layer costs: csa_window=1024 makes the local path full causal
    # attention (the compressed path still blended in); csa_stride=1024 completes no block in a 1024 window (the
    # compressed path outputs 0, the local window alone, scaled by 1 - blend)
    CG=compile=1,compile_mode=reduce-overhead
    q 1 "$SECONDS_LEFT" csa_c --steps 800 --eval-every 200 --run w1024-s2:$CG,csa_window=1024,seed=2 \
        --run nocomp-s2:$CG,csa_stride=1024,seed=2 --run w1024-s1:$CG,csa_window=1024,seed=1 \
        --run nocomp-s1:$CG,csa_stride=1024,seed=1 --run w1024-s0:$CG,csa_window=1024 --run nocomp-s0:$CG,csa_stride=1024
elif [ "$PART" = csa3 ]; then  # torch.compile's default mode, as these runs were made (before compile_mode auto)
    # `init.shared_from_default`: the Qwen3.5-pattern model starts from the default model's weights for every
    # tensor they share, so at one seed the two differ only in the mixers of layers 2, 6, 10, 14 (and equals, exactly,
    # a CSA layer with csa_blend=local and csa_window=1024). `csa_blend=local`: the CSA window without the blend;
    # `csa_blend=joint`: the window's keys and the compressed blocks in one softmax (no blend gate).
    DM=compile=1,compile_mode=default
    SHARED=$DM,pattern=linear/linear/full/full,init.shared_from_default=1
    q 0 "$SECONDS_LEFT" csa_d --steps 800 --eval-every 200 --run qwen-shared-s2:$SHARED,seed=2 \
        --run qwen-shared-s1:$SHARED,seed=1 --run qwen-shared-s0:$SHARED \
        --run window-only-s2:$DM,csa_blend=local,seed=2 &
    q 1 "$SECONDS_LEFT" csa_d_joint --steps 800 --eval-every 200 --run joint-s2:$DM,csa_blend=joint,seed=2 \
        --run joint-s1:$DM,csa_blend=joint,seed=1 --run joint-s0:$DM,csa_blend=joint \
        --run window-only-s1:$DM,csa_blend=local,seed=1 &
    wait
elif [ "$PART" = csa4 ]; then  # the CSA blend gate started closed: a learned bias at -4 or -2 (default weights,
    # paired with the default at each seed), beside the CSA window alone at seed 0
    q 0 "$SECONDS_LEFT" csa_e --steps 800 --eval-every 200 --run bias4-s2:compile=1,init.blend_bias=-4,seed=2 \
        --run bias4-s1:compile=1,init.blend_bias=-4,seed=1 --run bias4-s0:compile=1,init.blend_bias=-4 \
        --run window-only-s0:compile=1,csa_blend=local &
    q 1 "$SECONDS_LEFT" csa_e2 --steps 800 --eval-every 200 --run bias2-s2:compile=1,init.blend_bias=-2,seed=2 \
        --run bias2-s1:compile=1,init.blend_bias=-2,seed=1 --run bias2-s0:compile=1,init.blend_bias=-2 &
    wait
elif [ "$PART" = csa5 ]; then  # CSA with Native Sparse Attention's block selection: each query also attends the raw
    # tokens of 16 (64 tokens) or 64 (256 tokens) compressed blocks outside its window, in one softmax with the window
    # and the blocks; paired with the default, the window alone and full attention at each seed (BENCHMARKS 2)
    q 0 "$SECONDS_LEFT" csa_f --steps 800 --eval-every 200 --run select16-s2:compile=1,csa_blend=select,seed=2 \
        --run select16-s1:compile=1,csa_blend=select,seed=1 --run select16-s0:compile=1,csa_blend=select &
    q 1 "$SECONDS_LEFT" csa_f2 --steps 800 --eval-every 200 \
        --run select64-s2:compile=1,csa_blend=select,csa_select=64,seed=2 \
        --run select64-s1:compile=1,csa_blend=select,csa_select=64,seed=1 \
        --run select64-s0:compile=1,csa_blend=select,csa_select=64 &
    wait
elif [ "$PART" = csa6 ]; then  # GPU 1 only: the default CSA layer (learned blend, compressed blocks) with a 256-token
    # window instead of 64, paired with the default, the window alone and full attention at each seed (BENCHMARKS 2)
    q 1 "$SECONDS_LEFT" csa_w256 --steps 800 --eval-every 200 --run window256-s2:compile=1,csa_window=256,seed=2 \
        --run window256-s1:compile=1,csa_window=256,seed=1 --run window256-s0:compile=1,csa_window=256
elif [ "$PART" = csa7 ]; then  # GPU 1 only: the 256-token window alone (no compressed path), against csa6
    q 1 "$SECONDS_LEFT" csa_l256 --steps 800 --eval-every 200 \
        --run local256-s2:compile=1,csa_blend=local,csa_window=256,seed=2 \
        --run local256-s1:compile=1,csa_blend=local,csa_window=256,seed=1 \
        --run local256-s0:compile=1,csa_blend=local,csa_window=256
elif [ "$PART" = csa8 ]; then  # the 256-token window with the blend gate started closed (its learned bias at -4)
    # at seeds 0-2 (GPU 0); the window alone at seed 0 and the gate started at -2 at seed 2 (GPU 1)
    q 0 "$SECONDS_LEFT" csa_w256c --steps 800 --eval-every 200 \
        --run window256-closed-s2:compile=1,csa_window=256,init.blend_bias=-4,seed=2 \
        --run window256-closed-s1:compile=1,csa_window=256,init.blend_bias=-4,seed=1 \
        --run window256-closed-s0:compile=1,csa_window=256,init.blend_bias=-4 &
    q 1 "$SECONDS_LEFT" csa_l256b --steps 800 --eval-every 200 \
        --run local256-s0:compile=1,csa_blend=local,csa_window=256 \
        --run window256-bias2-s2:compile=1,csa_window=256,init.blend_bias=-2,seed=2 &
    wait
elif [ "$PART" = cand ]; then  # the candidate default (a 256-token CSA window, the blend gate started closed) at
    # seeds 0-2 on GPU 0, HF Qwen3.5 at seeds 0-2 on GPU 1, HF Llama on either after them: one call, peers beside it
    CAND=compile=1,csa_window=256,init.blend_bias=-4
    q 0 "$SECONDS_LEFT" cand_800 --steps 800 --eval-every 200 \
        --run cand-s2:$CAND,seed=2 --run cand-s1:$CAND,seed=1 --run cand-s0:$CAND \
        --run llama-s0:model=hf-llama,compile=1 &
    q 1 "$SECONDS_LEFT" cand_800_qwen --steps 800 --eval-every 200 \
        --run qwen-s2:model=hf-qwen3.5,seed=2 --run qwen-s1:model=hf-qwen3.5,seed=1 --run qwen-s0:model=hf-qwen3.5 \
        --run llama-s1:model=hf-llama,compile=1,seed=1 &
    wait
elif [ "$PART" = cand_long ]; then  # the same at 1600 steps: ours at seeds 0 and 1 and HF Llama (GPU 0), HF Qwen3.5
    # at seeds 0 and 1 (GPU 1)
    CAND=compile=1,csa_window=256,init.blend_bias=-4
    q 0 "$SECONDS_LEFT" cand_1600 --steps 1600 --eval-every 400 \
        --run cand-s0:$CAND --run llama-s0:model=hf-llama,compile=1 --run cand-s1:$CAND,seed=1 &
    q 1 "$SECONDS_LEFT" cand_1600_qwen --steps 1600 --eval-every 400 \
        --run qwen-s0:model=hf-qwen3.5 --run qwen-s1:model=hf-qwen3.5,seed=1 &
    wait
elif [ "$PART" = long5 ]; then  # 1600 steps, model seeds 3 and 4 of the default (GPU 0) and of HF Qwen3.5 (GPU 1):
    # five seeds each with cand_long's; then the CSA layer with a 512-token window at seed 0
    q 0 "$SECONDS_LEFT" long5 --steps 1600 --eval-every 400 \
        --run default-s3:compile=1,seed=3 --run default-s4:compile=1,seed=4 --run w512-s0:$W512 &
    q 1 "$SECONDS_LEFT" long5_qwen --steps 1600 --eval-every 400 \
        --run qwen-s3:model=hf-qwen3.5,seed=3 --run qwen-s4:model=hf-qwen3.5,seed=4 &
    wait
elif [ "$PART" = w512 ]; then  # the 512-token CSA window at seeds 1-2, and full attention in the CSA layers from
    # the default's weights (is the CSA layer the 1600-step gap?), 1600 steps
    q 0 "$SECONDS_LEFT" w512_a --eval-every 400 --steps 1600 --run w512-s1:$W512,seed=1 --run full-s0:$FULL &
    q 1 "$SECONDS_LEFT" w512_b --eval-every 400 --steps 1600 --run w512-s2:$W512,seed=2 --run full-s1:$FULL,seed=1 &
    wait
elif [ "$PART" = w512_1gpu ]; then  # w512's runs on a one-GPU machine: the window at seeds 1-2, full attention seed 0
    q 0 "$SECONDS_LEFT" w512_1gpu --eval-every 400 --steps 1600 --run w512-s1:$W512,seed=1 \
        --run w512-s2:$W512,seed=2 --run full-s0:$FULL
elif [ "$PART" = w512_800 ]; then  # one GPU: the 512-token window at 800 steps, seeds 0-2
    q 0 "$SECONDS_LEFT" w512_800 --steps 800 --eval-every 200 --run w512-s0:$W512 --run w512-s1:$W512,seed=1 \
        --run w512-s2:$W512,seed=2
elif [ "$PART" = w512_long5 ]; then  # one GPU: the 512-token window at 1600 steps, seeds 3-4 (long5 ran the others)
    q 0 "$SECONDS_LEFT" w512_long5 --eval-every 400 --steps 1600 --run w512-s3:$W512,seed=3 --run w512-s4:$W512,seed=4
elif [ "$PART" = sweep512 ]; then  # today's default (512 window, gate started closed), 800 steps, compiled:
    # GPU 0 times the default beside HF Llama (time to loss; seed 0) then sweeps the optimizers' rates; GPU 1 runs
    # the residual output projections started at zero (init.residual_out=0) at seeds 0-2 and the rest of the sweep
    q 0 "$SECONDS_LEFT" sweep512_a --steps 800 --eval-every 100 --run default-s0:compile=1 \
        --run llama-s0:model=hf-llama,compile=1 --run muon-0.01:compile=1,muon_lr=0.01 \
        --run muon-0.04:compile=1,muon_lr=0.04 --run adamw-0.004:compile=1,optimizer=adamw,adamw_lr=0.004 &
    q 1 "$SECONDS_LEFT" sweep512_b --steps 800 --eval-every 200 --run zero-out-s0:compile=1,init.residual_out=0 \
        --run zero-out-s1:compile=1,init.residual_out=0,seed=1 --run zero-out-s2:compile=1,init.residual_out=0,seed=2 \
        --run adamw-0.002:compile=1,optimizer=adamw,adamw_lr=0.002 \
        --run adamw-0.008:compile=1,optimizer=adamw,adamw_lr=0.008 &
    wait
elif [ "$PART" = more800 ]; then  # (session 18, call 3) five seeds of each at 800 steps: seeds 3-4 of the
    # N(0, 0.02) residual start (the default when it ran), of the zero start and of HF Qwen3.5; AdamW at 0.001
    (CUDA_VISIBLE_DEVICES=0 timeout 200 python -m pytest -q -p no:cacheprovider tests/test_gpu.py \
        -k shipped_fla_configs > "$OUT/test_gpu.log" 2>&1
     q 0 380 more_a --steps 800 --eval-every 200 --run adamw-0.001:compile=1,optimizer=adamw,adamw_lr=0.001 \
        --run zero-out-s3:compile=1,init.residual_out=0,seed=3 --run default-s3:compile=1,seed=3) &
    q 1 570 more_b --steps 800 --eval-every 200 --run qwen-s3:model=hf-qwen3.5,seed=3 \
        --run zero-out-s4:compile=1,init.residual_out=0,seed=4 --run default-s4:compile=1,seed=4 \
        --run qwen-s4:model=hf-qwen3.5,seed=4 &
    wait
    tail -3 "$OUT/test_gpu.log"
elif [ "$PART" = zero1600 ]; then  # (session 18, call 4) the zero residual start at 1600 steps, seeds 0-4 (seed 2
    # did not finish inside the call)
    q 0 530 zero_1600_a --steps 1600 --eval-every 400 --run zero-out-s0:compile=1,init.residual_out=0 \
        --run zero-out-s1:compile=1,init.residual_out=0,seed=1 --run zero-out-s2:compile=1,init.residual_out=0,seed=2 &
    q 1 530 zero_1600_b --steps 1600 --eval-every 400 --run zero-out-s3:compile=1,init.residual_out=0,seed=3 \
        --run zero-out-s4:compile=1,init.residual_out=0,seed=4 &
    wait
else
    echo "unknown part $PART (ablate, ablate2, packed, packed2, final, long, seeds, seeds_long, csa, csa2, csa3, csa4, csa5, csa6, csa7, csa8, cand, cand_long, long5, w512, w512_1gpu, w512_800, w512_long5, sweep512, more800 or zero1600)"; exit 2
fi
for f in "$OUT"/*.log; do echo "== $f"; grep -E "final|failed|Error|error|stopped" "$f" | tail -8; done
for d in "$OUT"/*/; do [ -f "$d/quality.json" ] && python benchmarks/bench_quality.py --plot "$d/quality.json"; done
tar -czf /tmp/results.tgz -C "$OUT" . && rm -rf "${OUT:?}"/* && mv /tmp/results.tgz "$OUT/results.tgz"
