#!/usr/bin/env bash
# Sets up edgekit in ./.venv on a fresh machine of any x86-64 CPU:
#   * CPU PyTorch first (a loose torch requirement would pull GBs of CUDA packages);
#   * llama-cpp-python built for the instruction sets this CPU has (never AMX, which VMs report but
#     fault on), into edgekit's wheelhouse under a key naming those instruction sets, so that another
#     machine never reuses a build it cannot run; built in the background while the rest installs;
#   * a smoke decode of a tiny GGUF in a child process: a crash rebuilds once for a safer level, or
#     stops naming the missing CPU features;
#   * edgekit itself in editable mode.
# The main command installs only what edgekit runs with (no system packages). With --tests it also installs
# what only the test suite needs: pytest and the other dev tools, the static llama-bench runner (built for
# x86-64-v3, the level devices are likely to have), and system-wide qemu-user, adb and OpenSSH's server.
#
#   bash .ci/setup.sh                       # idempotent; a second run takes seconds
#   bash .ci/setup.sh --tests               # plus the test-only tools
#   bash .ci/setup.sh --bench               # plus llama-imatrix/llama-quantize for the benchmarks' peer rows
#   bash .ci/setup.sh --rebuild-llama       # rebuild llama.cpp for this CPU
#   bash .ci/setup.sh --rebuild-llama --cpu x86-64-v3   # ... for a level (auto, x86-64[-v2|-v3|-v4])
# The level --cpu names (or the safer one setup falls back to when the smoke decode crashes) is remembered
# for this .venv: later runs keep it until --cpu auto (everything this CPU has) or another --cpu.
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$(pwd -P)
PY=${PYTHON:-python3}
CACHE=${EDGEKIT_CACHE:-$HOME/.cache/edgekit}
WHEELHOUSE=${EDGEKIT_WHEELHOUSE:-$CACHE/wheels}
LLAMA_VERSION=$(sed -n 's/^llama-cpp-python==//p' .ci/constraints.txt)
BUILD_PY=runtime/llamacpp_build.py
export PIP_DISABLE_PIP_VERSION_CHECK=1 CMAKE_BUILD_PARALLEL_LEVEL=${CMAKE_BUILD_PARALLEL_LEVEL:-$(nproc)}

TESTS=0 BENCH=0 REBUILD=0 CPU=${EDGEKIT_LLAMA_CPU:-}
while [ $# -gt 0 ]; do
  case "$1" in
    --tests) TESTS=1 ;;
    --bench) BENCH=1 ;;
    --rebuild-llama) REBUILD=1 ;;
    --cpu) CPU=${2:?--cpu needs a level: auto, x86-64, x86-64-v2, x86-64-v3, x86-64-v4}; shift ;;
    *) echo "setup.sh: unknown option $1 (use --tests, --bench, --rebuild-llama, --cpu LEVEL)" >&2; exit 2 ;;
  esac
  shift
done

T0=$SECONDS
say() { printf '[setup %3ds] %s\n' $((SECONDS - T0)) "$*"; }
die() { printf 'setup: %s\n' "$*" >&2; exit 1; }

if [ ! -x .venv/bin/python ]; then
  say "creating .venv"; "$PY" -m venv .venv
elif ! .venv/bin/python -c "import pip" >/dev/null 2>&1; then
  # What an interrupted `python -m venv` leaves: an interpreter without pip.
  say "repairing .venv: it has no pip (an interrupted creation?)"
  .venv/bin/python -m ensurepip >/dev/null 2>&1 || { say "recreating .venv"; rm -rf .venv; "$PY" -m venv .venv; }
fi
# pip configs that name absent local indexes make pip warn once per package: keep the output readable.
quiet() { "$@" 2> >(grep -v "is ignored: it is neither a file nor a directory" >&2); }
pip=(quiet .venv/bin/python -m pip install -q -c .ci/constraints.txt)

