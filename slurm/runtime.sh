#!/bin/bash
# The container runtimes of the sbatch scripts. Sourced: `osc_step [SRUN_ARGS...] -- COMMAND [ARGS...]`
# runs one job step whose tasks run COMMAND inside the runtime named by $RUNTIME. Executed (by srun,
# once per task, so each task's own SLURM_NODEID/SLURM_PROCID go in): `runtime.sh COMMAND [ARGS...]`.
# No launcher logic here: world size, ranks and the rendezvous address are derived by
# `openseek-cpt launch` from the Slurm environment it finds.
#
#   RUNTIME=none       COMMAND from PATH (a venv on a shared filesystem)
#   RUNTIME=apptainer  apptainer exec [--nv] $SIF COMMAND  (SIF from `make sif`, on a shared filesystem)
#   RUNTIME=pyxis      srun --container-image=$IMAGE        (enroot + pyxis; IMAGE = .sqsh file or registry ref)
#   RUNTIME=podman     podman run --network host $IMAGE     (IMAGE loaded on every node)
#   RUNTIME=docker     docker run --network host $IMAGE
# Every runtime gets: the submit directory at the same path (recipe paths are relative to it), HF_HOME
# if set, the extra MOUNTS (comma-separated SRC[:DST]), and these variables of the task:
OSC_ENV_NAMES='^(HF_.*|HUGGING_FACE_.*|NCCL_.*|TORCH_.*|GLOO_.*|SLURM_.*|SLURMD_NODENAME|CUDA_VISIBLE_DEVICES|OMP_NUM_THREADS|TOKENIZERS_PARALLELISM|PYTHONUNBUFFERED|OPENSEEK_.*|ACCELERATE_.*)$'
OSC_RUNTIME_SH=$(readlink -f "${BASH_SOURCE[0]}")

osc_env_names() { compgen -e | grep -E "$OSC_ENV_NAMES"; }

osc_mounts() {  # SRC:DST per line: the working directory, HF_HOME, MOUNTS
    echo "$PWD:$PWD"
    if [ -n "${HF_HOME:-}" ]; then mkdir -p "$HF_HOME" && echo "$HF_HOME:$HF_HOME"; fi
    local m
    for m in ${MOUNTS//,/ }; do
        case "$m" in *:*) echo "$m" ;; *) echo "$m:$m" ;; esac
    done
}

osc_step() {
    local srun_args=()
    while [ $# -gt 0 ] && [ "$1" != "--" ]; do srun_args+=("$1"); shift; done
    shift
    case "${RUNTIME:-none}" in
        none) ;;
        pyxis)
            srun_args+=("--container-image=${IMAGE:?RUNTIME=pyxis needs IMAGE}"
                        "--container-mounts=$(osc_mounts | paste -sd, -)" "--container-workdir=$PWD"
                        "--container-env=$(osc_env_names | paste -sd, -)") ;;
        apptainer|singularity|podman|docker) set -- bash "$OSC_RUNTIME_SH" "$@" ;;
        *) echo "RUNTIME=$RUNTIME: expected apptainer, pyxis, podman, docker or none" >&2; return 2 ;;
    esac
    echo "[$(date -u +%FT%TZ)] RUNTIME=${RUNTIME:-none}: srun ${srun_args[*]} $*" >&2
    srun "${srun_args[@]}" "$@"
}

osc_exec() {  # in one task: exec COMMAND inside $RUNTIME with this task's environment
    local cmd=() m name
    case "${RUNTIME:-none}" in
        none) exec "$@" ;;
        apptainer|singularity)
            cmd=("$RUNTIME" exec --pwd "$PWD")
            command -v nvidia-smi >/dev/null 2>&1 && cmd+=(--nv)
            while read -r m; do cmd+=(--bind "$m"); done < <(osc_mounts)
            # APPTAINERENV_X beats the image's ENV X (HF_HOME etc. are set in the image).
            for name in $(osc_env_names); do export "APPTAINERENV_$name=${!name}" "SINGULARITYENV_$name=${!name}"; done
            cmd+=("${SIF:?RUNTIME=apptainer needs SIF=path/to/openseek-cpt.sif}") ;;
        podman|docker)
            # --network host: rendezvous and NCCL/gloo use the node's address; --ipc host: NCCL's shared memory.
            cmd=("$RUNTIME" run --rm --network host --ipc host -w "$PWD")
            [ "$RUNTIME" = docker ] && cmd+=(--user "$(id -u):$(id -g)")
            if command -v nvidia-smi >/dev/null 2>&1; then
                if [ "$RUNTIME" = docker ]; then cmd+=(--gpus all); else cmd+=(--device nvidia.com/gpu=all); fi
            fi
            while read -r m; do cmd+=(-v "$m"); done < <(osc_mounts)
            for name in $(osc_env_names); do cmd+=(-e "$name"); done  # name only: value from this task
            cmd+=("${IMAGE:?RUNTIME=$RUNTIME needs IMAGE}") ;;
        *) echo "RUNTIME=$RUNTIME: expected apptainer, pyxis, podman, docker or none" >&2; exit 2 ;;
    esac
    exec "${cmd[@]}" "$@"
}

if [ "${BASH_SOURCE[0]}" = "$0" ]; then
    set -euo pipefail
    osc_exec "$@"
fi
