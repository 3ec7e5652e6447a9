#!/usr/bin/env bash
# Sets up edgekit in ./.venv on a fresh machine: CPU torch first (a loose torch requirement would
# pull GBs of CUDA packages), llama-cpp-python built with safe CPU flags into edgekit's own
# wheelhouse (pip's wheel cache ignores CMAKE_ARGS, and a natively built llama.cpp faults on VMs
# whose CPUs report AMX), then edgekit itself in editable mode.
#   bash .ci/setup.sh                 # idempotent; fast once done
#   bash .ci/setup.sh --rebuild-llama # rebuild the llama.cpp wheel
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
WHEELHOUSE=${EDGEKIT_WHEELHOUSE:-$HOME/.cache/edgekit/wheels}
LLAMA_VERSION=$(sed -n 's/^llama-cpp-python==//p' .ci/constraints.txt)
export PIP_DISABLE_PIP_VERSION_CHECK=1

[ -x .venv/bin/python ] || "$PY" -m venv .venv
pip=(.venv/bin/python -m pip install -q -c .ci/constraints.txt)

.venv/bin/python -c "import torch" 2>/dev/null || "${pip[@]}" "torch==2.13.0"

if [ "${1:-}" = "--rebuild-llama" ]; then rm -f "$WHEELHOUSE"/llama_cpp_python-*.whl; fi
if ! ls "$WHEELHOUSE"/llama_cpp_python-"$LLAMA_VERSION"-*.whl >/dev/null 2>&1; then
  echo "building llama-cpp-python $LLAMA_VERSION with portable CPU flags (about 8 minutes, once)..."
  mkdir -p "$WHEELHOUSE"
  CMAKE_ARGS="-DGGML_NATIVE=OFF -DGGML_AVX=ON -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON -DGGML_AVX512=ON -DGGML_AVX512_VNNI=ON -DGGML_AVX512_BF16=ON" \
    .venv/bin/python -m pip wheel -q --no-cache-dir --no-deps -w "$WHEELHOUSE" "llama-cpp-python==$LLAMA_VERSION"
fi
if ! .venv/bin/python -c "import llama_cpp" 2>/dev/null; then
  "${pip[@]}" numpy typing-extensions diskcache jinja2
  .venv/bin/python -m pip install -q --no-index --no-deps --find-links "$WHEELHOUSE" "llama-cpp-python==$LLAMA_VERSION"
fi

# Device tests run the real adb server and a real OpenSSH server on loopback.
command -v adb >/dev/null || { apt-get update -qq && apt-get install -y -qq adb; } || echo "no adb: Android tests skip"
[ -x /usr/sbin/sshd ] || { apt-get update -qq && apt-get install -y -qq openssh-server; } || echo "no sshd: SSH tests skip"
"${pip[@]}" -e ".[torch,onnx,dev,tui,devices]"

# A real llama-bench (static, portable CPU flags) from the same llama.cpp sources, for the on-device
# profiling tests (`edgekit profile --device X --runner llama-bench`); about 4 minutes, once.
BENCH_BIN="$HOME/.cache/edgekit/bin/llama-bench-$LLAMA_VERSION"
if [ ! -x "$BENCH_BIN" ] && command -v cmake >/dev/null && command -v g++ >/dev/null; then
  echo "building llama-bench $LLAMA_VERSION (about 4 minutes, once)..."
  src=$(mktemp -d)
  if .venv/bin/python -m pip download -q --no-deps --no-binary :all: -d "$src" "llama-cpp-python==$LLAMA_VERSION" \
     && tar xzf "$src"/llama_cpp_python-*.tar.gz -C "$src" \
     && cmake -S "$src"/llama_cpp_python-*/vendor/llama.cpp -B "$src/build" -DCMAKE_BUILD_TYPE=Release \
          -DBUILD_SHARED_LIBS=OFF -DLLAMA_CURL=OFF -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF \
          -DLLAMA_BUILD_SERVER=OFF -DGGML_NATIVE=OFF -DGGML_AVX=ON -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON \
          -DGGML_AVX512=ON -DGGML_AVX512_VNNI=ON -DGGML_AVX512_BF16=ON >/dev/null 2>&1 \
     && cmake --build "$src/build" --target llama-bench -j"$(nproc)" >/dev/null 2>&1; then
    mkdir -p "$(dirname "$BENCH_BIN")" && cp "$src/build/bin/llama-bench" "$BENCH_BIN.tmp" && mv "$BENCH_BIN.tmp" "$BENCH_BIN"
  else
    echo "llama-bench did not build: the runner tests skip"
  fi
  rm -rf "$src"
fi
# Snapshot tests for the TUI: pytest-textual-snapshot pins syrupy==4.8.0, which declares pytest<9 (it
# runs fine on the pinned pytest 9), so both are installed without dependency resolution.
.venv/bin/python -c "import pytest_textual_snapshot, syrupy" 2>/dev/null || \
  .venv/bin/python -m pip install -q --no-deps "pytest-textual-snapshot==1.1.0" "syrupy==4.8.0"
echo "edgekit is set up: $(.venv/bin/edgekit --help >/dev/null && echo ok) (.venv/bin/edgekit)"
