#!/usr/bin/env bash
# The MoE-layer runs behind docs/performance.md's expert-parallel table, one machine, one go.
# Usage (a host with 4 GPUs, NCCL, Open MPI or MPICH):  bash benchmarks/ep_layer_runs.sh OUTDIR
# Each run writes OUTDIR/<name>.json (moe-hpc bench --json); the 61-layer model's layer shapes
# (H 7168, F 2048, E 64, top-2) at 16,384 tokens per GPU unless the name says seed16.
set -u
out=${1:?usage: ep_layer_runs.sh OUTDIR}
mkdir -p "$out"
export NCCL_NVLS_ENABLE=0 PYTHONUNBUFFERED=1
M="mpiexec --bind-to none"
B="python3 -m moe_hpc bench --transport nccl --iters ${ITERS:-10} --warmup 3"
run() { local name=$1; shift; echo "== $name"; timeout 150 "$@" --json "$out/$name.json" 2>&1 | grep -v "^\["; }
run ep_1gpu_mb1 $M -n 1 $B --micro-batches 1                 # the planner's calibration input
run ep_4gpu_mb2 $M -n 4 $B --micro-batches 2 --timeline
run ep_4gpu_mb4 $M -n 4 $B --micro-batches 4
run ep_4gpu_mb2_carve24 $M -n 4 $B --micro-batches 2 --set run.expert_gemm_carveout=24
CUDA_VISIBLE_DEVICES=0,1 run ep_2gpu_mb2 $M -n 2 $B --micro-batches 2
CUDA_VISIBLE_DEVICES=0,1 run ep_2gpu_mb4 $M -n 2 $B --micro-batches 4
run ep_4gpu_dp2_mb2 $M -n 4 $B --micro-batches 2 --dp 2
run ep_4gpu_seed16_tp1 $M -n 4 $B --config inputs/seed16.toml
run ep_4gpu_seed16_tp2 $M -n 4 $B --config inputs/seed16.toml --expert-tp 2
