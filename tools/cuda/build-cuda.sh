#!/usr/bin/env bash
# Build pairstyle with the `cuda` feature on a machine without a system CUDA toolkit or driver:
# installs the pinned CUDA 13.0 wheels of requirements.txt into a venv, points candle-kernels' nvcc
# build at them, and gives the linker what candle's cudarc links (-lcuda -lnvrtc -lcurand -lcublas
# -lcublasLt -lcudart): unversioned links to the wheels' libraries, and a stub libcuda.so (soname
# libcuda.so.1) exporting every driver function cudarc declares. The stub only satisfies the link;
# at run time the real driver's libcuda.so.1 is loaded.
# Usage: tools/cuda/build-cuda.sh [COMPUTE_CAP] [extra cargo args]   (COMPUTE_CAP default 90 = H100/H200)
# Cargo args: e.g. --release for the binary to deploy. Env: CUDA_VENV (default ./target/cuda-venv),
# CARGO_TARGET_DIR as usual.
# Running the binary: LD_LIBRARY_PATH must reach CUDA 13 cublas/curand/nvrtc/cudart (a system
# toolkit's lib64, or PyTorch cu130's site-packages/nvidia/cu13/lib) and the driver's libcuda.so.1.
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
root="$(cd "$here/../.." && pwd)"
cap="${1:-90}"
shift || true
venv="${CUDA_VENV:-$root/target/cuda-venv}"
if [ ! -x "$venv/bin/python" ]; then
  python3 -m venv "$venv"
fi
"$venv/bin/pip" install -q --no-deps -r "$here/requirements.txt"
cuda="$("$venv/bin/python" -c 'import nvidia, os; print(os.path.join(list(nvidia.__path__)[0], "cu13"))')"

# Link-time libraries: unversioned names for the wheels' sonames, and the libcuda stub.
link="$venv/link"
mkdir -p "$link"
for lib in cudart cublas cublasLt curand nvrtc; do
  so="$(find "$cuda/lib" -maxdepth 1 -name "lib$lib.so.*" | sort | head -1)"
  [ -n "$so" ] || { echo "build-cuda: lib$lib.so.* missing from $cuda/lib" >&2; exit 1; }
  ln -sf "$so" "$link/lib$lib.so"
done
cudarc_src="$(cargo metadata --format-version 1 --features cuda --manifest-path "$root/Cargo.toml" |
  "$venv/bin/python" -c 'import json, os, sys
for p in json.load(sys.stdin)["packages"]:
    if p["name"] == "cudarc":
        print(os.path.dirname(p["manifest_path"]))')"
[ -d "$cudarc_src" ] || { echo "build-cuda: cudarc sources not found (cargo metadata)" >&2; exit 1; }
grep -o 'pub unsafe fn cu[A-Za-z0-9_]*' "$cudarc_src/src/driver/sys/mod.rs" | sed 's/pub unsafe fn //' | sort -u |
  sed 's/.*/void &(void) {}/' >"$link/libcuda-stub.c"
cc -shared -fPIC -Wl,-soname,libcuda.so.1 -o "$link/libcuda.so" "$link/libcuda-stub.c"

export CUDA_HOME="$cuda" NVCC="$cuda/bin/nvcc" PATH="$cuda/bin:$PATH" CUDA_COMPUTE_CAP="$cap"
export LIBRARY_PATH="$link:$cuda/lib${LIBRARY_PATH:+:$LIBRARY_PATH}"
toolchain="$("$NVCC" --version | tail -1); compute capability $cap"
echo "nvcc: $toolchain; cudarc from $cudarc_src" >&2
cd "$root"
# candle-kernels caches its PTX by source, not by compiler: PTX left by another nvcc (a newer PTX
# ISA than the target driver loads) or another compute capability would be reused silently.
marker="${CARGO_TARGET_DIR:-$root/target}/.cuda-toolchain"
if [ "$(cat "$marker" 2>/dev/null)" != "$toolchain" ]; then
  cargo clean -p candle-kernels
  mkdir -p "$(dirname "$marker")"
  echo "$toolchain" >"$marker"
fi
exec cargo build --features cuda --bin pairstyle "$@"
