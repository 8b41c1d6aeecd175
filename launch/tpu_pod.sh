#!/usr/bin/env bash
# Trains nucgpt on a Cloud TPU VM slice: create it, copy and install the project on every worker,
# run the trainer on all workers at once (one JAX process per worker), stream worker 0's log, and
# delete the slice when asked. Actions run in this order: --create, --run, --stop, --logs, --delete
# (--run streams the log by itself; --stop --logs sends SIGTERM and watches the checkpoint being saved).
#
#   launch/tpu_pod.sh --name nucgpt-v5p --type v5p-32 --zone us-east5-a --create --run \
#       -- --config configs/pretrain.py:nucleotide_gpt_500m --workdir gs://BUCKET/runs/500m
#   launch/tpu_pod.sh --name nucgpt-v5p --zone us-east5-a --logs      # re-attach to worker 0's log
#   launch/tpu_pod.sh --name nucgpt-v5p --zone us-east5-a --stop      # SIGTERM: checkpoint, exit 0
#   launch/tpu_pod.sh --name nucgpt-v5p --zone us-east5-a --delete
#
# The trainer runs detached (it survives a dropped ssh connection) and writes ~/nucgpt_train.log on
# each worker. The project copied is the committed tree (git HEAD). --dry-run prints the commands.
set -euo pipefail

usage="usage: $0 --name NAME --zone ZONE [--project PROJECT] [--type TYPE] [--runtime VERSION] [--spot]
       [--python VERSION] [--create] [--run] [--stop] [--logs] [--delete] [--dry-run] [-- TRAINER_ARGS...]"
die() { echo "error: $*" >&2; exit 2; }

name="" zone="" project="" type="" runtime="" spot=0 python_version=3.12 dry_run=0
create=0 run=0 logs=0 stop=0 delete=0
trainer_args=()
while [ $# -gt 0 ]; do
  case $1 in
    --*=*) set -- "${1%%=*}" "${1#*=}" "${@:2}" ;;  # --flag=value → --flag value
  esac
  case $1 in
    --name | --zone | --project | --type | --runtime | --python)
      [ $# -ge 2 ] && [ -n "$2" ] && [[ $2 != --* ]] || die "$1 needs a value"
      case $1 in
        --name) name=$2 ;;
        --zone) zone=$2 ;;
        --project) project=$2 ;;
        --type) type=$2 ;;
        --runtime) runtime=$2 ;;
        --python) python_version=$2 ;;
      esac
      shift 2
      ;;
    --spot) spot=1; shift ;;
    --dry-run) dry_run=1; shift ;;
    --create) create=1; shift ;;
    --run) run=1; shift ;;
    --logs) logs=1; shift ;;
    --stop) stop=1; shift ;;
    --delete) delete=1; shift ;;
    --help | -h) echo "$usage"; exit 0 ;;
    --) shift; trainer_args=("$@"); break ;;
    *) die "unknown option '$1' (see --help)" ;;
  esac
done

[ -n "$name" ] || die "--name is required (the TPU VM slice's name)"
[[ $name =~ ^[a-z]([-a-z0-9]{0,61}[a-z0-9])?$ ]] ||
  die "--name must be lowercase letters, digits and hyphens, starting with a letter; got '$name'"
[ -n "$zone" ] || die "--zone is required (e.g. us-east5-a)"
[ $((create + run + logs + stop + delete)) -gt 0 ] ||
  die "nothing to do: give at least one of --create --run --stop --logs --delete"
if [ "$create" = 1 ]; then
  [ -n "$type" ] || die "--create needs --type (e.g. v3-8, v4-32, v5p-32, v5litepod-16, v6e-16)"
  [[ $type =~ ^v[0-9a-z]+-[0-9]+$ ]] || die "--type must look like v5p-32, got '$type'"
  if [ -z "$runtime" ]; then
    case $type in
      v2-* | v3-* | v4-*) runtime=tpu-ubuntu2204-base ;;
      v5litepod-* | v5e-*) runtime=v2-alpha-tpuv5-lite ;;
      v5p-*) runtime=v2-alpha-tpuv5 ;;
      v6e-*) runtime=v2-alpha-tpuv6e ;;
      *) die "no default runtime for --type $type; give --runtime (see: gcloud compute tpus tpu-vm versions list)" ;;
    esac
  fi
