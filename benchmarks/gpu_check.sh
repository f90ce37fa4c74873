#!/usr/bin/env bash
# The GPU check, one command on a GPU host without network (finishes in < 8 minutes):
#   bash benchmarks/gpu_check.sh
# Run from the repository root with .whl/ present (carry it):
#   bash ../shared/tools/device-wheels.sh tqdm   # + tqdm (progress bars), in case the image lacks it
# zarr must stay 3.1.x for a Python without msgspec (zarr 3.4 needs it): replace a newer zarr
# wheel in .whl/ by `pip download --no-deps zarr==3.1.6 -d .whl`.
# The host needs python3 with torch (CUDA), numpy, scipy, pyarrow, pytest; GalSim is not needed.
# Steps, each under `timeout` and within an overall deadline: install the wheels into /tmp/site,
# `nvidia-smi -L`, the GPU-marked tests, then benchmarks/throughput.py: the GPU path
# (engine.run(gpu=True) on a Dask-CUDA cluster, or on a LocalCluster whose workers declare
# GPU=1 when dask-cuda does not import) and the CPU path on the same synthetic mosaic.
# Logs, JSON and a summary go to $OUT (default gpu_out/).
# Environment: OUT, SIZE (mosaic side, default 8192), REPEAT (runs per path, best kept; 2),
#              TILE (default: the engine's), DEADLINE (seconds for the whole script; 450).
set -uo pipefail
export PYTHONUNBUFFERED=1
OUT=${OUT:-gpu_out}
SIZE=${SIZE:-8192}
REPEAT=${REPEAT:-2}
TILE=${TILE:-}
DEADLINE=${DEADLINE:-450}
mkdir -p "$OUT"
T0=$(date +%s)
: > "$OUT/summary.txt"

# step NAME LIMIT CMD...: run CMD under timeout (LIMIT, cut to the time left), log to $OUT/NAME.log
step() {
  local name=$1 limit=$2 left rc t
  shift 2
  left=$((DEADLINE - ($(date +%s) - T0)))
  if ((left < 15)); then
    echo "$name: skipped (deadline reached)" | tee -a "$OUT/summary.txt"
    return 124
  fi
  ((limit > left)) && limit=$left
  echo "== $name (limit ${limit} s)"
  t=$(date +%s)
  timeout -k 10 "$limit" "$@" > "$OUT/$name.log" 2>&1
  rc=$?
  tail -n 60 "$OUT/$name.log"
  echo "$name: rc=$rc in $(($(date +%s) - t)) s" | tee -a "$OUT/summary.txt"
  return $rc
}

nvidia-smi -L 2>&1 | tee "$OUT/device.txt"
step install 120 python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir \
  --upgrade --target /tmp/site .whl/*.whl || exit 1
export PYTHONPATH=/tmp/site:$PWD
step imports 60 python3 -c "
import sys, torch, survey_engine, survey_engine.bench
print('survey_engine', survey_engine.__version__, '| torch', torch.__version__,
      '| cuda', torch.cuda.is_available(), torch.cuda.get_device_name(0) if torch.cuda.is_available() else '')
try:
    import dask_cuda
    print('dask-cuda', dask_cuda.__version__)
except Exception as err:
    print('dask-cuda unavailable (GPU path falls back to a LocalCluster with GPU=1):', repr(err))
print('galsim imported:', 'galsim' in sys.modules)
"
# GPU-marked tests (GalSim-free files only: the ones holding a gpu marker).
step pytest_gpu 150 python3 -m pytest -q -p no:cacheprovider -m gpu -rs \
  $(grep -l "pytest.mark.gpu" tests/test_*.py)
step throughput 300 python3 benchmarks/throughput.py --size "$SIZE" --gpu --repeat "$REPEAT" \
  ${TILE:+--tile "$TILE"} --workdir /tmp/se_gpu_bench --json "$OUT/throughput.json"
echo "total $(($(date +%s) - T0)) s" | tee -a "$OUT/summary.txt"
cat "$OUT/summary.txt"