# The llama-cpp-python sources, downloaded once and shared by the wheel and the llama-bench builds.
sdist() {
  local src="$CACHE/src/llama_cpp_python-$LLAMA_VERSION.tar.gz"
  if [ ! -f "$src" ]; then
    mkdir -p "$CACHE/src"
    local tmp; tmp=$(mktemp -d "$CACHE/src/.dl-XXXXXX")
    quiet .venv/bin/python -m pip download -q --no-deps --no-binary :all: -d "$tmp" "llama-cpp-python==$LLAMA_VERSION" >/dev/null
    mv "$tmp"/llama_cpp_python-*.tar.gz "$src"; rm -rf "$tmp"
  fi
  echo "$src"
}

# build_wheel LEVEL: llama-cpp-python for LEVEL's instruction sets into $WHEELHOUSE/<version>-<key>/,
# only the libraries the Python package loads (no mtmd, no common), with both cores.
wheel_dir() { echo "$WHEELHOUSE/llama-cpp-python-$LLAMA_VERSION-$(.venv/bin/python $BUILD_PY key --cpu "$1")"; }
build_wheel() {
  local dir tmp src args
  dir=$(wheel_dir "$1"); src=$(sdist)
  args="$(.venv/bin/python $BUILD_PY cmake-args --cpu "$1") -DLLAVA_BUILD=OFF"
  mkdir -p "$WHEELHOUSE"; tmp=$(mktemp -d "$WHEELHOUSE/.build-XXXXXX")
  if ! CMAKE_ARGS="$args" .venv/bin/python -m pip wheel --no-cache-dir --no-deps -w "$tmp" \
        -C "build.targets=llama;llama-common" "$src" >"$tmp/build.log" 2>&1; then
    tail -20 "$tmp/build.log" >&2; rm -rf "$tmp"; return 1
  fi
  .venv/bin/python $BUILD_PY record "$tmp/build.json" --cpu "$1" --version "$LLAMA_VERSION"
  rm -f "$tmp/build.log"; chmod 755 "$tmp"; rm -rf "$dir"; mv "$tmp" "$dir"
}
install_wheel() {
  local dir; dir=$(wheel_dir "$1")
  quiet .venv/bin/python -m pip install -q --no-index --no-deps --force-reinstall --find-links "$dir" \
    "llama-cpp-python==$LLAMA_VERSION" || die "llama-cpp-python $LLAMA_VERSION did not install from $dir (above); rerun with --rebuild-llama"
  .venv/bin/python $BUILD_PY install-record "$dir" >/dev/null
}

# No --cpu: the level setup chose for this .venv before (an earlier --cpu, or a crash's fallback), else auto.
if [ -z "$CPU" ]; then
  CPU=$(.venv/bin/python $BUILD_PY remembered)
  [ "$CPU" = auto ] || say "llama.cpp: using $CPU, the CPU level chosen earlier for this .venv (--cpu auto goes back to all this CPU has)"
fi
KEY=$(.venv/bin/python $BUILD_PY key --cpu "$CPU")
WHEEL=$(wheel_dir "$CPU")
[ "$REBUILD" = 1 ] && rm -rf "$WHEEL"
BUILD_PID=
if ! ls "$WHEEL"/llama_cpp_python-*.whl >/dev/null 2>&1; then
  say "building llama.cpp for this CPU ($KEY) in the background: about 4 minutes on 2 cores, once"
  build_wheel "$CPU" & BUILD_PID=$!
fi

if ! .venv/bin/python -c "import torch" 2>/dev/null; then
  say "installing PyTorch (CPU build): about 1 minute"
  "${pip[@]}" "torch==2.13.0"
fi
# What edgekit runs with; --tests adds the test tools (pytest, ruff, the openai client...). Each set has its
# stamp, so the main command after --tests (or the other way round) reinstalls nothing it already has.
EXTRAS=torch,onnx,tui,devices,serve,coreml,mlc,diffusion,aqlm
WANT=$(cat pyproject.toml .ci/constraints.txt | sha256sum | cut -c1-16)
# Installed means importable from elsewhere (-I, from /: not the checkout's folder on sys.path), from this checkout.
edgekit_installed() {
  [ -x .venv/bin/edgekit ] && (cd / && "$ROOT/.venv/bin/python" -I -c \
    "import edgekit, os, sys; sys.exit(not os.path.realpath(edgekit.__file__).startswith(sys.argv[1] + os.sep))" \
    "$ROOT") >/dev/null 2>&1
}
install_edgekit() {  # STAMP EXTRAS WHAT
  if [ "$(cat "$1" 2>/dev/null)" != "$WANT" ] || ! edgekit_installed; then
    say "installing $3: about 2 minutes"
    "${pip[@]}" numpy typing-extensions diskcache jinja2
    "${pip[@]}" -e ".[$2]"
    echo "$WANT" >"$1"
  fi
}
install_edgekit .venv/.edgekit-setup "$EXTRAS" "edgekit and its dependencies"
[ "$TESTS" = 1 ] && install_edgekit .venv/.edgekit-setup-tests "$EXTRAS,dev" "the test tools (pytest, ruff, openai)"

