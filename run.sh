#!/usr/bin/env bash
# cnnjax entry point.
#
#   ./run.sh                  make .venv if missing, install, run every experiment (default preset), rebuild results/README.md
#   ./run.sh test [ARGS]      make .venv if missing, install with [test], run pytest (ARGS go to pytest)
#   ./run.sh NAME [FLAGS]     run one experiment, e.g. ./run.sh domain_adapt --config.seeds=5
#                             or ./run.sh transfer --config=experiments/configs/transfer.py:smoke
#
# The project is installed editable (the embedded TFDS builders under datasets/ are read from the
# repository) with the pins in constraints.txt. The install is skipped while .venv/.installed is newer
# than pyproject.toml and constraints.txt. Extra extras: CNNJAX_EXTRAS=cuda ./run.sh ... (comma-separated).
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")"
ROOT=$PWD
VENV=$ROOT/.venv
PY=$VENV/bin/python
STAMP=$VENV/.installed

export WANDB_SILENT=true
# glibc's malloc maps every allocation over 32 MB afresh and unmaps it on free, so XLA:CPU's
# per-call temp buffer costs a page fault per 4 KB on every call: Python runs on mimalloc, which
# keeps it between calls (preload_mimalloc), and glibc's malloc, where an LD_PRELOAD the caller set
# leaves it in charge (LD_PRELOAD= ./run.sh ...), gets 2 MB transparent huge pages
# (cnnjax/host_memory.py). Values the caller set win.
[[ ${GLIBC_TUNABLES:-} == *glibc.malloc.hugetlb* ]] ||
  export GLIBC_TUNABLES=${GLIBC_TUNABLES:+$GLIBC_TUNABLES:}glibc.malloc.hugetlb=1

die() { echo "run.sh: $*" >&2; exit 1; }

usage() {
  sed -n '2,11p' "${BASH_SOURCE[0]}" | sed 's/^# \{0,1\}//'
  echo
  echo "experiments: $(known_experiments)"
}

# Experiments that can run: experiments/configs/<name>.py with a module experiments/<name>.py.
list_experiments() {
  local config name
  for config in experiments/configs/*.py; do
    [[ -e $config ]] || continue
    name=$(basename "$config" .py)
    [[ $name == __init__ || $name == benchmark ]] && continue  # the benchmark runs alone: ./run.sh benchmark
    [[ -f experiments/$name.py ]] && echo "$name"
  done
  return 0
}

known_experiments() {
  local names
  names=$(list_experiments | paste -sd' ' -)
  echo "${names:-(none yet)}"
}

find_python() {
  local candidate
  for candidate in python3.11 python3; do
    if command -v "$candidate" >/dev/null 2>&1 &&
       "$candidate" -c 'import sys; sys.exit(sys.version_info < (3, 11))' >/dev/null 2>&1; then
      echo "$candidate"
      return 0
    fi
  done
  return 1
}

make_venv() {
  if [[ -d $VENV ]]; then
    [[ -x $PY ]] || die ".venv exists but has no bin/python; remove it (rm -rf .venv) and rerun"
    return 0
  fi
  local python
  python=$(find_python) ||
    die "Python >= 3.11 is required: found neither python3.11 nor a python3 >= 3.11 on PATH" \
        "(python3 is $(python3 --version 2>&1 || echo missing))"
  echo "run.sh: creating .venv with $("$python" --version 2>&1)" >&2
  "$python" -m venv "$VENV"
}

# install [EXTRA...]: editable install of the project with the given extras, pinned by constraints.txt.
install() {
  local extras=("$@") extra
  if [[ -n ${CNNJAX_EXTRAS:-} ]]; then
    IFS=',' read -r -a more <<< "$CNNJAX_EXTRAS"
    extras+=("${more[@]}")
  fi
  [[ -f constraints.txt ]] || die "constraints.txt is missing (see its header to regenerate it)"
  # Extras installed before stay installed (and get re-pinned when the install is redone).
  local have="" wanted missing=0
  [[ -f $STAMP ]] && have=$(cat "$STAMP")
  wanted=$(printf '%s\n' ${have//,/ } "${extras[@]}" | sed '/^$/d' | sort -u | paste -sd, -)
  if [[ -f $STAMP && $STAMP -nt pyproject.toml && $STAMP -nt constraints.txt ]]; then
    for extra in "${extras[@]}"; do
      [[ -z $extra || ,$have, == *,$extra,* ]] || missing=1
    done
    ((missing)) || return 0
  fi
  local target=.
  [[ -n $wanted ]] && target=".[${wanted}]"
  echo "run.sh: installing -e '$target' -c constraints.txt (a fresh .venv takes a few minutes)" >&2
  "$PY" -m pip install --disable-pip-version-check -q -c constraints.txt -e "$target"
  echo "$wanted" > "$STAMP"
}

# The .venv's mimalloc (the cmeel-mimalloc wheel) for every Python process from here on, unless the
# caller set LD_PRELOAD, with cnnjax's options (host_memory.MIMALLOC_OPTIONS; the caller's values win).
preload_mimalloc() {
  local lib
  [[ -n ${LD_PRELOAD+set} ]] && return 0
  for lib in "$VENV"/lib/python3*/site-packages/cmeel.prefix/lib/libmimalloc.so; do
    [[ -e $lib ]] || continue
    export LD_PRELOAD=$lib MIMALLOC_ARENA_MAX_OBJECT_SIZE=${MIMALLOC_ARENA_MAX_OBJECT_SIZE:-16GiB} \
      MIMALLOC_PURGE_DELAY=${MIMALLOC_PURGE_DELAY:-10000}
  done
  return 0
}

