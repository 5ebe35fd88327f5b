#!/usr/bin/env bash
# Segment a folder of slides on one multi-GPU machine with `histopan batch`.
#
#   bash local_multi_gpu.sh SLIDES OUTDIR [N_GPUS] [N_CPU_WORKERS]
#
# Starts a local Dask cluster: one single-threaded worker per GPU (resource GPU=1, CUDA_VISIBLE_DEVICES set to
# its own device) and N_CPU_WORKERS single-threaded CPU workers (resource CPU=1, no GPU visible) that read the
# slides and post-process the tiles. Rerun the same command after an interruption: finished slides are skipped,
# unfinished ones resume from their last recorded tiles.
set -euo pipefail

SLIDES=${1:?usage: local_multi_gpu.sh SLIDES OUTDIR [N_GPUS] [N_CPU_WORKERS]}
OUTDIR=${2:?usage: local_multi_gpu.sh SLIDES OUTDIR [N_GPUS] [N_CPU_WORKERS]}
N_GPUS=${3:-$(nvidia-smi --list-gpus | wc -l)}
N_CPU=${4:-$(( $(nproc) - N_GPUS ))}
MODEL=${HISTOPAN_MODEL:-default}

mkdir -p "$OUTDIR"
exec histopan batch "$SLIDES" -o "$OUTDIR" --gpus "$N_GPUS" --workers "$N_CPU" --model "$MODEL" \
    --batch-size "${BATCH_SIZE:-16}" --dashboard-address :8787
