# call 3: the loss branch's GPU tests that train through the eager chunked loss (its in-place head-gradient sum)
. gpu_s33/common.sh
W=/tmp/r/c3; mkdir -p $W
t loss /tmp/loss $(left 270) "head_gradient or chunked_loss or gpu_backends_match_cpu_reference or cuda_graph_replay_trains"
tar -czf $OUT/c3.tgz -C /tmp/r c3 && ls -la $OUT/c3.tgz
echo "total $(( $(date +%s) - t0 )) s"