# prepare [EXTRA...]: the .venv, installed with the given extras, and its malloc.
prepare() {
  make_venv
  install "$@"
  preload_mimalloc
}

run_experiment() {
  local name=$1; shift
  local arg has_config=0
  for arg in "$@"; do
    [[ $arg == --config || $arg == --config=* ]] && has_config=1
  done
  if ((has_config)); then
    "$PY" -m "experiments.$name" "$@"
  else
    "$PY" -m "experiments.$name" "--config=experiments/configs/$name.py" "$@"
  fi
}

cmd=${1:-}
case $cmd in
  -h|--help|help)
    usage
    ;;
  '')
    prepare
    mapfile -t names < <(list_experiments)
    ((${#names[@]})) || echo "run.sh: no experiments yet (experiments/configs/<name>.py + experiments/<name>.py)" >&2
    for name in "${names[@]}"; do
      echo "run.sh: === $name (default preset) ===" >&2
      run_experiment "$name"
    done
    "$PY" -c 'from cnnjax.tables import write_index; print(write_index("results"))'
    ;;
  test)
    shift
    prepare test
    args=()
    # Two workers when pytest-xdist is there and the caller did not choose (-n / -p no:xdist). Work
    # stealing: an idle worker takes queued tests from the other, so the suite does not end on one
    # worker's backlog of slow tests (2 AVX2 cores: 570 -> 525 s).
    if "$PY" -c 'import xdist' >/dev/null 2>&1 && [[ " $* " != *" -n"* && " $* " != *" --numprocesses"* &&
                                                  " $* " != *"no:xdist"* ]]; then
      args+=(-n 2 --dist worksteal)
    fi
    # Default to tests/ unless the caller named files or node ids (pytest's testpaths covers option-only calls too).
    paths=0
    for arg in "$@"; do
      [[ $arg != -* && -e ${arg%%::*} ]] && paths=1
    done
    ((paths)) || args+=(tests)
    # Exit status is pytest's: 5 (no tests collected) counts as a failure.
    exec "$PY" -m pytest "${args[@]}" "$@"
    ;;
  -*)
    usage >&2
    die "unknown option '$cmd' (flags go after an experiment name)"
    ;;
  *)
    shift
    if [[ ! -f experiments/configs/$cmd.py || ! -f experiments/$cmd.py ]]; then
      die "unknown experiment '$cmd'; known: $(known_experiments)"
    fi
    prepare
    run_experiment "$cmd" "$@"
    ;;
esac
