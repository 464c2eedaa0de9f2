#!/usr/bin/env bash
# SFTKey on 2 nodes x 8 GPUs with DeepSpeed ZeRO-3 (full fine-tuning of a 7B model; any recipe works the same way).
# Submit from the repository root:   sbatch scripts/slurm_multinode.sh [extra recipe flags, e.g. --learning_rate 1e-5]
# Override without editing:          RECIPE=recipes/<...>.yaml CONFIG_FILE=accelerate_configs/fsdp.yaml sbatch ...
# One `accelerate launch` runs per node (ntasks-per-node=1) and starts that node's 8 GPU processes; the config's
# `deepspeed_multinode_launcher: standard` makes DeepSpeed use this torchrun-style launch instead of pdsh/ssh.
# Every node must see the same repository, environment and output folder (shared filesystem).
#SBATCH --job-name=sftkey
#SBATCH --nodes=2
#SBATCH --ntasks-per-node=1
#SBATCH --gres=gpu:8
#SBATCH --cpus-per-task=64
#SBATCH --exclusive
#SBATCH --time=24:00:00
#SBATCH --output=logs/%x-%j.out

set -euo pipefail

RECIPE=${RECIPE:-recipes/qwen2.5-7b/gsm8k/sftkey_full_8gpu.yaml}
CONFIG_FILE=${CONFIG_FILE:-accelerate_configs/deepspeed_zero3.yaml}
GPUS_PER_NODE=${GPUS_PER_NODE:-8}
NUM_MACHINES=${SLURM_NNODES:-2}
NUM_PROCESSES=$((NUM_MACHINES * GPUS_PER_NODE)) # accelerate wants the total; each node runs NUM_PROCESSES / NUM_MACHINES
MAIN_PROCESS_IP=$(scontrol show hostnames "${SLURM_JOB_NODELIST}" | head -n 1)
MAIN_PROCESS_PORT=${MAIN_PROCESS_PORT:-29500}

export RECIPE CONFIG_FILE NUM_MACHINES NUM_PROCESSES MAIN_PROCESS_IP MAIN_PROCESS_PORT
export TOKENIZERS_PARALLELISM=false
# export NCCL_DEBUG=INFO            # uncomment to debug inter-node communication
# export NCCL_SOCKET_IFNAME=eth0    # the network interface the nodes reach each other on, if NCCL picks a wrong one

mkdir -p logs
echo "nodes: ${SLURM_JOB_NODELIST}  main: ${MAIN_PROCESS_IP}:${MAIN_PROCESS_PORT}  processes: ${NUM_PROCESSES}"

# SLURM_PROCID (0 or 1 here, one task per node) is the machine rank; it is read inside each task, hence the quotes.
srun --kill-on-bad-exit=1 bash -c '
accelerate launch \
    --config_file "${CONFIG_FILE}" \
    --num_machines "${NUM_MACHINES}" \
    --num_processes "${NUM_PROCESSES}" \
    --machine_rank "${SLURM_PROCID}" \
    --main_process_ip "${MAIN_PROCESS_IP}" \
    --main_process_port "${MAIN_PROCESS_PORT}" \
    recipes/run.py --config "${RECIPE}" "$@"
' bash "$@"
