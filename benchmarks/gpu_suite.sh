#!/usr/bin/env bash
# The GPU measurements of BENCHMARKS.md section 1 and the GPU tests, on a machine with two GPUs (the two halves of
# each part run side by side, one per GPU), in commands of under 10 minutes each. With one GPU the halves run one
# after the other; name one (`gpu_suite.sh fla 0`, then `... fla 1`) to keep each command under 10 minutes:
#   OUT=results_dir bash benchmarks/gpu_suite.sh nofla   # before fla is installed: GPU tests, generate(), our own
#                                                        # PyTorch GDN path compiled (its eager figure: `fla` part)
#   OUT=results_dir bash benchmarks/gpu_suite.sh fla     # with fla-core + tilelang (../shared/gpu/stage-wheels.sh):
#                                                        # training compiled (ours, then the peers) and eager (ours
#                                                        # beside the peers in one process); GPU tests
#   OUT=results_dir bash benchmarks/gpu_suite.sh speed   # training throughput (issue 17): compiled beside HF Llama
#                                                        # compiled, eager beside HF Qwen3.5; GPU tests
#   OUT=results_dir bash benchmarks/gpu_suite.sh speed2  # profile of the compiled step; batch 64 compiled
#   OUT=results_dir bash benchmarks/gpu_suite.sh speed3  # CUDA graphs (mode reduce-overhead) for ours and HF Llama
#                                                        # at batch 16; fla heads of 128; batch 64
#   DATA=runs/english200 [TOKENIZER=llama2-tokenizer.model] OUT=results_dir bash benchmarks/gpu_suite.sh loop  # the CUDA-graph GPU tests
#                                                        # (half 0); the training loop (train_hf.py, Muon) compiled
#                                                        # with and without CUDA graphs, HF Llama compiled in
#                                                        # bench_quality's loop after it (half 1)
#   DATA=runs/english200 [TOKENIZER=...] OUT=results_dir bash benchmarks/gpu_suite.sh optim  # Muon's Newton-Schulz
#                                                        # step eager and as a CUDA graph: its GPU test and the
#                                                        # optimizer alone, ours and HF Llama's (half 0); the loop with
#                                                        # CUDA graphs for the layers, Muon eager and recorded, HF
#                                                        # Llama compiled in bench_quality's loop after it (half 1)
#   OUT=results_dir bash benchmarks/gpu_suite.sh kinds   # the compiled step's GPU time by kind of kernel and its
#                                                        # top kernels, ours beside HF Llama compiled whole in one
#                                                        # process: batch 16 (half 0), batch 64 (half 1)
#   OLD=/abs/old_tree [TESTS=pytest-k|skip] [CODE=1] [HC=1] OUT=/abs/dir bash benchmarks/gpu_suite.sh ab  # a change: GPU
#                                                        # tests; kernels by kind at batch 16 and 64 against the
#                                                        # tree before it (OLD); HC=1: without hyper-connections
#   DATA=runs/english200 [TOKENIZER=...] OUT=/abs/dir bash benchmarks/gpu_suite.sh flashqla  # FlashQLA's kernels
#                                                        # (gdn_backend: flash_qla) against fla's: GPU tests (half 0);
#                                                        # kernels, step profiles, training loops beside HF Llama (1)
#   DATA=... [TOKENIZER=...] OUT=/abs/dir bash benchmarks/gpu_suite.sh flashqla2  # FlashQLA's cold builds by kernel
#                                                        # and the step with CUDA graphs beside fla and HF Llama
#                                                        # (half 0); the training loops (half 1)
#   OLD=/abs/old_tree [SEEDS=8] OUT=/abs/dir bash benchmarks/gpu_suite.sh seeds  # a change's bf16 gradient errors
#                                                        # against the float32 reference over seeds, both trees
#   OUT=results_dir bash benchmarks/gpu_suite.sh combo  # inductor's combo kernels (`combo_kernels`, on by default)
#                                                        # against combo_kernels false: the GPU test and cold first
#                                                        # steps (half 0); batch 16 and 64, ours and HF Llama's (half 1)
#   SETS="name=KEY=VALUE[+...] ..." OUT=results_dir bash benchmarks/gpu_suite.sh inductor  # inductor options
#                                                        # for the compiled layers against training's (combo kernels)
#   OUT=results_dir bash benchmarks/gpu_suite.sh profile # torch.profiler view of the eager and compiled steps,
#                                                        # generate() with fla, HF Qwen3.5 compiled (slow to compile)
# Every benchmark has its own time limit so that a slow one cannot eat the others' time, and writes what it
# measured as it goes; at the end everything is packed into $OUT/results.tgz (the device returns a handful of files
# per call). Triton and tilelang JIT caches are kept in $OUT/kernels.tgz; carry it back as .gpu-kernel-cache/ to
# skip minutes of kernel compilation on a fresh machine.
set -u
OUT=${OUT:-results}
PART=${1:-fla}
ONLY=${2:-}  # 0 or 1: run only that half
mkdir -p "$OUT" /tmp/kcache
[ -f .gpu-kernel-cache/kernels.tgz ] && tar -xzf .gpu-kernel-cache/kernels.tgz -C /tmp/kcache
export TRITON_CACHE_DIR=/tmp/kcache/triton TILELANG_CACHE_DIR=/tmp/kcache/tilelang PYTHONUNBUFFERED=1
export PYTHONPATH=${PYTHONPATH:-}:$PWD
nvidia-smi --query-gpu=index,name,driver_version --format=csv,noheader | tee "$OUT/gpu.txt"
SECOND=$(( $(nvidia-smi -L | wc -l) > 1 ? 1 : 0 ))
bench() { local limit=$1 name=$2; shift 2; timeout "$limit" python benchmarks/bench_gpu.py --steps 8 --warmup 3 \
    --out "$OUT/bench_$name.json" "$@" > "$OUT/bench_$name.log" 2>&1; grep '^{' "$OUT/bench_$name.log"; }