if [ -n "$BUILD_PID" ]; then
  say "waiting for the llama.cpp build ($KEY)"
  wait "$BUILD_PID" || die "llama-cpp-python $LLAMA_VERSION did not build (log above); check that cmake and g++ are installed"
  say "llama.cpp built"
fi
# Reinstalled when the installed build is not this one: another key, another version than the pinned one
# (a pull that moved the pin, with that wheel already cached), a changed library, or a fresh build.
if [ -n "$BUILD_PID" ]; then
  install_wheel "$CPU"
elif ! why=$(.venv/bin/python $BUILD_PY installed --cpu "$CPU" --version "$LLAMA_VERSION"); then
  say "installing llama-cpp-python $LLAMA_VERSION ($KEY): $why"
  install_wheel "$CPU"
fi

# Setup checks what it built: a tiny GGUF loaded and decoded in a child process (cached per library).
SMOKE=.venv/.llama-smoke-ok
LIBSHA=$(.venv/bin/python -c "import json,sys; print(json.load(open(sys.prefix+'/share/edgekit/llama-build.json')).get('cpu_library_sha256',''))")
if [ "$(cat $SMOKE 2>/dev/null)" != "$LIBSHA" ]; then
  say "checking llama.cpp: loading a tiny GGUF and decoding a token"
  rc=0; .venv/bin/python $BUILD_PY check || rc=$?
  [ $rc = 0 ] || [ $rc = 3 ] || die "the llama.cpp smoke check failed (above); rerun with --rebuild-llama"
  if [ $rc = 3 ]; then
    SAFE=$(.venv/bin/python -c "import sys; sys.path.insert(0,'runtime'); import llamacpp_build as b; print('x86-64-v3' if 'AVX2' in b.supported(b.cpu_flags()) else 'x86-64-v2')")
    [ "$KEY" != "$SAFE" ] || die "llama.cpp does not run on this CPU even at $SAFE (see above)"
    if ! ls "$(wheel_dir "$SAFE")"/llama_cpp_python-*.whl >/dev/null 2>&1; then
      say "rebuilding llama.cpp for $SAFE: about 4 minutes"
      build_wheel "$SAFE" || die "llama-cpp-python did not build for $SAFE"
    fi
    install_wheel "$SAFE"; KEY=$SAFE CPU=$SAFE
    say "llama.cpp now runs the $SAFE build; later runs keep it (--cpu auto tries all this CPU has again)"
    .venv/bin/python $BUILD_PY check || die "llama.cpp does not run on this CPU even at $SAFE (see above)"
    LIBSHA=$(.venv/bin/python -c "import json,sys; print(json.load(open(sys.prefix+'/share/edgekit/llama-build.json')).get('cpu_library_sha256',''))")
  fi
  echo "$LIBSHA" >$SMOKE
fi
.venv/bin/python $BUILD_PY remember "$CPU"

