#!/usr/bin/env bash
# Build llama.cpp's llama-server, llama-bench, llama-quantize and CLI from the llama.cpp tree
# vendored in the llama-cpp-python sdist, for side-by-side benchmarks
# (scripts/vs_llamacpp.py). The sdist comes from PyPI through pip, so the build
# needs no git clone and no network beyond the package index.
#
# Usage:
#   scripts/build_llamacpp.sh                  # build (or reuse) into the cache dir
#   LLAMACPP_DIR=/opt/llama.cpp scripts/build_llamacpp.sh
#   FORCE=1 scripts/build_llamacpp.sh          # rebuild even if the binaries exist
#   nice -n 19 scripts/build_llamacpp.sh > /tmp/llamacpp-build.log 2>&1 &
#
# Environment:
#   LLAMACPP_DIR            where to build (default ~/.cache/verispec/llama.cpp)
#   LLAMA_CPP_PYTHON_VERSION  sdist version (default 0.3.36)
#   SDIST                   path to an already downloaded sdist (optional)
#   JOBS                    parallel compile jobs (default 2)
#   FORCE=1                 rebuild even when the binaries are present
#   LLAMACPP_AMX=0|1        build without / with Intel AMX (default: probe whether
#                           this machine runs AMX instructions; see below)
#   CC, CFLAGS, CXXFLAGS    as usual for cmake
#
# Layout of LLAMACPP_DIR afterwards:
#   sdist/   the downloaded .tar.gz
#   src/     the extracted sdist (vendor/llama.cpp is the source tree)
#   build/   the cmake build tree
#   bin/     llama-server, llama-bench, llama-quantize, llama-cli (+ llama-completion when present)
#
# Rerunnable: when every binary already sits in bin/, built from the same sdist
# with the same flags (bin/.stamp), it prints their paths and exits; an
# interrupted build resumes in build/ (cmake and ninja are incremental).
set -euo pipefail

VERSION="${LLAMA_CPP_PYTHON_VERSION:-0.3.36}"
LLAMACPP_DIR="${LLAMACPP_DIR:-$HOME/.cache/verispec/llama.cpp}"
JOBS="${JOBS:-2}"
SDIST_DIR="$LLAMACPP_DIR/sdist"
SRC_PARENT="$LLAMACPP_DIR/src"
SRC="$SRC_PARENT/llama_cpp_python-$VERSION/vendor/llama.cpp"
BUILD="$LLAMACPP_DIR/build"
BIN="$LLAMACPP_DIR/bin"

log() { printf '[build_llamacpp %s] %s\n' "$(date +%H:%M:%S)" "$*"; }

print_paths() {
    log "binaries:"
    for b in "$BIN"/llama-*; do
        [ -x "$b" ] && echo "$b"
    done
}

# --- 0. the configuration --------------------------------------------------------
# Notes on the flags:
# - LLAMA_BUILD_UI/LLAMA_USE_PREBUILT_UI=OFF: otherwise the server's web UI is
#   fetched from Hugging Face at build time, which fails offline.
# - LLAMA_CURL/LLAMA_OPENSSL=OFF: no model downloads, no HTTPS; models are local.
#   (LLAMA_CURL is gone from recent trees; cmake only warns it is unused.)
# - GGML_NATIVE=ON: -march=native, as a user building for this machine would.
# - BUILD_SHARED_LIBS=OFF: self-contained binaries that can be copied to bin/.
# - tests and examples off: they are not needed and double the build time.
CMAKE_FLAGS=(
    -DCMAKE_BUILD_TYPE=Release
    -DGGML_NATIVE=ON
    -DLLAMA_CURL=OFF
    -DLLAMA_OPENSSL=OFF
    -DLLAMA_BUILD_UI=OFF
    -DLLAMA_USE_PREBUILT_UI=OFF
    -DBUILD_SHARED_LIBS=OFF
    -DLLAMA_BUILD_TESTS=OFF
    -DLLAMA_BUILD_EXAMPLES=OFF
    -DLLAMA_BUILD_SERVER=ON
    -DLLAMA_BUILD_TOOLS=ON
)

