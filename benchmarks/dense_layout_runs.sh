#!/usr/bin/env bash
# Dense-side parallelism on 4 GPUs (issue "dense TP and block stages"): the 16-layer model's block
# shapes (H 4096, 32 heads x 128, 16 experts of hidden 16384), LAYERS (default 2) of its 16 blocks
# so that the synthetic checkpoint (4.3 GiB a block) and the float64 reference fit a short run,
# in two layouts:
#   tp1      dense_tp 1, 4 co-located ranks (each a dense rank of its own)
#   tp2st2   dense_tp 2 x dense_stages 2 on the same 4 ranks (one dense group), 2 waves
# Each layout runs twice: a small ragged batch checked against the float64 reference, and a
# 192 x 1,024-token batch timed (the summary's steady_tokens_per_s: after the first chunk, whose
# one-off costs -- kernel compiles, cuDNN graphs, NCCL set-up -- would swamp a short run).
# Usage (a host with 4 GPUs):  bash benchmarks/dense_layout_runs.sh OUTDIR
set -u
out=${1:?usage: dense_layout_runs.sh OUTDIR}
work=${WORK:-/tmp/dense_layout}
mkdir -p "$out" "$work"
export NCCL_NVLS_ENABLE=0 PYTHONUNBUFFERED=1
C="inputs/seed16.toml --set model.num_layers=${LAYERS:-2}"
G="--set run.device=gpu --set run.transport=nccl"
M="mpiexec --bind-to none -n 4"
[ -f "$work/w.h5" ] || python3 -m moe_hpc init-weights $C --seed 1 -o "$work/w.h5"
[ -f "$work/small.h5" ] || python3 -m moe_hpc make-inputs $C --sequences 4 --seq-len 96 --ragged --seed 2 -o "$work/small.h5"
[ -f "$work/big.h5" ] || python3 -m moe_hpc make-inputs $C --sequences 192 --seq-len 1024 --seed 3 -o "$work/big.h5"
declare -A LAYOUT=([tp1]="" [tp2st2]="--set parallel.dense_tp=2 --set parallel.dense_stages=2 --set run.pipeline_waves=2")
for name in tp1 tp2st2; do
  echo "== $name"
  rm -f "$work/small_$name.h5" "$work/big_$name.h5"
  timeout 200 $M python3 -m moe_hpc run $C $G ${LAYOUT[$name]} --weights "$work/w.h5" --input "$work/small.h5" \
    --output "$work/small_$name.h5" --progress off 2>&1 | tail -n 3
  timeout 200 $M python3 -m moe_hpc run $C $G ${LAYOUT[$name]} --weights "$work/w.h5" --input "$work/big.h5" \
    --output "$work/big_$name.h5" --progress off --summary "$out/dense_$name.json" 2>&1 | tail -n 3
done
python3 - "$work" <<'PY'
import sys, h5py
from moe_hpc.model.reference import compare, read_output_hidden, reference_forward
work = sys.argv[1]
ref = reference_forward(f"{work}/w.h5", f"{work}/small.h5")
with h5py.File(f"{work}/small.h5") as f:
    lengths = f["lengths"][()]
for name in ("tp1", "tp2st2"):
    a = compare(read_output_hidden(f"{work}/small_{name}.h5"), ref, lengths)
    print(f"{name}: vs float64 reference: {a} -> {'OK' if a.ok() else 'MISMATCH'}")
PY
python3 - "$out" <<'PY'
import json, sys
for name in ("tp1", "tp2st2"):
    s = json.load(open(f"{sys.argv[1]}/dense_{name}.json"))["summary"]
    print(f"{name}: {s['chunks']} chunks, tokens/s {s['tokens_per_s']:.0f} (whole loop), "
          f"{s['steady_tokens_per_s']} (after the first chunk)")
PY
