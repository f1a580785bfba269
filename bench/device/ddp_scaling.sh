#!/usr/bin/env bash
# Images/s on 1 and 2 GPUs for the MNIST and CIFAR-10 configs, through `ddpm train` (train.nproc).
set -uo pipefail
export NCCL_NVLS_ENABLE=0 PYTHONPATH=$PWD PYTHONUNBUFFERED=1
tar -xzf .device/mnist.tgz
python3 - <<'PY'
# CIFAR-10 has no offline source: random batches in its pickle format (only throughput is measured).
import os, pickle, numpy as np
d = "data/cifar10/cifar-10-batches-py"; os.makedirs(d, exist_ok=True)
rng = np.random.default_rng(0)
for name, n in [(f"data_batch_{i}", 10000) for i in range(1, 6)] + [("test_batch", 10000)]:
    with open(f"{d}/{name}", "wb") as f:
        pickle.dump({b"data": rng.integers(0, 256, (n, 3072), dtype=np.uint8), b"labels": list(rng.integers(0, 10, n))}, f)
PY
run() {  # name profile nproc batch steps extra...
  local name=$1 profile=$2 nproc=$3 batch=$4 steps=$5; shift 5
  timeout 240 python3 -m ddpm.cli train --profile "$profile" train.nproc=$nproc train.batch_size=$batch \
    train.steps=$steps train.log_every=25 train.checkpoint_every=100000 train.sample_every=0 \
    sample.num_images=8 sample.steps=2 train.out_dir=runs/ddp_$name "$@" > $OUT/ddp_$name.log 2>&1
  echo "$name rc=$? last rows: $(tail -n 3 runs/ddp_$name/loss.csv | tr '\n' ' ')" | tee -a $OUT/ddp_summary.txt
}
run mnist_1gpu gpu 1 512 150 train.compile=false train.cuda_graphs=false
run mnist_2gpu gpu 2 512 150 train.compile=false train.cuda_graphs=false
run cifar_1gpu cifar10 1 128 150 train.compile=false
run cifar_2gpu cifar10 2 128 150 train.compile=false
run cifar_1gpu_c cifar10 1 128 250 train.compile=true
run cifar_2gpu_c cifar10 2 128 250 train.compile=true
