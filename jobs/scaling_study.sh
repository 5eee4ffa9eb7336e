#!/bin/bash
# scaling_study.sh: strong and weak scaling of moe-hpc run over node counts, then a table and a
# plot (moe-hpc scaling-report). Run it from the repository root on a login node (it submits
# one moe_infer.sbatch job per point, and a report job after them), or with LAUNCHER=mpiexec on
# one machine (it runs the points here, one after another).
#
# Knobs (environment variables):
#   NODES            node counts to measure            (default "1 2 4 8")
#   RANKS_PER_NODE   ranks (GPUs) per node             (default 8)
#   MODES            "strong weak" (default), or one of them
#   SEQUENCES        strong scaling: sequences in the one shared input   (default 1024)
#   SEQS_PER_RANK    weak scaling: sequences per rank, input grows with the ranks (default 64)
#   SEQ_LEN          positions per sequence            (default 512)
#   CONFIG           run config                        (default inputs/tiny.toml)
#   WEIGHTS          checkpoint (default: RESULTS/weights.h5, made from CONFIG with seed 0)
#   SETS             config overrides for every point, e.g. "--set run.chunk_sequences=16"
#   DEVICE           gpu (default) or cpu
#   RESULTS          folder for inputs, outputs, summaries, table and plot (default scaling-results)
#   LAUNCHER         sbatch (default: a job per point) or mpiexec (run here, ranks = nodes x
#                    RANKS_PER_NODE, so on one machine NODES="1 2 4" RANKS_PER_NODE=1 means 1, 2, 4 ranks)
#   SBATCH_ARGS      more sbatch options for every point, e.g. "--partition=gpu --time=00:30:00"
#   VENV             the virtualenv with moe_hpc       (default ./.venv)
#
# Each point writes RESULTS/<mode>-n<ranks>.json (the run's JSON summary); the report is
#   moe-hpc scaling-report RESULTS --table RESULTS/scaling.md --plot RESULTS/scaling.png
set -euo pipefail

NODES=${NODES:-"1 2 4 8"}
RANKS_PER_NODE=${RANKS_PER_NODE:-8}
MODES=${MODES:-"strong weak"}
SEQUENCES=${SEQUENCES:-1024}
SEQS_PER_RANK=${SEQS_PER_RANK:-64}
SEQ_LEN=${SEQ_LEN:-512}
CONFIG=${CONFIG:-inputs/tiny.toml}
SETS=${SETS:-}
DEVICE=${DEVICE:-gpu}
RESULTS=${RESULTS:-scaling-results}
LAUNCHER=${LAUNCHER:-sbatch}
SBATCH_ARGS=${SBATCH_ARGS:-}
VENV=${VENV:-./.venv}
MOE=$VENV/bin/moe-hpc

mkdir -p "$RESULTS"
WEIGHTS=${WEIGHTS:-$RESULTS/weights.h5}
[ -e "$WEIGHTS" ] || "$MOE" init-weights "$CONFIG" -o "$WEIGHTS" --seed 0 $SETS

input_for() {   # sequences -> path of an input with that many sequences (made once)
    local path="$RESULTS/inputs-$1x$SEQ_LEN.h5"
    [ -e "$path" ] || "$MOE" make-inputs "$CONFIG" -o "$path" --sequences "$1" --seq-len "$SEQ_LEN" --seed 1 $SETS >&2
    echo "$path"
}

jobs=()
for mode in $MODES; do
    for nodes in $NODES; do
        ranks=$((nodes * RANKS_PER_NODE))
        seqs=$([ "$mode" = weak ] && echo $((SEQS_PER_RANK * ranks)) || echo "$SEQUENCES")
        input=$(input_for "$seqs")
        point="$RESULTS/$mode-n$ranks"
        run_args=(--overwrite --restart --progress off --summary "$point.json")
        echo "== $mode scaling: $nodes node(s), $ranks rank(s), $seqs sequences"
        if [ "$LAUNCHER" = sbatch ]; then
            id=$(WEIGHTS=$WEIGHTS INPUT=$input OUTPUT=$point.h5 CONFIG=$CONFIG DEVICE=$DEVICE \
                 SETS="$SETS" RUN_ARGS="${run_args[*]}" REQUEUE=0 \
                 sbatch --parsable --nodes="$nodes" --ntasks-per-node="$RANKS_PER_NODE" \
                        --job-name="scale-$mode-$ranks" --output="$point.log" $SBATCH_ARGS jobs/moe_infer.sbatch)
            jobs+=("$id")
        else
            OMP_NUM_THREADS=${OMP_NUM_THREADS:-1} "$VENV/bin/mpiexec" -n "$ranks" "$MOE" run "$CONFIG" \
                --weights "$WEIGHTS" --input "$input" --output "$point.h5" --set "run.device=$DEVICE" $SETS \
                "${run_args[@]}" > "$point.log" 2>&1 \
                || { echo "point failed, see $point.log" >&2; exit 1; }
        fi
    done
done

REPORT=("$MOE" scaling-report "$RESULTS" --table "$RESULTS/scaling.md" --plot "$RESULTS/scaling.png"
        --title "moe_hpc scaling ($CONFIG, $DEVICE)")
if [ "$LAUNCHER" = sbatch ]; then
    dep=$(IFS=:; echo "${jobs[*]}")
    sbatch --dependency="afterany:$dep" --job-name=scale-report --output="$RESULTS/report.log" \
           --ntasks=1 --gpus-per-node=0 --wrap "${REPORT[*]}"
    echo "submitted ${#jobs[@]} point(s) and a report job: see $RESULTS/scaling.md and scaling.png"
else
    "${REPORT[@]}"
fi
