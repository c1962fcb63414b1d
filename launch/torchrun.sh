#!/usr/bin/env bash
# One stage per process under torchrun: rank = stage, LOCAL_RANK picks the GPU.
#   one node:    launch/torchrun.sh 4 --model vgg8b --dataset cifar10 --device cuda --transport dist
#   two nodes:   NNODES=2 NODE_RANK=0 MASTER_ADDR=node0 launch/torchrun.sh 4 ...   (and NODE_RANK=1 on node1)
set -euo pipefail
procs=${1:?usage: launch/torchrun.sh PROCESSES_PER_NODE [train options]}
shift
exec "${PYTHON:-python}" -m torch.distributed.run --nnodes "${NNODES:-1}" --node-rank "${NODE_RANK:-0}" \
  --nproc-per-node "$procs" --master-addr "${MASTER_ADDR:-127.0.0.1}" --master-port "${MASTER_PORT:-29500}" \
  -m pipeline train "$@"
