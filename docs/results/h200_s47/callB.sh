# call B (session 47): the chunked loss in fewer, larger chunks. bench_loss at batch 16 and 64 (rows of at most
# 4096, 8192, 16384 against the default ~2048, and the full logits); then bench_gpu with FlashQLA's kernels (its
# prebuild run: main's default chunks), the same with chunks of 4096 and 8192 rows, HF Llama beside
[ -d /tmp/site/fla ] || { mkdir -p /tmp/site /tmp/kcache && tar -xJf runs/gpu-site-trim.tar.xz -C /tmp/site; }
. docs/results/h200_s36/common.sh
W=/tmp/r/cB; mkdir -p $W
l() { local name=$1; shift; ( s=$(date +%s); PYTHONPATH=/tmp/site:$R timeout 150 python benchmarks/bench_loss.py "$@" --out $W/loss_$name.json > $W/loss_$name.txt 2>&1; echo "== loss $name rc=$? $(( $(date +%s) - s )) s"; grep -E '"name"|Error' $W/loss_$name.txt | python -c "
import sys, json
for line in sys.stdin:
    try: r = json.loads(line)
    except Exception: print(line.strip()[:300]); continue
    print(r['name'], r['rows'], 'gpu %.3f ms' % r['gpu_kernel_ms'], 'wall %.3f' % r['ms'], 'peak %.3f GiB' % r['peak_gib_above_inputs'], 'gw_err %.1e' % r['grad_weight_max_err'])" ); }
b() { local name=$1; shift; ( s=$(date +%s); PYTHONPATH=/tmp/site:$R:$R/tests timeout $1 python benchmarks/bench_gpu.py --compiled-only --no-generate --models $2 --budget-s $3 --out $W/bench_$name.json > $W/bench_$name.txt 2>&1; echo "== bench $name rc=$? $(( $(date +%s) - s )) s"; grep -E '"model"' $W/bench_$name.txt | cut -c1-330 | head -12 ); }
l b16 --rows 16384 --chunk-rows 4096,8192,16384 --only ours,ours_rows4096,ours_rows8192,ours_rows16384,full
l b64 --rows 65536 --chunk-rows 4096,8192 --only ours,ours_rows4096,ours_rows8192
tar -czf $OUT/cB.tgz -C /tmp/r cB
b qla $(left 590) llamathink:flash_qla:cudagraphs:prebuild,llamathink:flash_qla:cudagraphs:loss-rows4096,hf-llama:cudagraphs,llamathink:flash_qla:cudagraphs:loss-rows8192,llamathink:flash_qla:cudagraphs 110
tar -czf $OUT/cB.tgz -C /tmp/r cB
echo "total $(( $(date +%s) - t0 )) s"
