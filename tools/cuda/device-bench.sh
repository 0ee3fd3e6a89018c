#!/bin/bash
# Device run for issue 7 (GPU item): pairstyle bench perf --vs-reference on CUDA, bf16 weights
# and activations with f32 LoRA/AdamW, SD1.5-size (512 px) and SDXL-size (1024 px), random weights.
# Expects, in the repo root: .dev/pairstyle.xz (xz of a stripped `tools/cuda/build-cuda.sh 90
# --release --no-default-features` binary) and .whl/ (diffusers 0.42.1 + importlib_metadata wheels,
# which the GPU image lacks); writes its outputs to $OUT. Outputs of 2026-12-04: docs/gpu-2026-12-04/.
set -u -o pipefail
export PYTHONUNBUFFERED=1
T0=$(date +%s)
el() { echo "## elapsed $(( $(date +%s) - T0 )) s: $*"; }
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site
CU=$(python3 -c 'import nvidia, os; print(os.path.join(list(nvidia.__path__)[0], "cu13", "lib"))')
export LD_LIBRARY_PATH=$CU:${LD_LIBRARY_PATH:-}
python3 -c "import lzma, shutil; shutil.copyfileobj(lzma.open('.dev/pairstyle.xz'), open('/tmp/pairstyle', 'wb'))" && chmod +x /tmp/pairstyle
B=/tmp/pairstyle
{ date -u; nproc; nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv
  python3 -c "import torch, diffusers, peft; print('torch', torch.__version__, 'diffusers', diffusers.__version__, 'peft', peft.__version__)"
  ldd $B | grep -i "not found\|cu\|nvrtc"; } 2>&1 | tee $OUT/machine.txt
el smoke
if ! timeout 90 $B --device cuda --dtype bf16 bench perf --model src/toy/model --latent 16 --rank 8 --reps 2 --styles 0,1 2>&1 | tee $OUT/smoke.txt; then
  el "smoke failed; reference SD1.5 alone"
  timeout 150 python3 tools/reference/bench_reference.py --size sd15 --latent 64 --sample-latent 64 --reps 5 --threads 16 --device cuda --dtype bf16 2>&1 | tee $OUT/ref-sd15.txt
  exit 1
fi
el sd15
timeout 150 $B --device cuda --dtype bf16 bench perf --size sd15 --latent 64 --sample-latent 64 --reps 5 --vs-reference --python python3 --reference-script tools/reference/bench_reference.py --mixed-batch 2>&1 | tee $OUT/sd15-bf16.txt
el sdxl
timeout 200 $B --device cuda --dtype bf16 bench perf --size sdxl --latent 128 --sample-latent 128 --reps 3 --vs-reference --python python3 --reference-script tools/reference/bench_reference.py 2>&1 | tee $OUT/sdxl-bf16.txt
el done