# AMX: -march=native turns it on wherever CPUID reports it, but some virtual
# machines report AMX and then fault on its first instruction (seen here: a
# Sapphire Rapids guest where ggml's AMX kernel dies with SIGILL on `tilezero`
# even after the arch_prctl permission is granted). So when the compiler would
# use AMX, run one tile instruction first and build without AMX if it faults.
# LLAMACPP_AMX=1 forces it on, LLAMACPP_AMX=0 off.
CC_PROBE="${CC:-cc}"
amx_works() {
    local dir rc
    dir=$(mktemp -d)
    cat > "$dir/amx.c" <<'EOF_AMX'
#include <immintrin.h>
#include <stdint.h>
#include <string.h>
#include <unistd.h>
#include <sys/syscall.h>
int main(void) {
    /* ARCH_REQ_XCOMP_PERM, XFEATURE_XTILEDATA: what ggml asks for too */
    if (syscall(SYS_arch_prctl, 0x1023, 18)) return 2;
    struct { uint8_t palette, start; uint8_t reserved[14]; uint16_t colsb[16]; uint8_t rows[16]; }
        __attribute__((aligned(64))) cfg;
    memset(&cfg, 0, sizeof cfg);
    cfg.palette = 1; cfg.colsb[0] = 64; cfg.rows[0] = 16;
    _tile_loadconfig(&cfg);
    _tile_zero(0);
    _tile_release();
    return 0;
}
EOF_AMX
    rc=1
    if "$CC_PROBE" -O2 -march=native "$dir/amx.c" -o "$dir/amx" 2>/dev/null; then
        ( "$dir/amx"; exit $? ) 2>/dev/null && rc=0
    fi
    rm -rf "$dir"
    return $rc
}
NATIVE_AMX=0
NO_AMX=""
NATIVE_MACROS=$("$CC_PROBE" -march=native -dM -E -x c - </dev/null 2>/dev/null || true)
if grep -q '__AMX_TILE__' <<<"$NATIVE_MACROS"; then
    NATIVE_AMX=1
fi
if [ "$NATIVE_AMX" = 1 ]; then
    case "${LLAMACPP_AMX:-probe}" in
        1) use_amx=1 ;;
        0) use_amx=0 ;;
        *) if amx_works; then use_amx=1; else use_amx=0; fi ;;
    esac
    if [ "$use_amx" = 0 ]; then
        # GCC and clang keep an explicit -mno-X over what -march=native implies,
        # whatever the order on the command line.
        NO_AMX="-mno-amx-tile -mno-amx-int8 -mno-amx-bf16"
        AMX_NOTE="AMX off (reported by the CPU but not usable here, or LLAMACPP_AMX=0)"
    else
        AMX_NOTE="AMX on"
    fi
else
    AMX_NOTE="no AMX in -march=native"
fi
# Always passed, so that a value cached by an earlier configure never lingers.
CMAKE_FLAGS+=(-DCMAKE_C_FLAGS="${CFLAGS:-}${NO_AMX:+ $NO_AMX}" -DCMAKE_CXX_FLAGS="${CXXFLAGS:-}${NO_AMX:+ $NO_AMX}")

# What the binaries in bin/ were built from: a different sdist or different
# flags mean a rebuild.
STAMP="llama-cpp-python==$VERSION ${CMAKE_FLAGS[*]}"

# --- 0b. already built? ----------------------------------------------------------
# The CLI is llama-cli in this tree; older/newer trees may only have
# llama-completion, so "built" means server + bench + one of the two CLIs.
if [ "${FORCE:-0}" != "1" ] && [ -x "$BIN/llama-server" ] && [ -x "$BIN/llama-bench" ] \
   && { [ -x "$BIN/llama-cli" ] || [ -x "$BIN/llama-completion" ]; } \
   && [ "$(cat "$BIN/.stamp" 2>/dev/null)" = "$STAMP" ]; then
    log "already built in $BIN ($AMX_NOTE; FORCE=1 to rebuild)"
    print_paths
    exit 0
fi

for tool in cmake python3; do
    command -v "$tool" >/dev/null || { echo "error: $tool not found" >&2; exit 1; }
