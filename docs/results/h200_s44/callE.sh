# call E (session 44, fresh machine): after the review's fixes (float16's small decays, a decay schedule keeps the
# graph, AdamW by dtype): the optimizer's GPU tests, bench_optimizer.py (LlamaThink's parameters), the loop's GPU test
[ -d /tmp/site/fla ] || { mkdir -p /tmp/site /tmp/kcache && tar -xJf runs/gpu-site-fla.tar.xz -C /tmp/site; }
. docs/results/h200_s36/common.sh
W=/tmp/r/cE; mkdir -p $W
( s=$(date +%s); timeout 100 python -m pytest -q -p no:cacheprovider -rfEs tests/test_muon.py -m gpu > $W/test_muon.log 2>&1; echo "== muon gpu tests rc=$? $(( $(date +%s) - s )) s"; tail -3 $W/test_muon.log )
( s=$(date +%s); timeout 60 python benchmarks/bench_optimizer.py --models llamathink --out $W/optimizer.json > $W/optimizer.log 2>&1; echo "== bench_optimizer rc=$? $(( $(date +%s) - s )) s"; grep -E '"(muon|adamw)"' $W/optimizer.log | cut -c1-160 )
tar -czf $OUT/cE.tgz -C /tmp/r cE
t loop $R $(left 330) "default_compiled_pretraining_replays"
tar -czf $OUT/cE.tgz -C /tmp/r cE
echo "total $(( $(date +%s) - t0 )) s"