# the compiled step's GPU time by kind of kernel and its top 40 kernels: prof LIMIT_S NAME BATCH [profile_gpu args]
prof() { local limit=$1 name=$2 batch=$3; shift 3; timeout "$limit" python benchmarks/profile_gpu.py --compile \
    --no-eager --no-decode --top-kernels 40 --batch "$batch" "$@" > "$OUT/kinds_$name.txt" 2>&1
    echo "== $name"; grep -E "^  [a-zA-Z].* ms .*%|wall time" "$OUT/kinds_$name.txt" || tail -3 "$OUT/kinds_$name.txt"; }
# An inductor cache folder per version of a tree's package (a hash of its Python files): inductor's graph cache key
# does not see a custom op's tags or Python body, so two trees (or one tree changed between calls on a warm machine)
# sharing one folder could run each other's graphs (session 32)
inductor_cache() { echo "/tmp/kcache/inductor_$(find "$1/llamathink" -name '*.py' | sort | xargs cat | md5sum | cut -c1-12)"; }
gpu_tests() { timeout "$1" python -m pytest -q -p no:cacheprovider --tb=short -rfEs tests/test_gpu.py \
    > "$OUT/test_gpu_$2.log" 2>&1; grep -v Warn "$OUT/test_gpu_$2.log" | tail -30; }
# the 200-step training loop (train_hf.py, compiled, Muon, real text in $DATA) with FlashQLA, then fla, then HF Llama's
# (bench_quality's loop): the flashqla parts' second half
flashqla_loops() {
    python - "$OUT/model_flash_qla.json" <<'PY'
import json, sys
config = json.load(open("configuration/models/llamathink-95m.json"))
json.dump({**config, "gdn_backend": "flash_qla"}, open(sys.argv[1], "w"), indent=2)
PY
    for name in flash_qla fla; do
        model=configuration/models/llamathink-95m.json; [ $name = flash_qla ] && model="$OUT/model_flash_qla.json"
        timeout 200 python train_hf.py --config configuration/train/english_docs_1gpu.yaml --model_config "$model" \
            --data_dir "${DATA:?set DATA}" --out_dir "/tmp/loop_$name" --compile true --max_steps 200 \
            --eval_every 200 --eval_batches 4 --sample_every 100000 --wandb_mode disabled --log_every 50 \
            --progress_bar false ${TOKENIZER:+--tokenizer "$TOKENIZER"} > "$OUT/loop_$name.log" 2>&1
        echo "== loop $name"; grep -E "Gated|compile_mode|tok|step 200|Error" "$OUT/loop_$name.log" | cut -c1-200 | tail -6
    done
    timeout 150 python benchmarks/bench_quality.py --data "$DATA" --steps 200 --eval-every 200 --eval-windows 16 \
        --speed-from 50 --out "$OUT/llama" --run hf-llama:model=hf-llama,compile=1 > "$OUT/loop_llama.log" 2>&1
    echo "== loop hf-llama"; grep -iE "tok|final" "$OUT/loop_llama.log" | tail -3; }
