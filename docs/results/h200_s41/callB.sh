# call B (session 41, fresh machine): the owed GPU test of gdn_backend auto's FlashQLA flow alone (call A's limit cut
# it). It failed on its snapshot of TileLang's cache (fla's own TileLang backward kernel, built by the fla step, was
# counted as a FlashQLA rebuild); the test now snapshots after fla's step (call C ran it again; its limit cut it).
. docs/results/h200_s36/common.sh; W=/tmp/r/cB; mkdir -p $W; t auto_flow $R 420 "auto_layers_build_flash_qla"; tar -czf $OUT/cB.tgz -C /tmp/r cB; echo "total $(( $(date +%s) - t0 )) s"
