#!/bin/bash
# bench/sparse_ffn_gpu.py on a lent GPU machine, from the repo root with .gpu/ and .whl/ carried:
#   .gpu/skel/                    the skeletons `sparse_ffn_gpu.py prepare` wrote
#   .gpu/llama-bench-cuda.tar.xz  llama-bench built for CUDA (sm_90) elsewhere, with libssl/libcrypto/libgomp beside it
#                                 for a machine without them; rebuilt here from .gpu/llama-src.tar.xz if it sees no GPU
#   .whl/gguf-*.whl               the gguf library (the only package edgekit's planner needs that such images lack)
# Arguments: NAME=BUDGET[,NAME=BUDGET...] and extra options for `sparse_ffn_gpu.py run`.
set -u
T0=$(date +%s)
VRAM=${1:-tinyllama=400MiB,tinyllama=480MiB,tinyllama=560MiB,tinyllama=640MiB,smollm2=64MiB,smollm2=96MiB}
shift || true
echo "== $(date -u) $(nproc) cpus; $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2)"
grep -o -w 'avx512f\|avx2\|amx_tile' /proc/cpuinfo | sort | uniq -c
nvidia-smi --query-gpu=name,memory.total,memory.used,driver_version --format=csv,noheader
# edgekit importable without installing it: the package layout of pyproject's package-dir
mkdir -p /tmp/pkg /tmp/site /tmp/lb
cp -r edgekit /tmp/pkg/ && for d in converters runtime tui devices; do cp -r $d /tmp/pkg/edgekit/$d; done
python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl 2>&1 | grep -v -i warn | tail -2
export PYTHONPATH=/tmp/pkg:/tmp/site PYTHONUNBUFFERED=1
tar xJf .gpu/llama-bench-cuda.tar.xz -C /tmp/lb
LIBS=""
for lib in libcublas.so.13 libcudart.so.13; do
  f=$(find /usr/local /opt /usr/lib -name "$lib" 2>/dev/null | head -1)
  echo "$lib: ${f:-not found}"
  [ -n "$f" ] && LIBS="$LIBS:$(dirname "$f")"
done
LIBS=${LIBS#:}
if LD_LIBRARY_PATH=$LIBS ldd /tmp/lb/llama-bench | grep -q "not found"; then
  LD_LIBRARY_PATH=$LIBS ldd /tmp/lb/llama-bench | grep "not found"
  LIBS="$LIBS:/tmp/lb/libs"
fi
printf '#!/bin/bash\nLD_LIBRARY_PATH=%s exec /tmp/lb/llama-bench "$@"\n' "$LIBS" > /tmp/lb/run.sh
chmod +x /tmp/lb/run.sh
LB=/tmp/lb/run.sh
if ! $LB --list-devices 2>&1 | tee /tmp/devs.txt | grep -q CUDA0; then
  tail -5 /tmp/devs.txt
  echo "== the carried llama-bench sees no CUDA device: building it here"
  mkdir -p /tmp/src && tar xJf .gpu/llama-src.tar.xz -C /tmp/src
  cmake -S /tmp/src/llama.cpp -B /tmp/src/b -G Ninja -DCMAKE_BUILD_TYPE=Release -DBUILD_SHARED_LIBS=OFF -DGGML_CUDA=ON \
    -DCMAKE_CUDA_ARCHITECTURES=90 -DGGML_CUDA_FA=OFF -DGGML_CUDA_NCCL=OFF -DGGML_CUDA_NO_VMM=ON -DGGML_NATIVE=OFF \
    -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON -DGGML_BMI2=ON -DGGML_AVX512=OFF -DGGML_AMX_TILE=OFF -DGGML_AMX_INT8=OFF \
    -DLLAMA_CURL=OFF -DLLAMA_OPENSSL=OFF -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_SERVER=OFF \
    > /tmp/cfg.log 2>&1 || tail -20 /tmp/cfg.log
  ninja -C /tmp/src/b -j"$(nproc)" llama-bench > /tmp/build.log 2>&1 || tail -20 /tmp/build.log
  LB=/tmp/src/b/bin/llama-bench
  $LB --list-devices
fi
echo "== setup took $(( $(date +%s) - T0 )) s"
python3 bench/sparse_ffn_gpu.py run --skeletons .gpu/skel --vram "$VRAM" --llama-bench $LB \
  --out "${OUT:-bench/results}" "$@" 2>&1 | tee "${OUT:-/tmp}/sparse_ffn_gpu.log"
echo "== total $(( $(date +%s) - T0 )) s"
