#!/usr/bin/env bash
# Pack the GPU machine's extra packages (the wheels that ../shared/gpu/stage-wheels.sh stages in .gpu-wheels-a and
# .gpu-wheels-b: fla-core, tilelang and their needs, plus any other wheel put there, e.g. flash-qla) into ONE xz
# archive of their unpacked files, small enough (~41 MB) to travel in one device call with the tokenizer:
#   bash benchmarks/pack_gpu_site.sh                    # writes runs/gpu-site.tar.xz (a few minutes of xz)
#   on the device (carry runs/gpu-site.tar.xz): mkdir -p /tmp/site && tar -xJf runs/gpu-site.tar.xz -C /tmp/site
#   then PYTHONPATH=/tmp/site. A wheel is a zip of its site-packages files, so unpacking is what pip would install
#   (console scripts aside); the wheels are pure Python or manylinux for CPython 3.12, as the device's Python.
set -euo pipefail
shopt -s nullglob
out=${1:-runs/gpu-site.tar.xz}
wheels=(.gpu-wheels-a/*.whl .gpu-wheels-b/*.whl)
[ ${#wheels[@]} -gt 0 ] || { echo "no wheels in .gpu-wheels-a or .gpu-wheels-b: run ../shared/gpu/stage-wheels.sh" >&2; exit 1; }
site=$(mktemp -d)
trap 'rm -rf "$site"' EXIT
for wheel in "${wheels[@]}"; do python3 -m zipfile -e "$wheel" "$site"; done
# cuda-bindings (FlashQLA's and TileLang's) ships its Cython sources beside the built modules: ~90 MB that nothing
# imports, 3 MB of the archive
find "$site/cuda" \( -name '*.cpp' -o -name '*.pyx' -o -name '*.pxd' \) -delete 2>/dev/null || true
# z3-solver's command-line binary (22 MB, 7 MB of the archive): TileLang imports z3's Python module and its libz3.so,
# never the program. (Not tvm_ffi's libtvm_ffi_testing.so, small as it looks: tvm_ffi loads it on import, and fla
# and FlashQLA then fail to import; BENCHMARKS.md section 1, session 48.)
rm -f "$site"/z3_solver-*.data/data/bin/z3
mkdir -p "$(dirname "$out")"
tar -C "$site" -cf - . | xz -9 -T0 > "$out"
du -h "$out"
