#!/usr/bin/env bash
# SFTKey on several machines without Slurm: run this once on every machine, each with its own MACHINE_RANK.
#
#   machine 0:   MASTER_ADDR=10.0.0.1 MACHINE_RANK=0 bash scripts/multinode.sh [recipe flags]
#   machine 1:   MASTER_ADDR=10.0.0.1 MACHINE_RANK=1 bash scripts/multinode.sh [recipe flags]
#
# MASTER_ADDR     machine 0's address, reachable from every machine (required)
# MACHINE_RANK    this machine's rank, 0 .. NUM_MACHINES-1 (required)
# MASTER_PORT     a free TCP port on machine 0 (29500)
# NUM_MACHINES    machines in the job (2)
# PROCESSES_PER_MACHINE  processes each machine starts: its GPU count (default), 1 without GPUs
# CONFIG_FILE     the accelerate config (accelerate_configs/multi_gpu.yaml; deepspeed_zero3.yaml etc. work the same)
# RECIPE          the recipe (recipes/demo/sftkey_tiny.yaml: a 1-minute run that proves the machines reach each other)
# PYTHON          the Python of the environment (python3)
#
# Every machine needs the same repository, environment and output folder (a shared filesystem): the main process
# writes the outputs, and each stage reloads the saved previous stage. Machines without GPUs (gloo): add
# `--use_cpu true` to the recipe flags (with DeepSpeed `--ddp_backend gloo` instead, see docs/distributed.md); if
# gloo picks the wrong network interface, export GLOO_SOCKET_IFNAME (NCCL_SOCKET_IFNAME on GPUs).
# scripts/slurm_multinode.sh is the same launch under Slurm (it takes the address and the rank from Slurm).
# tests/train/test_multinode.py runs this script as two machines on one CPU machine (MASTER_ADDR=127.0.0.1).
set -euo pipefail
cd "$(dirname "$0")/.."

: "${MASTER_ADDR:?set MASTER_ADDR to machine 0's address}"
: "${MACHINE_RANK:?set MACHINE_RANK to this machine's rank (0 on the machine at MASTER_ADDR)}"
MASTER_PORT=${MASTER_PORT:-29500}
NUM_MACHINES=${NUM_MACHINES:-2}
PYTHON=${PYTHON:-python3}
CONFIG_FILE=${CONFIG_FILE:-accelerate_configs/multi_gpu.yaml}
RECIPE=${RECIPE:-recipes/demo/sftkey_tiny.yaml}
if [[ -z "${PROCESSES_PER_MACHINE:-}" ]]; then
  PROCESSES_PER_MACHINE=$("$PYTHON" -c 'import torch; print(max(torch.cuda.device_count(), 1))')
fi
NUM_PROCESSES=$((NUM_MACHINES * PROCESSES_PER_MACHINE)) # accelerate wants the total over all machines
export TOKENIZERS_PARALLELISM=false

echo "machine ${MACHINE_RANK}/${NUM_MACHINES}: main ${MASTER_ADDR}:${MASTER_PORT}, ${NUM_PROCESSES} processes in all"
exec "$PYTHON" -m accelerate.commands.launch \
    --config_file "${CONFIG_FILE}" \
    --num_machines "${NUM_MACHINES}" \
    --num_processes "${NUM_PROCESSES}" \
    --machine_rank "${MACHINE_RANK}" \
    --main_process_ip "${MASTER_ADDR}" \
    --main_process_port "${MASTER_PORT}" \
    recipes/run.py --config "${RECIPE}" "$@"
