# shellcheck shell=bash
# Shared body of jobs/cpu.sbatch and jobs/gpu.sbatch: sourced, not run.
#
# ptmpi_job [extra ptmpi flags...]
#   Runs `ptmpi reconstruct "$PTMPI_INPUT" -o "$PTMPI_OUTPUT" --checkpoint ... --resume`
#   with srun inside a SLURM allocation, or with `mpiexec -n $PTMPI_RANKS` outside one, and
#   handles exit status 75 (ptmpi stopped by SIGUSR1/SIGTERM after writing a checkpoint):
#   in a batch job it requeues the job (`scontrol requeue`) and exits 0; the requeued job
#   resumes from the checkpoint. Elsewhere it prints how to resume and exits 75.
#
# Environment (see the templates' headers): PTMPI_INPUT, PTMPI_OUTPUT, PTMPI_CHECKPOINT,
# PTMPI_CHECKPOINT_EVERY, PTMPI_ARGS, PTMPI_ACTIVATE, PTMPI_CMD, PTMPI_RANKS, PTMPI_MPIEXEC,
# PTMPI_SRUN_ARGS, PTMPI_MAX_REQUEUES.
#
# Under SLURM a TERM to the batch shell means cancel, time limit or requeue: the job then
# ends without being requeued (the ranks get their own TERM and may still checkpoint).

ptmpi_log() { echo "ptmpi-job: $*" >&2; }

ptmpi_die() { # status message
    ptmpi_log "error: $2"
    exit "$1"
}

# Run "$@" in the background and wait for it, forwarding SIGUSR1 and SIGTERM that reach
# this shell to it (mpiexec and srun pass them on to the ranks). Returns its exit status.
_ptmpi_child=
_ptmpi_trapped=0
_ptmpi_got_term=0
_ptmpi_forward() {
    _ptmpi_trapped=1
    [[ $1 == TERM ]] && _ptmpi_got_term=1
    if [[ -n $_ptmpi_child ]]; then
        # Inside SLURM, a TERM to the batch shell means cancel, time limit or requeue: the
        # steps' tasks get their own TERM from slurmstepd, so only USR1 is passed on.
        if [[ $1 == USR1 || -z ${SLURM_JOB_ID:-} ]]; then
            kill -s "$1" "$_ptmpi_child" 2>/dev/null || true
        fi
    fi
}
ptmpi_run_forwarding() {
    trap '_ptmpi_forward USR1' USR1
    trap '_ptmpi_forward TERM' TERM
    "$@" &
    _ptmpi_child=$!
    local rc
    while :; do
        _ptmpi_trapped=0
        rc=0
        wait "$_ptmpi_child" || rc=$?
        # A trapped signal cuts `wait` short with 128+signal: wait again for the real end.
        ((_ptmpi_trapped && rc > 128)) || break
    done
    _ptmpi_child=
    trap - USR1 TERM
    return "$rc"
}

ptmpi_job() {
    [[ -n ${PTMPI_INPUT:-} ]] || ptmpi_die 2 "set PTMPI_INPUT to the input HDF5 file"
    [[ -n ${PTMPI_OUTPUT:-} ]] || ptmpi_die 2 "set PTMPI_OUTPUT to the output HDF5 file"
    local ckpt=${PTMPI_CHECKPOINT:-${PTMPI_OUTPUT%.h5}-checkpoint.h5}
    local every=${PTMPI_CHECKPOINT_EVERY:-10}
    local -a extra cmd launcher
    read -r -a extra <<<"${PTMPI_ARGS:-}"
    extra+=("$@")

    if [[ -n ${PTMPI_ACTIVATE:-} ]]; then
        # shellcheck disable=SC1090 # a venv's bin/activate, or a file of `module load` lines
        set +u && source "$PTMPI_ACTIVATE" && set -u
    fi
    read -r -a cmd <<<"${PTMPI_CMD:-ptmpi}"
    command -v "${cmd[0]}" >/dev/null ||
        ptmpi_die 2 "${cmd[0]} not found: set PTMPI_CMD, or PTMPI_ACTIVATE to a venv's bin/activate"

    if [[ -n ${SLURM_JOB_ID:-} ]] && command -v srun >/dev/null; then
        # srun takes the task count and layout from the allocation. Slurm 22.05 no longer
        # passes the job's --cpus-per-task on to srun by itself.
        if [[ -n ${SLURM_CPUS_PER_TASK:-} ]]; then
            export SRUN_CPUS_PER_TASK=$SLURM_CPUS_PER_TASK
        fi
        local -a srun_args
        read -r -a srun_args <<<"${PTMPI_SRUN_ARGS:-}"
        launcher=(srun "${srun_args[@]}")
        ptmpi_log "job $SLURM_JOB_ID (restart ${SLURM_RESTART_COUNT:-0}):" \
            "${SLURM_NTASKS:-?} tasks on ${SLURM_JOB_NODELIST:-?}"
    else
        launcher=("${PTMPI_MPIEXEC:-mpiexec}" -n "${PTMPI_RANKS:-2}")
        ptmpi_log "no SLURM allocation: ${launcher[*]}"
    fi

    local -a argv=("${launcher[@]}" "${cmd[@]}" reconstruct "$PTMPI_INPUT" -o "$PTMPI_OUTPUT"
        --checkpoint "$ckpt" --checkpoint-every "$every" --resume "${extra[@]}")
    ptmpi_log "${argv[*]}"
    local rc=0
    ptmpi_run_forwarding "${argv[@]}" || rc=$?

    if ((rc == 0)); then
        ptmpi_log "done: $PTMPI_OUTPUT"
        return 0
    fi
    if ((rc != 75)); then
        ptmpi_log "ptmpi exited with status $rc"
        return "$rc"
    fi
    ptmpi_log "checkpointed in $ckpt"
    if [[ -n ${SLURM_JOB_ID:-} ]] && ((!_ptmpi_got_term)) &&
        ((${SLURM_RESTART_COUNT:-0} < ${PTMPI_MAX_REQUEUES:-20})); then
        # The requeue ends this run of the job with a TERM to this shell: finish first.
        trap '' TERM
        if scontrol requeue "$SLURM_JOB_ID"; then
            ptmpi_log "requeued job $SLURM_JOB_ID; it resumes from the checkpoint"
            return 0
        fi
        trap - TERM
        ptmpi_log "scontrol requeue $SLURM_JOB_ID failed (was the job submitted with --requeue?)"
    fi
    ptmpi_log "to continue, run the same job again (it passes --resume)"
    return 75
}
