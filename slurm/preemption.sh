# -- preemption (slurm/preemption.sh; the rank side: sparse_pretrain/runtime/preemption.py): USR1 -> stop file -> exit 75 -> requeue
# needs: #SBATCH --requeue  #SBATCH --signal=B:USR1@<seconds>  (and --open-mode=append to keep the log)
prune_ofa_preemptible() {   # usage: prune_ofa_preemptible OUTPUT_DIR COMMAND [ARG...]
    local output_dir=$1 pid rc
    shift
    export PRUNE_OFA_STOP_FILE=${PRUNE_OFA_STOP_FILE:-$output_dir/STOP}
    mkdir -p "$output_dir" "$(dirname "$PRUNE_OFA_STOP_FILE")"
    rm -f "$PRUNE_OFA_STOP_FILE" "$output_dir/PREEMPTED"
    trap 'echo "preemption: USR1 received at $(date +%s.%N), asking the ranks to checkpoint and stop"
          touch "$PRUNE_OFA_STOP_FILE"' USR1
    if [ -n "${prune_ofa_early_usr1:-}" ]; then   # the warning came during the setup lines: stop at once
        touch "$PRUNE_OFA_STOP_FILE"
    fi
    echo "preemption: job ${SLURM_JOB_ID:-?} start ${SLURM_RESTART_COUNT:-0}, trap installed"
    "$@" &
    pid=$!
    while :; do
        wait "$pid" && rc=0 || rc=$?             # (so that `set -e` does not end the script here)
        kill -0 "$pid" 2>/dev/null || break     # wait was interrupted by the trap: COMMAND still runs
    done
    trap - USR1
    if [ "$rc" -eq 75 ] || [ -f "$output_dir/PREEMPTED" ]; then
        echo "preemption: checkpoint saved, requeueing job $SLURM_JOB_ID"
        echo "preemption: the ranks stopped to be requeued (exit 75 after a checkpoint); a launcher's failure" \
             "report above is that stop, not an error" >&2
        scontrol requeue "$SLURM_JOB_ID"
        exit 0
    fi
    return "$rc"
}
# A warning before the run starts (slow setup lines, a preemption at start-up) would end the batch shell
# (USR1's default action): keep it instead, and the ranks stop at their first step.
prune_ofa_early_usr1=
trap 'echo "preemption: USR1 received at $(date +%s.%N), before the run started"; prune_ofa_early_usr1=1' USR1
