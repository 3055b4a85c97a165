# call E (session 42, fresh machine, the session's last 4 minutes of device time): the training loop with the
# batch checked on the host and copied from pinned memory without waiting (`check_batch_on_host`, `to_device`),
# through pretrain.train with CUDA graphs, against the default compile mode, and its exact resume
. docs/results/h200_s36/common.sh
W=/tmp/r/cE; mkdir -p $W
t loop $R 140 "default_compiled_pretraining_replays"
tar -czf $OUT/cE.tgz -C /tmp/r cE
echo "total $(( $(date +%s) - t0 )) s"
