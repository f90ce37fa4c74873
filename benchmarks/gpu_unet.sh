#!/usr/bin/env bash
# One GPU session: train the shipped U-Net on CUDA, measure its GPU inference speed, run the GPU test.
# Needs, in the repository root: .whl/ (../shared/tools/device-wheels.sh) and .unet_data/train.npz:
#   python -c "from survey_engine.unet.data import generate_training_set as g; \
#              g('.unet_data/train.npz', samples=40000, seed=0, overwrite=True)"
# The host needs torch, numpy, scipy, pyarrow (not GalSim). Results go to $OUT (default gpu_out/).
set -uo pipefail
export PYTHONUNBUFFERED=1
OUT=${OUT:-gpu_out}
mkdir -p "$OUT"
nvidia-smi -L | tee "$OUT/device.txt"
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
  --target /tmp/site .whl/*.whl || exit 1
export PYTHONPATH=/tmp/site:$PWD
python3 -c "import survey_engine, torch; print('survey_engine imports; torch', torch.__version__)" 2>&1 | tail -2
python3 -m survey_engine.unet.train .unet_data/train.npz "$OUT/default.pt" --samples 150000 \
  --epochs 60 --batch-size 512 --device cuda --max-minutes 4.5 --no-progress 2>&1 | tee "$OUT/train.log"
python3 benchmarks/unet_inference.py --device cuda --size 4096 --model "$OUT/default.pt" 2>&1 \
  | tee "$OUT/infer_cuda.log"
python3 benchmarks/unet_inference.py --device cpu --size 1024 --model "$OUT/default.pt" 2>&1 \
  | tee "$OUT/infer_cpu_host.log"
python3 -m pytest -q -p no:cacheprovider -p no:warnings -m gpu tests/test_unet.py 2>&1 | tail -5 \
  | tee "$OUT/pytest_gpu.log"
