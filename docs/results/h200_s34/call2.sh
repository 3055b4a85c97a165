# call 2: is the autotune lottery inductor's in-place buffers (mutated args cloned inside each timed call)? Two
# processes with inplace_buffers=False (C, D), two plain (E, F), each with an empty inductor cache; picks printed
# with each candidate's measured time
. gpu_s34/common.sh
W=/tmp/r/c2; mkdir -p $W
p C $R $(left 150) 16 /tmp/kcache/ind_C --inductor-option inplace_buffers=False
p D $R $(left 270) 16 /tmp/kcache/ind_D --inductor-option inplace_buffers=False
p E $R $(left 380) 16 /tmp/kcache/ind_E
p F $R $(left 490) 16 /tmp/kcache/ind_F
tar -czf $OUT/c2.tgz -C /tmp/r c2 && ls -la $OUT/c2.tgz
echo "total $(( $(date +%s) - t0 )) s"