if [ "$PART" = nofla ]; then  # before fla is installed
    half0() {
        gpu_tests 150 nofla
        bench 160 generate_torch --models llamathink:torch,llamathink:torch:eager-decode,hf-qwen3.5,hf-llama --no-train; }
    half1() { bench 500 train_torch --models llamathink:torch --compiled-only --train-batches 16 --no-generate; }
elif [ "$PART" = fla ]; then
    half0() {
        bench 300 train_compiled --models llamathink:fla --compiled-only --train-batches 16,64 --no-generate
        bench 260 train_compiled_peers --models hf-llama,hf-qwen3.5 --compiled-only --no-generate; }
    half1() {
        gpu_tests 300 fla  # fla's Triton and tilelang kernels compile for every new head size: minutes on a fresh machine
        bench 250 train_eager --models llamathink:fla,llamathink:torch,hf-qwen3.5,hf-llama --train-batches 16,64 --no-generate; }
elif [ "$PART" = speed ]; then  # issue 17: compiled (layer by layer) beside HF Llama compiled, a warm restart, the
    # hyper-connection cost, packed rows; eager beside HF Qwen3.5 eager; the GPU tests
    half0() {
        bench 570 compiled --compiled-only --no-generate --budget-s 200 \
            --models llamathink:fla,llamathink:fla,hf-llama,llamathink:fla:no-hc,llamathink:fla:packed; }
    half1() {
        gpu_tests 300 speed
        bench 270 eager --no-generate --budget-s 85 --models llamathink:fla,hf-qwen3.5,llamathink:fla:packed; }
elif [ "$PART" = speed2 ]; then  # the profile of the compiled step; batch 64 compiled, ours and HF Llama
    half0() {
        timeout 300 python benchmarks/profile_gpu.py --backend auto --compile --no-decode --out "$OUT" > "$OUT/profile.log" 2>&1
        tail -3 "$OUT/profile.log"; }
    half1() {
        bench 560 compiled64 --compiled-only --no-generate --budget-s 270 --train-batches 64 --models llamathink:fla,hf-llama; }
elif [ "$PART" = speed3 ]; then  # issue 17: compiled loss chunk + CUDA graph replay, each beside HF Llama's
    half0() {
        bench 570 compiled_graphs --compiled-only --no-generate --budget-s 180 \
            --models llamathink:fla,llamathink:fla:cudagraphs,hf-llama,hf-llama:cudagraphs,llamathink:fla:head128; }
    half1() {
        timeout 200 python -m pytest -q -p no:cacheprovider --tb=short tests/test_gpu.py -k cuda_graph_replay \
            > "$OUT/test_gpu_graphs.log" 2>&1; tail -3 "$OUT/test_gpu_graphs.log"
        bench 380 compiled64 --compiled-only --no-generate --budget-s 180 --train-batches 64 \
            --models llamathink:fla:cudagraphs,hf-llama,llamathink:fla; }
elif [ "$PART" = loop ]; then  # issue 17: `compile_mode: reduce-overhead` in the real training loop (~540 s)
    DATA=${DATA:?set DATA to a prepared folder (python -m llamathink.data prepare)}
    half0() {  # the CUDA-graph training GPU tests (gradients per call, SGD steps against the default mode)
        timeout 400 python -m pytest -q -p no:cacheprovider --tb=short -rfEsx tests/test_gpu.py \
            -k "cuda_graph_gradients or cuda_graph_replay or cuda_graph_training" > "$OUT/test_gpu_graphs.log" 2>&1
        grep -v Warn "$OUT/test_gpu_graphs.log" | tail -30; }
    half1() {  # train_hf.py timed with and without CUDA graphs, HF Llama compiled in bench_quality's loop
        for mode in reduce-overhead default; do
            timeout 150 python train_hf.py --config configuration/train/english_docs_1gpu.yaml --data_dir "$DATA" \
                --out_dir "/tmp/loop_$mode" --compile true --compile_mode "$mode" --max_steps 300 --eval_every 300 \
                --eval_batches 4 --sample_every 100000 --wandb_mode disabled --log_every 50 ${TOKENIZER:+--tokenizer "$TOKENIZER"} \
                > "$OUT/loop_$mode.log" 2>&1
            grep -iE "tok|error" "$OUT/loop_$mode.log" | tail -4
        done
        timeout 120 python benchmarks/bench_quality.py --data "$DATA" --steps 300 --eval-every 300 --eval-windows 16 \
            --speed-from 50 --out "$OUT/loop_llama" --run hf-llama:model=hf-llama,compile=1 > "$OUT/loop_llama.log" 2>&1
        grep final "$OUT/loop_llama.log"; }
