#!/usr/bin/env bash
# On the GPU machine, after scripts/gpu_setup.sh put SGLang 0.5.17 and our package into
# /tmp/site (same warm machine): run bench/serving_gpu.py with the right environment.
#
#   bash scripts/gpu_serving.sh --phases correct,speed,report --deadline-s $((550-SECONDS))
#   bash scripts/gpu_serving.sh --dry-run          # the plan and its time estimates
#
# Arguments go to bench/serving_gpu.py (see its --help). Results: $OUT/serving_gpu.json,
# serving_gpu.md, serving_gpu.png, serving_gpu_correct.json, serving_gpu_logs.tgz;
# state in /tmp/serving_gpu survives between calls while the machine stays warm.
# The Mooncake link (MC_FORCE_TCP, MC_INTRANODE_NVLINK, ...) is set per backend config
# by bench/serving_gpu.py (the @LINK of --configs), not here.
set -uo pipefail
cd "$(dirname "$0")/.."
SITE=${GPU_SITE:-/tmp/site}
PY=${GPU_PY:-/opt/torch/.venv/bin/python3}
[[ -x $PY ]] || PY=$(command -v python3)
export PATH=$(dirname "$PY"):$PATH PYTHONPATH=$SITE PYTHONUNBUFFERED=1 PYTHONSAFEPATH=1
[[ -d /usr/local/cuda ]] && export CUDA_HOME=${CUDA_HOME:-/usr/local/cuda}
export SPECTRUM_CACHE_DIR=${SPECTRUM_CACHE_DIR:-/tmp/spc}
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
export OUT=${OUT:-/tmp/serving_gpu/out}
mkdir -p "$OUT"
if [[ ! -d $SITE/sglang || ! -d $SITE/mooncake ]]; then
  echo "gpu_serving: $SITE lacks sglang or mooncake: run scripts/gpu_setup.sh with the parcels" \
    "first (the machine went cold if they were installed before)"
  exit 3
fi
# The dummy model folder is cheap: write it if a fresh machine lacks it.
[[ -f /tmp/model8b/config.json ]] || "$PY" bench/gpu_model.py /tmp/model8b
nvidia-smi --query-gpu=index,name,memory.used,memory.total --format=csv,noheader 2>/dev/null
exec "$PY" bench/serving_gpu.py "$@"
