#!/usr/bin/env bash
# One run of the authors' 2D program, evaluated by ours (reference/official_2d.py):
#   reference/run_official_2d.sh DATASET FAMILY SEED WORKDIR [FLAGS...]
# DATASET: gaussians8 | checkerboard | spirals2; FAMILY: csbm | usbm | qcsbm. The training
# set is ours for data.seed = SEED (the points our seed-SEED run trains on). FLAGS go to
# the evaluation (qcsbm_jax.main --mode eval), e.g. --config.eval.num_points=5000.
# EMA_DECAY (default 0.995) also keeps an EMA of their weights, evaluated into
# WORKDIR/eval_ema beside the final weights in WORKDIR/eval; 0 turns it off.
# JAX_PYTHON (default .venv/bin/python) runs the JAX steps, TORCH_PYTHON (default
# /work/torchenv/bin/python) their training, QCSBM_CODE (default /work/ext/qcsbm) is a
# checkout of their repository.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
dataset=$1 family=$2 seed=$3 workdir=$4
shift 4
qcsbm=${QCSBM_CODE:-/work/ext/qcsbm}
jax_python=${JAX_PYTHON:-.venv/bin/python}
torch_python=${TORCH_PYTHON:-/work/torchenv/bin/python}
ema_decay=${EMA_DECAY:-0.995}
common=(--dataset "$dataset" --family "$family" --seed "$seed" --data_seed "$seed"
        --workdir "$workdir")
"$jax_python" reference/official_2d.py data "${common[@]}"
"$torch_python" reference/official_2d.py train "${common[@]}" --qcsbm "$qcsbm" \
    --ema_decay "$ema_decay"
"$jax_python" reference/official_2d.py import "${common[@]}"
evaluate() {
  "$jax_python" -m qcsbm_jax.main --mode eval --config "configs/toy/${dataset}_${family}.py" \
      --workdir "$workdir" --config.seed="$seed" --config.data.seed="$seed" "$@"
}
evaluate --config.eval.params=raw --config.eval.output_dir=eval "$@"
if [[ "$ema_decay" != 0 ]]; then
  evaluate --config.eval.params=ema --config.eval.output_dir=eval_ema "$@"
fi