elif [ "$PART" = optim ]; then  # issue 17: the optimizer's host launches (~560 s)
    DATA=${DATA:?set DATA to a prepared folder (python -m llamathink.data prepare)}
    half0() {
        timeout 150 python -m pytest -q -p no:cacheprovider --tb=short -rfEs tests/test_muon.py -m gpu \
            > "$OUT/test_muon_gpu.log" 2>&1; tail -3 "$OUT/test_muon_gpu.log"
        timeout 300 python benchmarks/profile_gpu.py --optimizer-only > "$OUT/optimizer.txt" 2>&1
        grep -E "^#|clip \+" "$OUT/optimizer.txt"; }
    half1() {
        for graph in true false; do
            timeout 170 python train_hf.py --config configuration/train/english_docs_1gpu.yaml --data_dir "$DATA" \
                --out_dir "/tmp/loop_$graph" --compile true --compile_mode reduce-overhead --muon_cuda_graph $graph \
                --max_steps 200 --eval_every 200 --eval_batches 4 --sample_every 100000 --wandb_mode disabled \
                --log_every 25 ${TOKENIZER:+--tokenizer "$TOKENIZER"} > "$OUT/loop_muon_graph_$graph.log" 2>&1
            grep -iE "tok|error|memory" "$OUT/loop_muon_graph_$graph.log" | tail -5
        done
        timeout 120 python benchmarks/bench_quality.py --data "$DATA" --steps 200 --eval-every 200 --eval-windows 16 \
            --speed-from 50 --out "$OUT/loop_llama" --run hf-llama:model=hf-llama,compile=1 > "$OUT/loop_llama.log" 2>&1
        grep final "$OUT/loop_llama.log"; }
elif [ "$PART" = kinds ]; then  # issue 17: where the compiled step's GPU time goes beside HF Llama's (~240 s cold)
    half0() { prof 330 b16 16 --peers hf-llama --top-kernels 60; }
    half1() { prof 330 b64 64 --peers hf-llama --top-kernels 60; }
elif [ "$PART" = ab ] || [ "$PART" = fold ]; then  # issue 17: a change against the tree before it (OLD, e.g.
    # `git archive REV`): the GPU tests TESTS names (pytest -k; default: those training through the fla ops); the
    # compiled step's kernels by kind at batch 16 (beside HF Llama compiled whole, with the eager aten ops by shape
    # and the host's Python time by package) and 64, each tree in its own process; HC=1: this tree without hyper-connections (their share); CODE=1 keeps
    # inductor's generated code of this tree's batch-16 step (output_code_b16.log). Both trees' batch-16 kernel lists
    # say which graph and model lines each inductor kernel comes from, where the tree's profile_gpu.py has
    # --kernel-sources (the code itself in sources_b16*/). About 600 s on a fresh H200.
    # (`fold`, session 19's name for it.)
    TORCHINDUCTOR_CACHE_DIR=$(inductor_cache .) && export TORCHINDUCTOR_CACHE_DIR
    # OLD compiles into its own inductor cache (`inductor_cache`)
    old() { (cd "${OLD:?set OLD to a checkout of the code before the change}" && PYTHONPATH="$OLD:$PYTHONPATH" \
        TORCHINDUCTOR_CACHE_DIR=$(inductor_cache "$OLD") "$@"); }
    # prof, with --kernel-sources where the current tree's profile_gpu.py has it (the code in $OUT/sources_NAME/)
    prof_src() { if grep -q -e "--kernel-sources" benchmarks/profile_gpu.py; then
        prof "$@" --kernel-sources --out "$OUT/sources_$2"; else prof "$@"; fi; }
    half0() {
        if [ "${TESTS:-}" != skip ]; then
            timeout "${TEST_S:-200}" python -m pytest -x -v -p no:cacheprovider --tb=short tests/test_gpu.py \
                -k "${TESTS:-packed_training_on_gpu or shipped_fla or fla_causal_conv}" > "$OUT/test_gpu_ab.log" 2>&1
            grep -E "PASSED|FAILED|ERROR|passed|failed" "$OUT/test_gpu_ab.log" | tail -12
        fi
        if [ "${CODE:-0}" = 1 ]; then
            TORCH_LOGS=output_code TORCH_LOGS_OUT="$OUT/output_code_b16.log" prof_src 150 b16 16 --peers hf-llama \
                --eager-ops --host-python
        else
            prof_src 150 b16 16 --peers hf-llama --eager-ops --host-python
        fi
        old prof_src 80 b16_old 16
        [ "${HC:-0}" = 1 ] && prof 60 b16_no_hc 16 --model llamathink:auto:no-hc
        prof 90 b64 64
        old prof 90 b64_old 64; }
    half1() { :; }
