# call B (session 42, fresh machine): the forward's token-id check moved to the host (`inputs_checked_by_caller`,
# training's and bench_gpu's default) against the forward's own check with its per-step host sync
# (`:device-checks`, main before this session), HF Llama beside, at batch 16 with CUDA graphs, each its own process,
# each with a trace of 3 more steps; then the prebuild test that failed in call A (the Gluon shape count of the
# conv tests before it, now reset per test)
. docs/results/h200_s36/common.sh
W=/tmp/r/cB; mkdir -p $W
( s=$(date +%s); PYTHONPATH=/tmp/site:$R timeout 400 python benchmarks/bench_gpu.py --compiled-only --no-generate --models llamathink:fla:cudagraphs:prebuild,llamathink:fla:cudagraphs:device-checks,llamathink:fla:cudagraphs,hf-llama:cudagraphs --budget-s 150 --trace $W/traces --out $W/bench.json > $W/bench.txt 2>&1; echo "== bench rc=$? $(( $(date +%s) - s )) s"; grep '"model"' $W/bench.txt | cut -c1-900 )
tar -czf $OUT/cB.tgz -C /tmp/r cB
t prebuild $R $(left 570) "fla_prebuild_child_builds_every_kernel and rows and not inductors"
tar -czf $OUT/cB.tgz -C /tmp/r cB
echo "total $(( $(date +%s) - t0 )) s"
