#!/usr/bin/env bash
# Runs N copies of a command on this machine as one multi-process JAX run on CPU devices: how the
# multi-host path (jax.distributed + gloo collectives) is exercised without a cluster.
#
#   launch/local_multihost.sh N [--] <command...>
#   launch/local_multihost.sh 2 -- python -m nucgpt.train --config configs/pretrain.py:demo --workdir /tmp/run
#
# Each copy gets NUCGPT_COORDINATOR_ADDRESS=127.0.0.1:<free port>, NUCGPT_NUM_PROCESSES=N,
# NUCGPT_PROCESS_ID=0..N-1 (read by nucgpt.distributed.initialize), JAX_PLATFORMS=cpu and
# DEVICES_PER_PROCESS virtual CPU devices. Output lines are prefixed with the process index.
# If one process fails, the others get SIGTERM (SIGKILL after KILL_AFTER_S seconds) and the script
# exits with the failed process's status. SIGINT/SIGTERM are forwarded to every process as SIGTERM
# (the trainer saves a checkpoint and exits 0); a second one sends SIGKILL. SIGKILL itself cannot be
# forwarded: to kill -9 a whole run, signal the launcher's process group (`kill -9 -- -PGID`).
#
# Environment: DEVICES_PER_PROCESS (default 1), COORDINATOR_PORT (default: a free port),
# KILL_AFTER_S (default 10), PYTHON (used to find a free port; default python3).
set -uo pipefail

die() { echo "error: $*" >&2; exit 2; }

usage="usage: $0 N [--] <command...>"
[ $# -ge 1 ] || die "$usage"
case $1 in -h | --help) echo "$usage"; exit 0 ;; esac
num_processes=$1
shift
[[ $num_processes =~ ^[1-9][0-9]*$ ]] || die "N must be a positive integer, got '$num_processes'"
[ "${1:-}" = "--" ] && shift
[ $# -ge 1 ] || die "no command given; $usage"

devices_per_process=${DEVICES_PER_PROCESS:-1}
[[ $devices_per_process =~ ^[1-9][0-9]*$ ]] ||
  die "DEVICES_PER_PROCESS must be a positive integer, got '$devices_per_process'"
kill_after_s=${KILL_AFTER_S:-10}
[[ $kill_after_s =~ ^[0-9]+$ ]] || die "KILL_AFTER_S must be a whole number of seconds, got '$kill_after_s'"

port=${COORDINATOR_PORT:-$("${PYTHON:-python3}" -c \
  'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')} ||
  die "could not find a free port (set COORDINATOR_PORT)"

# A device count already in XLA_FLAGS (pytest's conftest sets 8) would fight ours: drop it.
xla_flags="$(sed -E 's/--xla_force_host_platform_device_count=[0-9]+//g' <<<"${XLA_FLAGS:-}")"
xla_flags="${xla_flags} --xla_force_host_platform_device_count=${devices_per_process}"

pids=()
running() {
  local pid
  for pid in "${pids[@]}"; do kill -0 "$pid" 2>/dev/null && return 0; done
  return 1
}

signal_all() {
  local pid
  for pid in "${pids[@]}"; do kill "-$1" "$pid" 2>/dev/null; done
}

interrupted=0
on_signal() {
  interrupted=$((interrupted + 1))
  if [ "$interrupted" -eq 1 ]; then
    echo "local_multihost: forwarding SIGTERM to ${num_processes} processes" >&2
    signal_all TERM
  else
    echo "local_multihost: killing ${num_processes} processes" >&2
    signal_all KILL
  fi
}
trap on_signal INT TERM

for ((i = 0; i < num_processes; i++)); do
  NUCGPT_COORDINATOR_ADDRESS="127.0.0.1:${port}" NUCGPT_NUM_PROCESSES="$num_processes" \
    NUCGPT_PROCESS_ID="$i" JAX_PLATFORMS=cpu XLA_FLAGS="${xla_flags# }" \
    "$@" < /dev/null > >(sed -u "s/^/[$i] /") 2>&1 &
  pids+=($!)
done

# Poll rather than `wait -n`: it works on every bash and a trap runs within one interval.
status=0
declare -A finished=()
while [ ${#finished[@]} -lt "$num_processes" ]; do
  for i in "${!pids[@]}"; do
    [ -n "${finished[$i]:-}" ] && continue
    kill -0 "${pids[$i]}" 2>/dev/null && continue
    wait "${pids[$i]}"
    code=$?
    finished[$i]=1
    if [ "$code" -ne 0 ] && [ "$status" -eq 0 ]; then
      status=$code
      echo "local_multihost: process $i exited with status $code; stopping the others" >&2
      signal_all TERM
      deadline=$((SECONDS + kill_after_s))
      while running && [ "$SECONDS" -lt "$deadline" ]; do sleep 0.2; done
      running && signal_all KILL
    fi
  done
  sleep 0.2
done
wait  # the output prefixers
exit "$status"