elif [ "$PART" = seeds ]; then  # issue 17: a change's bf16 gradient errors against the float32 reference over
    # seeds (benchmarks/gradient_error_seeds.py), this tree and the tree before it (OLD): whether a tensor past a GPU
    # test's tolerance is past it on every seed. SEEDS (default 8), LIMIT (s per tree, default 240).
    TORCHINDUCTOR_CACHE_DIR=$(inductor_cache .) && export TORCHINDUCTOR_CACHE_DIR
    seeds() { timeout "${LIMIT:-240}" python benchmarks/gradient_error_seeds.py --seeds "${SEEDS:-8}" ${2:+--code "$2"} \
        --out "$OUT/seeds_$1.jsonl" > "$OUT/seeds_$1.log" 2>&1; echo "== $1"; grep '^{' "$OUT/seeds_$1.log" \
        | python -c 'import json,sys; [print(r["seed"], r["over_tolerance"], {k.split("model.")[-1]: v for k, v in r["watched_eager_compiled"].items() if "dt_bias" in k}) for r in map(json.loads, sys.stdin)]'; }
    half0() {
        seeds new
        # this tree's script, OLD's model, in OLD's own inductor cache (`inductor_cache`)
        TORCHINDUCTOR_CACHE_DIR=$(inductor_cache "${OLD:?set OLD to the code before the change}") seeds old "$OLD"; }
    half1() { :; }
elif [ "$PART" = combo ]; then  # issue 17: `combo_kernels` (the default since session 25) against without them
    half0() {
        timeout 320 python -m pytest -q -p no:cacheprovider --tb=short -rfEs tests/test_gpu.py -k combo_kernels \
            > "$OUT/test_gpu_combo.log" 2>&1; grep -v Warn "$OUT/test_gpu_combo.log" | tail -5
        bench 360 combo_cold --compiled-only --no-generate --budget-s 170 --train-batches 16 \
            --models llamathink:fla:no-combo:cold:prebuild,llamathink:fla:cold:prebuild; }
    half1() {
        bench 580 combo_warm --compiled-only --no-generate --budget-s 140 --train-batches 16,64 \
            --models llamathink:fla:no-combo,llamathink:fla,hf-llama,hf-llama:combo; }
elif [ "$PART" = inductor ]; then  # issue 17: inductor options for the compiled layers against training's, each
    # set in its own process (profile_gpu --inductor-option). SETS="name=KEY=VALUE[+KEY=VALUE...] ...", e.g.
    # SETS="cdt=coordinate_descent_tuning=True" (combo_kernels=False+inplace_buffers=True: inductor's defaults);
    # BATCHES (default "16 64"); DEFAULTS=0: no row with training's options (combo kernels on, in-place buffers off).
    export TORCHINDUCTOR_CACHE_DIR=/tmp/kcache/inductor
    for item in ${SETS:?set SETS, e.g. cdt=coordinate_descent_tuning=True}; do  # refused before any GPU work
        case "$item" in
            [A-Za-z0-9_]*=[A-Za-z_]*=*) ;;
            *) echo "gpu_suite.sh inductor: SETS item '$item' is not name=KEY=VALUE[+KEY=VALUE...]" >&2; exit 2 ;;
        esac
    done
    half0() {
        for batch in ${BATCHES:-16 64}; do
            [ "${DEFAULTS:-1}" = 1 ] && prof "${LIMIT:-110}" "b${batch}_default" "$batch"
            for item in $SETS; do
                args=(); IFS=+ read -ra opts <<< "${item#*=}"
                for o in "${opts[@]}"; do args+=(--inductor-option "$o"); done
                prof "${LIMIT:-110}" "b${batch}_${item%%=*}" "$batch" "${args[@]}"
            done
        done; }
    half1() { :; }
