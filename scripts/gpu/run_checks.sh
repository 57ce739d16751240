#!/usr/bin/env bash
# Run ON THE DEVICE MACHINE (repo root; .whl carried, see fetch_wheels.sh). One phase per call,
# so each fits the 10-minute command limit; everything lands in $OUT.
#   tests      every test marked gpu (CUDA strategy, engine, bench and a bf16 pipeline run)
#   bench      make bench's GPU table: the three model sizes at 32x32x3, fp32, mixed clipping
#   bench-bf16 the same under bf16 autocast
#   bench-modes the three clipping modes on the 25.8M model (fp32)
set -uo pipefail
phase=${1:?usage: run_checks.sh tests|bench|bench-bf16|bench-modes}
out=${OUT:-outputs/gpu}
mkdir -p "$out"
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
  || exit 1
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv > "$out/env.txt"
# Preflight: the versions this machine has, and every module the phases use, imported once; a
# missing wheel would otherwise stop pytest at collection, after the machine's start was paid for.
python3 - <<'EOF' 2>&1 | tee -a "$out/env.txt"
import importlib.metadata as m

import torch

print("torch", torch.__version__, "cuda", torch.version.cuda, torch.cuda.get_device_name(0))
for name in ("torchvision", "lightning", "torchmetrics", "diffusers", "huggingface_hub", "opacus",
             "hydra-core", "omegaconf", "dp-accounting", "torch-fidelity", "numpy", "pytest"):
    try:
        print(name, m.version(name))
    except m.PackageNotFoundError:
        print(name, "MISSING")
import dpgen.bench, dpgen.evaluate, dpgen.pipeline, dpgen.sampling  # noqa: E401,F401
print("preflight: dpgen imports")
EOF
[ "${PIPESTATUS[0]}" -eq 0 ] || { echo "preflight failed (see above, and $out/env.txt)" >&2; exit 3; }

sizes='bench.image_size=32 bench.channels=3 bench.models=[unet_small,unet_medium,unet_large]'
case "$phase" in
  tests)
    python3 -m pytest -q -m gpu -p no:cacheprovider --continue-on-collection-errors tests 2>&1 | tee "$out/pytest_gpu.log" ;;
  bench)
    python3 -m dpgen.bench bench.device=cuda $sizes bench.clipping=[mixed] \
      bench.output="$out/bench_cuda_fp32.json" 2>&1 | tee "$out/bench_cuda_fp32.log" ;;
  bench-bf16)
    python3 -m dpgen.bench bench.device=cuda bench.precision=bf16 $sizes bench.clipping=[mixed] \
      bench.output="$out/bench_cuda_bf16.json" 2>&1 | tee "$out/bench_cuda_bf16.log" ;;
  bench-modes)
    python3 -m dpgen.bench bench.device=cuda bench.image_size=32 bench.channels=3 bench.models=[unet_large] \
      bench.trainable=[full] bench.output="$out/bench_cuda_modes.json" 2>&1 | tee "$out/bench_cuda_modes.log" ;;
  *) echo "unknown phase $phase" >&2; exit 2 ;;
esac
