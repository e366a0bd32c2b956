#!/usr/bin/env bash
# The one entry point: sets up its own virtual environment, then runs a job or the tests.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${QCSBM_VENV:-$ROOT/.venv}"
PYTHON="${PYTHON:-python3}"
DEFAULT_CONFIG="configs/toy/gaussians8_qcsbm.py"

usage() {
  cat <<USAGE
Usage: launch/run.sh COMMAND [ARGS]

Commands:
  local [CONFIG] [FLAGS...]  Train, evaluate and sample on this machine (mode 'all').
                             CONFIG defaults to $DEFAULT_CONFIG (no download needed);
                             the workdir defaults to runs/<config name>. FLAGS are passed to
                             qcsbm_jax.main, e.g. --mode=eval --workdir=DIR
                             --config.training.num_steps=100.
  test [PYTEST ARGS...]      Run the test suite (CPU only).
  -h, --help                 Show this help.

Set-up is automatic: the first run creates $VENV and installs the package with its
dependencies; later runs reuse it (reinstalling when setup.cfg changes).
Environment: PYTHON (interpreter for the venv, >= 3.11), QCSBM_VENV (venv location).
USAGE
}

setup_venv() {
  local stamp="$VENV/.qcsbm-setup" want
  want="$(cat "$ROOT/setup.cfg" "$ROOT/pyproject.toml" | sha256sum | cut -d' ' -f1)"
  if [[ -f "$stamp" && "$(cat "$stamp")" == "$want" ]]; then
    return
  fi
  echo "[run.sh] setting up $VENV (first run takes a few minutes)" >&2
  "$PYTHON" -c 'import sys; assert sys.version_info >= (3, 11), "Python >= 3.11 is required"'
  [[ -x "$VENV/bin/python" ]] || "$PYTHON" -m venv "$VENV"
  "$VENV/bin/python" -m pip install --quiet --upgrade pip
  "$VENV/bin/python" -m pip install --quiet -e "$ROOT[test]"
  echo "$want" > "$stamp"
}

run_local() {
  local config="$DEFAULT_CONFIG"
  if [[ $# -gt 0 && "$1" != -* ]]; then config="$1"; shift; fi
  local name; name="$(basename "${config%%:*}" .py)"
  local args=("--config=$config" "--mode=all" "--workdir=$ROOT/runs/$name")
  cd "$ROOT"
  exec "$VENV/bin/python" -m qcsbm_jax.main "${args[@]}" "$@"
}

main() {
  local command="${1:-}"
  [[ $# -gt 0 ]] && shift
  case "$command" in
    local) setup_venv; run_local "$@" ;;
    test) setup_venv; cd "$ROOT"; exec "$VENV/bin/python" -m pytest -q "$@" ;;
    -h|--help|help) usage ;;
    "") usage; exit 2 ;;
    *) echo "launch/run.sh: unknown command '$command'" >&2; usage >&2; exit 2 ;;
  esac
}

main "$@"