elif [ "$PART" = flashqla ]; then  # issue 17: FlashQLA's kernels (`gdn_backend: flash_qla`, opt-in since session
    # 27) against fla's: the GPU tests that name flash_qla (half 0); the kernels alone, the batch-16 step profile of
    # each (FlashQLA's beside HF Llama compiled whole) and the training loop of each, HF Llama's loop after them (half
    # 1). TileLang builds FlashQLA's kernels once per head count and row layout (about 80 s a set on the H200, one
    # after another) into TILELANG_CACHE_DIR: carry .gpu-kernel-cache/ from an earlier call's kernels.tgz.
    export TORCHINDUCTOR_CACHE_DIR=/tmp/kcache/inductor
    half0() {
        timeout "${LIMIT:-560}" python -m pytest -q -p no:cacheprovider --tb=short -rfEs tests/test_gpu.py -k flash_qla \
            > "$OUT/test_gpu_flash_qla.log" 2>&1; grep -v Warn "$OUT/test_gpu_flash_qla.log" | tail -20; }
    half1() {
        timeout 200 python benchmarks/bench_gdn_kernels.py --kernels flash_qla,fla --out "$OUT/gdn_kernels_b16.json" \
            > "$OUT/gdn_kernels_b16.log" 2>&1; grep '^{' "$OUT/gdn_kernels_b16.log" | cut -c1-200
        prof 200 flash_qla_b16 16 --backend flash_qla --peers hf-llama
        prof 120 fla_b16 16 --backend fla
        flashqla_loops; }
elif [ "$PART" = flashqla2 ]; then  # issue 17, after session 28: FlashQLA's cold build by kernel (each in a
    # process of its own, then all four in one; their own empty caches), then the compiled step with CUDA graphs
    # (training's default) at batch 16 from emptied compiler caches: FlashQLA with the prebuild first (its first step
    # is the cold one, and it leaves the caches warm), FlashQLA again, fla, HF Llama (half 0, about 6-9 min); the
    # training loops, HF Llama's after them (half 1, the flashqla part's)
    export TORCHINDUCTOR_CACHE_DIR=/tmp/kcache/inductor
    half0() {
        timeout 150 python benchmarks/bench_flash_qla_builds.py --together --out "$OUT/flash_qla_builds.json" \
            > "$OUT/flash_qla_builds.log" 2>&1; grep '^{' "$OUT/flash_qla_builds.log" | cut -c1-300
        rm -rf /tmp/kcache/triton /tmp/kcache/tilelang /tmp/kcache/inductor
        bench 430 cudagraphs_b16 --compiled-only --no-generate --train-batches 16 --budget-s 160 --models \
            llamathink:flash_qla:cudagraphs:prebuild,llamathink:flash_qla:cudagraphs,llamathink:fla:cudagraphs,hf-llama:cudagraphs; }
    half1() { flashqla_loops; }
else  # profile
    half0() {
        timeout 300 python benchmarks/profile_gpu.py --backend auto --compile --out "$OUT" > "$OUT/profile.log" 2>&1
        tail -3 "$OUT/profile.log"
        bench 115 generate_fla --models llamathink:fla,hf-qwen3.5 --no-train; }
    half1() { bench 500 train_compiled_qwen --models hf-qwen3.5 --compiled-only --no-generate; }
fi
if [ -n "$ONLY" ]; then
    "half$ONLY" > "$OUT/half$ONLY.txt" 2>&1
elif [ "$SECOND" = 1 ]; then
    CUDA_VISIBLE_DEVICES=0 half0 > "$OUT/half0.txt" 2>&1 &
    CUDA_VISIBLE_DEVICES=1 half1 > "$OUT/half1.txt" 2>&1 &
    wait
else
    half0 > "$OUT/half0.txt" 2>&1
    half1 > "$OUT/half1.txt" 2>&1
fi
cat "$OUT"/half*.txt
[ -f "$OUT/profile_auto.txt" ] && head -c 6000 "$OUT/profile_auto.txt"
# The device returns only a few files per call: everything measured goes back as one archive.
tar -czf /tmp/results.tgz -C "$OUT" . && rm -rf "${OUT:?}"/* && mv /tmp/results.tgz "$OUT/results.tgz"
# Triton's and TileLang's caches only: an inductor graph cache carried into a later call could hand a changed tree
# the graphs of another (its key misses custom ops' tags and bodies, session 32)
tar -czf "$OUT/kernels.tgz" -C /tmp/kcache --exclude='./inductor*' . && ls -la "$OUT"