done
mkdir -p "$SDIST_DIR" "$SRC_PARENT" "$BIN"
T0=$(date +%s)
log "$AMX_NOTE"

# --- 1. sdist ----------------------------------------------------------------
TARBALL="$SDIST_DIR/llama_cpp_python-$VERSION.tar.gz"
if [ ! -s "$TARBALL" ]; then
    if [ -n "${SDIST:-}" ] && [ -s "$SDIST" ]; then
        log "using sdist $SDIST"
        cp "$SDIST" "$TARBALL"
    else
        log "downloading llama-cpp-python==$VERSION sdist from PyPI"
        python3 -m pip download --no-deps --no-binary :all: \
            "llama-cpp-python==$VERSION" -d "$SDIST_DIR"
    fi
fi
[ -s "$TARBALL" ] || { echo "error: no sdist at $TARBALL" >&2; exit 1; }

# --- 2. extract --------------------------------------------------------------
if [ ! -f "$SRC/CMakeLists.txt" ]; then
    log "extracting $TARBALL"
    rm -rf "$SRC_PARENT/llama_cpp_python-$VERSION"
    tar xzf "$TARBALL" -C "$SRC_PARENT" "llama_cpp_python-$VERSION/vendor/llama.cpp"
fi

# --- 3. configure --------------------------------------------------------------
GENERATOR=()
if command -v ninja >/dev/null; then
    GENERATOR=(-G Ninja)
fi
# A build tree configured with another generator cannot be reused.
if [ -f "$BUILD/CMakeCache.txt" ]; then
    want="Unix Makefiles"; [ ${#GENERATOR[@]} -gt 0 ] && want="Ninja"
    have=$(sed -n 's/^CMAKE_GENERATOR:INTERNAL=//p' "$BUILD/CMakeCache.txt")
    [ "$have" = "$want" ] || { log "generator changed ($have -> $want), wiping build/"; rm -rf "$BUILD"; }
fi

log "configuring $SRC -> $BUILD"
cmake -S "$SRC" -B "$BUILD" "${GENERATOR[@]}" "${CMAKE_FLAGS[@]}"

# --- 4. build only the targets we need ----------------------------------------
TARGETS_AVAILABLE=$(cmake --build "$BUILD" --target help 2>/dev/null || true)
has_target() { grep -Eq "(^|[ .])$1(:| |$)" <<<"$TARGETS_AVAILABLE"; }

TARGETS=(llama-server llama-bench)
CLI_FOUND=0
for cli in llama-cli llama-completion; do
    if has_target "$cli"; then
        TARGETS+=("$cli"); CLI_FOUND=1
    fi
done
[ "$CLI_FOUND" = 1 ] || log "warning: no CLI target (llama-cli / llama-completion) in this tree"
# llama-quantize makes the GGUF files of every type that the kernel tests compare against
has_target llama-quantize && TARGETS+=(llama-quantize)
for t in llama-server llama-bench; do
    has_target "$t" || { echo "error: target $t not in this tree" >&2; exit 1; }
done

log "building ${TARGETS[*]} with $JOBS jobs"
cmake --build "$BUILD" --config Release -j "$JOBS" --target "${TARGETS[@]}"

# --- 5. collect ------------------------------------------------------------------
for t in "${TARGETS[@]}"; do
    exe="$BUILD/bin/$t"
    [ -x "$exe" ] || { echo "error: $exe missing after build" >&2; exit 1; }
    cp -f "$exe" "$BIN/$t.tmp" && mv -f "$BIN/$t.tmp" "$BIN/$t"
done
# The vendored tree is no git checkout, so the binaries report "build 0, commit unknown":
# record where they come from next to them.
echo "llama.cpp vendored in llama-cpp-python==$VERSION (PyPI sdist), built $(date -u +%Y-%m-%dT%H:%M:%SZ); $AMX_NOTE" > "$BIN/SOURCE"
printf '%s' "$STAMP" > "$BIN/.stamp"
"$BIN/llama-server" --version 2>&1 | sed 's/^/  /' || true

T1=$(date +%s)
log "done in $((T1 - T0)) s"
print_paths
