#!/usr/bin/env bash
# The one device call of issue 22 (docs/performance.md, "The recut"): before/after whole-model bench,
# alternated, plus the GPU tests. Prepare here: git archive b2f8fbb moe_hpc inputs | tar -x -C .before;
# the cuDNN frontend wheel in .whl/ (device README); run with carry [".whl", ".before"].
export NCCL_NVLS_ENABLE=0 OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1 PYTHONUNBUFFERED=1
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site || exit 1
L=$OUT/all.log
{ cat .before/COMMITS; date -u; nvidia-smi -L; python3 -c "import cupy, cudnn; print('cupy', cupy.__version__, 'cudnn-frontend', cudnn.__version__)"; } > $L 2>&1
B="bench --transport nccl --micro-batches 1 --model-layers 8 --sequences 16 --seq-len 1024 --iters 5 --warmup 2"
step() { echo "===== $1 $(date -u +%T)" >> $L; }
bench_pair() { i=$1
  step "before $i"; (cd .before && CUDA_VISIBLE_DEVICES=0 timeout 80 python3 -m moe_hpc $B --json $OUT/before_$i.json) >> $L 2>&1; echo "rc=$?" >> $L
  step "after $i"; CUDA_VISIBLE_DEVICES=0 timeout 80 python3 -m moe_hpc $B --json $OUT/after_$i.json >> $L 2>&1; echo "rc=$?" >> $L
}
bench_pair 1
step pytest; timeout 180 python3 -m pytest -q -rs -p no:cacheprovider tests/test_gpu.py -k "not ipc" >> $L 2>&1; echo "pytest rc=$?" >> $L
bench_pair 2
step ipc-tests; (unset CUDA_VISIBLE_DEVICES; timeout 120 python3 -m pytest -q -rs -p no:cacheprovider tests/test_ipc.py tests/test_gpu.py -k ipc >> $L 2>&1; echo "pytest ipc rc=$?" >> $L)
step ipc-bench; (unset CUDA_VISIBLE_DEVICES; timeout 60 mpiexec -n 2 --bind-to none python3 -m moe_hpc bench --transport ipc --tokens 4096 --micro-batches 2 --iters 5 --warmup 2 --timeline --json $OUT/bench_ipc_2r1g.json >> $L 2>&1; echo "rc=$?" >> $L)
step end
grep -v "^\s*$" $L | tail -n 80
