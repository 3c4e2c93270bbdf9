#!/usr/bin/env bash
# A short check of cnnjax on one GPU machine that has no network.
#
#   experiments/device_check.sh wheels [DIR]       here, where pip reaches PyPI: download the wheels a
#                                                  GPU image with JAX, Flax, optax and orbax lacks (pure
#                                                  Python or manylinux x86_64, CPython 3.12) into DIR (.whl)
#   experiments/device_check.sh OUT [DIR]          there: install the wheels in DIR offline (into
#                                                  /tmp/cnnjax-site, nothing system-wide), then run
#                                                  1. the benchmark's `paper` preset: cnnjax vs PyTorch (on the
#                                                     GPU when torch sees one), members M = 1, 2, 5 (10 steps
#                                                     per call, as training calls chunks: rolled there, so
#                                                     compiled once), chunks, compile cache, grain, ResNet-50
#                                                     bf16 images/s and MFU;
#                                                  2. the transfer `paper` preset, shortened to a few minutes
#                                                     (ResNet-20, bf16): on cifar100 -> cifar10 when they are
#                                                     prepared in the TFDS data dir, else on the embedded
#                                                     mnist_5k -> sklearn_digits;
#                                                  and write their tables, provenance and a log under OUT.
#                                                  A step that fails is logged and the next one runs; the
#                                                  exit status is 1 if any failed.
# Environment: PEAK_FLOPS (the device's dense bf16 peak, FLOP/s; default H100/H200 SXM 989e12),
# PYTHON (default python3), CNNJAX_DATA_DIR (TFDS data dir), BENCHMARK_FLAGS and TRANSFER_FLAGS
# (extra --config.KEY=VALUE flags, space-separated, appended so that they win: to fit a time limit).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

PYTHON=${PYTHON:-python3}
# Not in a typical JAX GPU image; versions from constraints.txt.
PACKAGES=(tensorflow-datasets grain cloudpickle array_record ml_collections mlxtend importlib_resources dm-tree
          promise simple-parsing docstring_parser tensorflow-metadata googleapis-common-protos termcolor toml
          immutabledict portpicker)  # kanjivg (the kanji_glyphs data, 22 MB) is not used here

pinned() {  # NAME==VERSION from constraints.txt (names compare case- and -/_-insensitively)
  local pattern="^${1//[-_]/[-_]}=="
  grep -i "$pattern" constraints.txt || { echo "device_check: $1 is not in constraints.txt" >&2; exit 1; }
}

if [[ ${1:-} == wheels ]]; then
  dir=${2:-.whl}
  mkdir -p "$dir"
  for name in "${PACKAGES[@]}"; do
    $PYTHON -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
      --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64 \
      --platform manylinux2014_x86_64 -d "$dir" "$(pinned "$name")" 2>/dev/null ||
      $PYTHON -m pip wheel -q --no-deps -w "$dir" "$(pinned "$name")"  # pure-Python sources (promise)
  done
  du -sh "$dir"
  exit 0
fi

[[ $# -ge 1 ]] || { sed -n '2,/^set /s/^# \{0,1\}//p' "${BASH_SOURCE[0]}"; exit 2; }  # the header
out=$(mkdir -p "$1" && cd "$1" && pwd)
wheels=${2:-.whl}
site=/tmp/cnnjax-site
if compgen -G "$wheels/*.whl" >/dev/null; then
  $PYTHON -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$site" "$wheels"/*.whl
fi
export PYTHONPATH="$PWD:$site${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1 WANDB_MODE=disabled
log=$out/device_check.log
exec > >(tee -a "$log") 2>&1

$PYTHON - <<'EOF'
import jax
backend = jax.default_backend()
print('jax', jax.__version__, backend, jax.devices())
if backend == 'cpu':
  raise SystemExit('device_check: JAX sees no accelerator (install jax[cuda12], or run ./run.sh benchmark on CPU)')
EOF

read -ra benchmark_flags <<<"${BENCHMARK_FLAGS:-}"
read -ra transfer_flags <<<"${TRANSFER_FLAGS:-}"
failed=()

echo "== benchmark (paper preset)"
$PYTHON -m experiments.benchmark --config=experiments/configs/benchmark.py:paper \
  --config.results_dir="$out" --config.workdir=/tmp/cnnjax-work --config.peak_flops="${PEAK_FLOPS:-989e12}" \
  --config.member_chunk_steps=10 "${benchmark_flags[@]}" || failed+=(benchmark)

echo "== transfer (paper preset, shortened)"
catalog_ready=$($PYTHON -c "
from cnnjax import data
try:
  data.data_source('cifar100', 'train'); data.data_source('cifar10', 'test'); print(1)
except Exception:
  print(0)")
if [[ $catalog_ready == 1 ]]; then
  data_flags=(--config.targets="('cifar10',)")
else
  echo "cifar100/cifar10 are not prepared: the paper preset's model and schedule on the embedded digits"
  data_flags=(--config.source=mnist_5k --config.targets="('sklearn_digits',)")
fi
$PYTHON -m experiments.transfer --config=experiments/configs/transfer.py:paper "${data_flags[@]}" \
  --config.pretrain.steps=3000 --config.finetune.steps=500 --config.compute_dtype=bfloat16 \
  --config.results_dir="$out" --config.workdir=/tmp/cnnjax-work "${transfer_flags[@]}" || failed+=(transfer)

if (( ${#failed[@]} )); then
  echo "device_check: failed: ${failed[*]} (log: $log); tables under $out"
  exit 1
fi
echo "device_check: tables under $out"
