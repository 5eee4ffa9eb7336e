# moe_job_lib.sh: what the job scripts share; sourced, never run. Needs VENV and LAUNCHER.
#
# run_ranks CMD...   run CMD as every rank of the allocation, through srun or mpiexec, in the
#                    background; pass SIGUSR1/SIGTERM on to the ranks; return CMD's status.
# requeue_if_stopped STATUS
#                    75 (stopped at a chunk boundary, progress recorded): requeue this job
#                    (scontrol requeue) so it resumes, unless REQUEUE=0 or not under Slurm.

run_ranks() {
    local launch
    case "$LAUNCHER" in
        # --mpi=pmi2: Slurm's PMI-2 is what MPICH (the [mpi] wheel too) speaks. Without a PMI
        # plugin srun starts N one-rank jobs, which moe-hpc refuses.
        # --kill-on-bad-exit=1: a rank that dies ends the whole step at once.
        srun) launch=(srun --mpi="${SRUN_MPI:-pmi2}" --kill-on-bad-exit=1 ${SRUN_ARGS:-}) ;;
        # hydra finds the allocation's nodes through Slurm's variables, and kills every rank
        # as soon as one dies.
        mpiexec) launch=("${MPIEXEC:-$VENV/bin/mpiexec}" -n "${SLURM_NTASKS:-${NTASKS:-1}}") ;;
        *) echo "error: LAUNCHER must be srun or mpiexec, got '$LAUNCHER'" >&2; return 2 ;;
    esac
    echo "$(date +%FT%T) launch: ${launch[*]} $*"
    "${launch[@]}" "$@" &
    local pid=$! status
    # Both launchers forward SIGUSR1 to every rank; the ranks stop after their current chunk.
    trap "echo \"\$(date +%FT%T) stop signal: ranks finish the current chunk, record progress, exit 75\"; kill -USR1 $pid 2>/dev/null" USR1 TERM
    while :; do
        wait "$pid"; status=$?          # a trapped signal ends wait early: wait again
        kill -0 "$pid" 2>/dev/null || break
    done
    trap - USR1 TERM
    return "$status"
}

requeue_if_stopped() {
    local status=$1
    if [ "$status" = 75 ] && [ -n "${SLURM_JOB_ID:-}" ] && [ "${REQUEUE:-1}" = 1 ]; then
        echo "$(date +%FT%T) progress recorded; requeueing job $SLURM_JOB_ID to resume"
        scontrol requeue "$SLURM_JOB_ID"
    fi
    return "$status"
}
