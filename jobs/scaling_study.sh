#!/bin/bash
# scaling_study.sh: strong and weak scaling of moe-hpc run over node counts, then a table and a
# plot (moe-hpc scaling-report). Run it from the repository root on a login node (it submits
# one moe_infer.sbatch job per point, and a report job after them), or with SUBMIT=local on one
# machine (it runs the points here with mpiexec, one after another).
#
# Knobs (environment variables):
#   NODES            node counts to measure            (default "1 2 4 8")
#   RANKS_PER_NODE   ranks (GPUs) per node, or a list  (default 8; on one machine e.g. "1 2 4")
#   MODES            "strong weak" (default), or one of them
#   SEQUENCES        strong scaling: sequences in the one shared input   (default 1024)
#   SEQS_PER_RANK    weak scaling: sequences per rank, input grows with the ranks (default 64)
#   SEQ_LEN          positions per sequence            (default 512)
#   REPEATS          runs of each point; the report keeps the best (default 1)
#   CONFIG           run config                        (default inputs/tiny.toml)
#   WEIGHTS          checkpoint (default: RESULTS/weights.h5, made from CONFIG with seed 0)
#   SETS             config overrides for every point, e.g. "--set run.chunk_sequences=16"
#   DEVICE           gpu (default) or cpu (points then use moe_infer_cpu.sbatch)
#   RESULTS          folder for inputs, outputs, summaries, table and plot (default scaling-results)
#   TITLE            the plot's title (default "moe_hpc scaling (CONFIG, DEVICE)")
#   SUBMIT           sbatch (default: a job per point) or local (run here with mpiexec, one
#                    point after another, ranks = nodes x ranks per node)
#   LAUNCHER         how the point jobs start their ranks: srun (default) or mpiexec
#   SBATCH_ARGS      more sbatch options for every job, e.g. "--partition=gpu --time=00:30:00"
#   EXCLUSIVE        1 (default): each point gets whole nodes (--exclusive), so points never
#                    share a node and disturb each other's timing; 0: leave it to the scheduler
#   VENV             the virtualenv with moe_hpc       (default ./.venv)
#
# Each run writes RESULTS/<mode>-n<ranks>-r<repeat>.json (the run's JSON summary); the report is
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
TITLE=${TITLE:-"moe_hpc scaling ($CONFIG, $DEVICE)"}
SUBMIT=${SUBMIT:-sbatch}
SBATCH_ARGS=${SBATCH_ARGS:-}
REPEATS=${REPEATS:-1}
EXCLUSIVE=${EXCLUSIVE:-1}
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

SCRIPT=jobs/moe_infer$([ "$DEVICE" = cpu ] && echo _cpu).sbatch
jobs=()

run_point() {   # mode nodes ranks_per_node repeat: submit (sbatch) or run (mpiexec) one run
    local mode=$1 nodes=$2 per_node=$3 rep=$4
    local ranks=$((nodes * per_node))
    local seqs=$([ "$mode" = weak ] && echo $((SEQS_PER_RANK * ranks)) || echo "$SEQUENCES")
    local input point=$RESULTS/$mode-n$ranks-r$rep
    input=$(input_for "$seqs")
    local run_args=(--overwrite --restart --progress off --summary "$point.json")
    echo "== $mode scaling: $nodes node(s), $ranks rank(s), $seqs sequences, run $rep"
    if [ "$SUBMIT" = sbatch ]; then
        jobs+=("$(WEIGHTS=$WEIGHTS INPUT=$input OUTPUT=$point.h5 CONFIG=$CONFIG DEVICE=$DEVICE \
                  SETS="$SETS" RUN_ARGS="${run_args[*]}" REQUEUE=0 \
                  sbatch --parsable --nodes="$nodes" --ntasks="$ranks" --ntasks-per-node="$per_node" \
                         --job-name="scale-$mode-$ranks" --output="$point.log" \
                         $([ "$EXCLUSIVE" = 1 ] && echo --exclusive) $SBATCH_ARGS "$SCRIPT")")
    else
        OMP_NUM_THREADS=${OMP_NUM_THREADS:-1} "$VENV/bin/mpiexec" -n "$ranks" "$MOE" run "$CONFIG" \
            --weights "$WEIGHTS" --input "$input" --output "$point.h5" --set "run.device=$DEVICE" $SETS \
            "${run_args[@]}" > "$point.log" 2>&1 || { echo "point failed, see $point.log" >&2; exit 1; }
    fi
}

for mode in $MODES; do
    for nodes in $NODES; do
        for per_node in $RANKS_PER_NODE; do
            for rep in $(seq 1 "$REPEATS"); do
                run_point "$mode" "$nodes" "$per_node" "$rep"
            done
        done
    done
done

REPORT=("$MOE" scaling-report "$RESULTS" --table "$RESULTS/scaling.md" --plot "$RESULTS/scaling.png"
        --title "$TITLE")
if [ "$SUBMIT" = sbatch ]; then
    dep=$(IFS=:; echo "${jobs[*]}")
    sbatch --dependency="afterany:$dep" --job-name=scale-report --output="$RESULTS/report.log" \
           --ntasks=1 $SBATCH_ARGS --wrap "$(printf '%q ' "${REPORT[@]}")"
    echo "submitted ${#jobs[@]} point(s) and a report job: see $RESULTS/scaling.md and scaling.png"
else
    "${REPORT[@]}"
fi