fi
if [ "$run" = 1 ]; then
  [ ${#trainer_args[@]} -gt 0 ] ||
    die "--run needs trainer arguments after --, e.g. -- --config configs/pretrain.py:nucleotide_gpt_500m --workdir gs://BUCKET/run"
  [[ " ${trainer_args[*]} " =~ [[:space:]]--workdir[=[:space:]]+gs:// ]] ||
    echo "warning: --workdir is not a gs:// path: every worker writes its own disk, and a multi-host" \
      "checkpoint needs one shared path" >&2
fi
[[ $python_version =~ ^3\.[0-9]+$ ]] || die "--python must look like 3.12, got '$python_version'"

# Quotes a word for display only where the shell needs it, so dry-run output stays readable.
quote() {
  if [[ $1 =~ ^[A-Za-z0-9_./:=,@%+-]+$ ]]; then printf '%s' "$1"; else printf "'%s'" "${1//\'/\'\\\'\'}"; fi
}
execute() {
  local words=() word
  for word in "$@"; do words+=("$(quote "$word")"); done
  if [ "$dry_run" = 1 ]; then echo "${words[*]}"; else echo "+ ${words[*]}" >&2; "$@"; fi
}

where=(--zone="$zone")
[ -n "$project" ] && where+=(--project="$project")
tpu_vm=(gcloud compute tpus tpu-vm)
on_workers() { execute "${tpu_vm[@]}" ssh "$name" "${where[@]}" --worker="$1" --command="$2"; }

status=0  # the trainer's exit status; --delete still runs after a failed run, so no slice idles
log=nucgpt_train.log pid=nucgpt_train.pid rc=nucgpt_train.rc venv=nucgpt-venv

# With --delete, a step that fails before the end (the copy, the install, a run already going) still
# deletes the slice on the way out. Ctrl-C does not: a detached run may be going; the slice is kept.
deleted=0 interrupted=0
delete_slice() { execute "${tpu_vm[@]}" delete "$name" "${where[@]}" --quiet; deleted=1; }
if [ "$delete" = 1 ]; then
  trap 'interrupted=1; exit 130' INT
  trap 'code=$?; if [ "$deleted" = 0 ] && [ "$interrupted" = 0 ]; then
          echo "a step failed (exit $code); deleting the slice as --delete asks" >&2; delete_slice || true
        elif [ "$deleted" = 0 ]; then echo "interrupted: slice $name kept (delete it with --delete)" >&2; fi' EXIT
fi

if [ "$create" = 1 ]; then
  create_flags=(--accelerator-type="$type" --version="$runtime")
  [ "$spot" = 1 ] && create_flags+=(--spot)
  execute "${tpu_vm[@]}" create "$name" "${where[@]}" "${create_flags[@]}"
fi

if [ "$run" = 1 ]; then
  root=$(git -C "$(dirname "$0")" rev-parse --show-toplevel)
  [ -z "$(git -C "$root" status --porcelain --untracked-files=no)" ] ||
    echo "warning: uncommitted changes are not copied; the workers get git HEAD" >&2
  tarball=${TMPDIR:-/tmp}/nucgpt-$name.tar.gz
  execute git -C "$root" archive --format=tar.gz --prefix=nucgpt/ --output="$tarball" HEAD
  execute "${tpu_vm[@]}" scp "$tarball" "$name:nucgpt.tar.gz" "${where[@]}" --worker=all
  # TPU VM images ship an older system Python; uv brings the one JAX needs.
  on_workers all "set -e; cd ~; rm -rf nucgpt; tar -xzf nucgpt.tar.gz; \
[ -x ~/.local/bin/uv ] || python3 -m pip install --user --quiet uv \
  || python3 -m pip install --user --quiet --break-system-packages uv; \
[ -x $venv/bin/python ] || ~/.local/bin/uv venv --quiet --python $python_version $venv; \
~/.local/bin/uv pip install --quiet --python $venv/bin/python 'jax[tpu]>=0.10,<0.12' './nucgpt[gcs]'"
  train_command="$venv/bin/python -m nucgpt.train"
  for word in "${trainer_args[@]}"; do train_command+=" $(printf '%q' "$word")"; done
  # `$!` must be the trainer itself (not a subshell), so that --stop's SIGTERM reaches it.
  detached="cd ~/nucgpt || exit; ~/$train_command > ~/$log 2>&1 < /dev/null & echo \$! > ~/$pid; wait \$!; echo \$? > ~/$rc"
  on_workers all "set -e; cd ~; \
if [ -s $pid ] && kill -0 \"\$(cat $pid)\" 2>/dev/null; then echo \"a run is still going (pid \$(cat $pid)); --stop it first\" >&2; exit 1; fi; \
rm -f $pid $rc; \
setsid bash -c $(printf '%q' "$detached") > /dev/null 2>&1 < /dev/null &"
fi

if [ "$stop" = 1 ]; then
  on_workers all "cd ~; [ -s $pid ] && kill -TERM \"\$(cat $pid)\" 2>/dev/null && echo \"worker \$(hostname): SIGTERM sent\" || true"
fi

if [ "$run" = 1 ] || [ "$logs" = 1 ]; then
  on_workers 0 "cd ~; for _ in \$(seq 60); do [ -s $pid ] && break; sleep 1; done; \
[ -s $pid ] || { echo 'no run found on this slice (start one with --run)' >&2; exit 1; }; \
tail -n +1 -F --pid=\"\$(cat $pid)\" $log; \
for _ in \$(seq 30); do [ -s $rc ] && exit \"\$(cat $rc)\"; sleep 1; done; \
echo 'the trainer ended without an exit status (killed with its VM?)' >&2; exit 1" || status=$?
fi

if [ "$delete" = 1 ]; then
  delete_slice
fi
exit "$status"