if [ "$TESTS" = 1 ]; then
  # Device tests run the real adb server and a real OpenSSH server on loopback; the portability test
  # runs llama.cpp as an AVX2-only CPU would, under qemu-user.
  need=()
  command -v adb >/dev/null || need+=(adb)
  [ -x /usr/sbin/sshd ] || need+=(openssh-server)
  command -v qemu-x86_64 >/dev/null || need+=(qemu-user)
  command -v objdump >/dev/null || need+=(binutils)
  if [ ${#need[@]} -gt 0 ]; then
    say "installing ${need[*]} (Debian packages)"
    { apt-get update -qq && apt-get install -y -qq "${need[@]}" >/dev/null; } || echo "could not install ${need[*]}: those tests skip"
  fi
  # Snapshot tests for the TUI: pytest-textual-snapshot pins syrupy==4.8.0, which declares pytest<9 (it
  # runs fine on the pinned pytest 9), so both are installed without dependency resolution.
  .venv/bin/python -c "import pytest_textual_snapshot, syrupy" 2>/dev/null || \
    quiet .venv/bin/python -m pip install -q --no-deps "pytest-textual-snapshot==1.1.0" "syrupy==4.8.0"
  # A real llama-bench (static) from the same sources, for `edgekit profile --device X --runner`: built
  # for x86-64-v3 (capped by this CPU), since it is pushed to other machines; its record sits beside it.
  BKEY=$(.venv/bin/python $BUILD_PY key --cpu x86-64-v3)
  BENCH_BIN="$CACHE/bin/llama-bench-$LLAMA_VERSION-$BKEY"
  if [ ! -x "$BENCH_BIN" ] && command -v cmake >/dev/null && command -v g++ >/dev/null; then
    say "building the static llama-bench runner ($BKEY): about 4 minutes, once"
    src=$(mktemp -d)
    if tar xzf "$(sdist)" -C "$src" \
       && cmake -S "$src"/llama_cpp_python-*/vendor/llama.cpp -B "$src/build" -DCMAKE_BUILD_TYPE=Release \
            -DBUILD_SHARED_LIBS=OFF -DLLAMA_CURL=OFF -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF \
            -DLLAMA_BUILD_SERVER=OFF $(.venv/bin/python $BUILD_PY cmake-args --cpu x86-64-v3) >/dev/null 2>&1 \
       && cmake --build "$src/build" --target llama-bench -j"$(nproc)" >/dev/null 2>&1; then
      mkdir -p "$(dirname "$BENCH_BIN")"
      .venv/bin/python $BUILD_PY record "$BENCH_BIN.json" --cpu x86-64-v3 --version "$LLAMA_VERSION"
      cp "$src/build/bin/llama-bench" "$BENCH_BIN.tmp" && mv "$BENCH_BIN.tmp" "$BENCH_BIN"
    else
      echo "llama-bench did not build: the runner tests skip"
    fi
    rm -rf "$src"
  fi
fi
if [ "$BENCH" = 1 ]; then
  # llama-imatrix and llama-quantize from the same sources, for the benchmarks' imatrix-llama.cpp rows (bench/low_bit.py,
  # bench/gguf_quality.py): built for this CPU, since it only runs here.
  IMATRIX_BIN="$CACHE/bin/llama-imatrix-$LLAMA_VERSION-$KEY"
  if [ ! -x "$IMATRIX_BIN" ] && command -v cmake >/dev/null && command -v g++ >/dev/null; then
    say "building llama-imatrix ($KEY): about 10 minutes, once"
    src=$(mktemp -d)
    if tar xzf "$(sdist)" -C "$src" \
       && cmake -S "$src"/llama_cpp_python-*/vendor/llama.cpp -B "$src/build" -DCMAKE_BUILD_TYPE=Release \
            -DBUILD_SHARED_LIBS=OFF -DLLAMA_CURL=OFF -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF \
            -DLLAMA_BUILD_SERVER=OFF $(.venv/bin/python $BUILD_PY cmake-args --cpu "$CPU") >/dev/null 2>&1 \
       && cmake --build "$src/build" --target llama-imatrix llama-quantize -j"$(nproc)" >/dev/null 2>&1; then
      mkdir -p "$(dirname "$IMATRIX_BIN")"
      cp "$src/build/bin/llama-quantize" "$CACHE/bin/llama-quantize-$LLAMA_VERSION-$KEY"
      cp "$src/build/bin/llama-imatrix" "$IMATRIX_BIN.tmp" && mv "$IMATRIX_BIN.tmp" "$IMATRIX_BIN"
    else
      echo "llama-imatrix did not build: the imatrix-llama.cpp benchmark rows are skipped"
    fi
    rm -rf "$src"
  fi
fi
.venv/bin/edgekit --help >/dev/null || die "edgekit does not start (.venv/bin/edgekit --help failed, above); rerun this script"
say "edgekit is set up: ok (.venv/bin/edgekit; llama.cpp built for $KEY)"
