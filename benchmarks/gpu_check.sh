#!/usr/bin/env bash
# One call on a fresh GPU machine (JAX, torch, transformers, flax, optax, orbax preinstalled; no network):
# installs the project from the working tree, checks cuDNN attention against XLA, times the 500M preset
# at sequence 8192 in the most promising variants with benchmarks.mfu, times the Hugging Face peer with
# benchmarks.compare_hf (eager and torch.compile), and prints a short table LAST.
#
#   bash benchmarks/gpu_check.sh                       # GPU: ~7 min; device tool: carry [".whl"]
#   GPU_CHECK_SMOKE=1 bash benchmarks/gpu_check.sh     # the same logic on CPU, demo preset (2-6 min)
#
# Writes $OUT/gpu_check.log (everything) and $OUT/results.jsonl (one JSON line per variant).
# Knobs: GPU_CHECK_DEADLINE_S (default 550: every step's timeout is clipped so the table is printed by then;
# set it ~40 s under the device call's limit), GPU_CHECK_VARIANT_TIMEOUT_S (default 150; torch.compile gets
# 90 s more), PYTHON (default python3). A variant starts only while its expected time fits before the deadline
# (the first timed variant's own duration, once known). SIGTERM/Ctrl-C still print the table of what ran.
set -uo pipefail
cd "$(dirname "$0")/.."

OUT=${OUT:-/tmp/gpu_check_out}
mkdir -p "$OUT"
LOG=$OUT/gpu_check.log
RESULTS=$OUT/results.jsonl
: >"$LOG"
: >"$RESULTS"
rm -f "$OUT/profile.jsonl"  # appended to by the profile step: no line from an earlier run
SMOKE=${GPU_CHECK_SMOKE:-0}
PY=${PYTHON:-python3}
DEADLINE_S=${GPU_CHECK_DEADLINE_S:-550}
TABLE_S=15  # kept for printing the table
VARIANT_TIMEOUT_S=${GPU_CHECK_VARIANT_TIMEOUT_S:-150}
WORK=$(mktemp -d)
export PYTHONUNBUFFERED=1
# JAX preallocates 75% of the card by default; the 500M step at batch 4+ wants nearly all of it.
export XLA_PYTHON_CLIENT_MEM_FRACTION=0.95
# Each flag is explained in benchmarks/NOTES.md; the set is checked below and trimmed if XLA rejects one.
TUNED_FLAGS="--xla_gpu_enable_latency_hiding_scheduler=true --xla_gpu_enable_triton_gemm=false"
# Every GEMM on cuBLASLt (no Triton GEMM fusions): XLA then folds the MLP's GeLU into the up-projection's
# epilogue (GELU_AUX), seen in the H100 step compiled offline (benchmarks/NOTES.md, 2026-12-04).
CUBLAS_FLAGS="--xla_gpu_enable_triton_gemm=false"
# XLA's experimental Triton GEMM fusion (offline, 2026-12-04): elementwise producers go into the GEMMs'
# prologues (GeLU into the down-projection, its backward into both up-projection gradients; the GeLU output
# is no longer kept: 42.8 GiB planned instead of 55.9), at the price of recomputing tanh per tile.
GEMMV2_FLAGS="--xla_gpu_experimental_gemm_fusion_v2=true"

log() { echo "[$(date -u +%T) +${SECONDS}s] $*" | tee -a "$LOG"; }
remaining_s() { echo $((DEADLINE_S - TABLE_S - SECONDS)); }
bounded() {  # seconds command...: `timeout` clipped to what is left before the deadline (rc 124 when nothing is)
  local limit=$1 left
  shift
  left=$(remaining_s)
  [ "$left" -lt "$limit" ] && limit=$left
  [ "$limit" -ge 5 ] || return 124
  # In the background, waited for: a trapped signal interrupts `wait` at once (not after the step), and the
  # trap stops the step (`timeout` runs in its own process group, which a signal to ours does not reach).
  timeout -k 10 "$limit" "$@" <&0 &
  CHILD=$!
  local rc=0
  wait "$CHILD" || rc=$?
  CHILD=""
  return $rc
}
CHILD=""
ATTENTION_LINE="" ATTENTION_B8_LINE="" NORM_LINE="" JOIN_LINE="" RESIDUALS_LINE="" PROFILE_TABLE=""

# --- the table, printed last (also when a signal stops the run: what ran is still shown) ----------------
TABLE_PRINTED=0
print_table() {
  [ "$TABLE_PRINTED" = 1 ] && return
  TABLE_PRINTED=1
  log "total ${SECONDS}s"
  if [ -n "$PROFILE_TABLE" ] && [ -s "$PROFILE_TABLE" ]; then  # the profile's own table (its JSON is in profile.jsonl)
    echo; grep -v '^{' "$PROFILE_TABLE" | grep -v '^[IWE][0-9]' | grep -v '^\s*$' | tail -45 | tee -a "$LOG"
  fi
  "$PY" - "$RESULTS" "$OUT/profile.jsonl" "$ATTENTION_LINE" "$ATTENTION_B8_LINE" "$NORM_LINE" "$JOIN_LINE" "$RESIDUALS_LINE" <<'EOF' | tee -a "$LOG"
import json, os, sys

records = []
for line in open(sys.argv[1]):
    if line.strip():
        try:
            records.append(json.loads(line))
        except ValueError:
            records.append({"variant": "?", "error": "unparsable line", "message": line.strip()})
ran = [r for r in records if "tokens_per_sec" in r]
hf_compile = next((r["tokens_per_sec"] for r in ran if r.get("variant") == "hf_compile"), None)
print()
print("\n".join(sys.argv[3:]))
print(f"{'variant':<34}{'tokens/s':>11}{'MFU':>8}{'TFLOP/s':>9}{'peak GiB':>10}{'step ms':>9}{'sync ms':>9}"
      f"{'compile s':>10}{'/HF cmp':>9}")
for r in records:
    if "tokens_per_sec" not in r:
        print(f"{r.get('variant', '?'):<34}  {r.get('error')}: {r.get('message', '')[:80]}")
        continue
    mfu = "n/a" if r["mfu"] is None else f"{r['mfu']:.1%}"
    memory = "n/a" if r["peak_memory_bytes"] is None else f"{r['peak_memory_bytes'] / 2**30:.1f}"
    compile_s = "n/a" if r["compile_time_s"] is None else f"{r['compile_time_s']:.0f}"
    ratio = f"{r['tokens_per_sec'] / hf_compile:.2f}x" if hf_compile else "n/a"
    sync = r.get("step_time_s_synchronous")  # the same executable timed one step at a time (--compare_timing)
    sync = "" if sync is None else f"{sync * 1e3:.1f}"
    print(f"{r['variant']:<34}{r['tokens_per_sec']:>11,.0f}{mfu:>8}{r['tflops_per_device']:>9.0f}{memory:>10}"
          f"{r['step_time_s']['median'] * 1e3:>9.1f}{sync:>9}{compile_s:>10}{ratio:>9}")
ours = [r for r in ran if r.get("tool") == "mfu"]
if ours:
    best = max(ours, key=lambda r: r["tokens_per_sec"])
    mfu = "n/a" if best["mfu"] is None else f"{best['mfu']:.1%}"
    ratio = f"{best['tokens_per_sec'] / hf_compile:.2f}x HF compile" if hf_compile else "no HF compile figure"
    print(f"best: {best['variant']} {best['tokens_per_sec']:,.0f} tokens/s, MFU {mfu}, {ratio} "
          f"(targets: MFU >= 55%, >= 1.50x HF compile) on {best['device_kind']}")
# On an H200 the profile also estimates the step on an H100 (benchmarks.profile_step.as_device): applied to the
# measured variant the profile ran as (b8u_none_profile -> b8u_none_default). An estimate, not the target's figure.
profiles = [json.loads(line) for line in open(sys.argv[2]) if line.strip()] if os.path.exists(sys.argv[2]) else []
estimate = profiles[-1].get("as_device") if profiles else None
profiled = profiles[-1]["variant"].replace("_profile", "_default") if profiles else None
measured = [r for r in ours if r["variant"] == profiled] + ([best] if ours and best["variant"] != profiled else [])
for r in measured if estimate else []:
    scale = estimate["step_scale"]
    borrowed = "" if r["variant"] == profiled else f", with {profiled}'s scale"
    print(f"estimate as {estimate['device_kind']} (from the profile's class times{borrowed}; not a measurement): "
          f"{r['variant']} {r['tokens_per_sec'] / scale:,.0f} tokens/s, "
          f"MFU {r['tflops_per_device'] / scale / estimate['peak_tflops']:.1%} (step x {scale:.3f})")
EOF
  rm -rf "$WORK"
}
# A trap runs inside the call it interrupted, whose output may go to a variant's file: print to the script's own.
exec 3>&1
on_signal() {
  [ -n "$CHILD" ] && kill -TERM "$CHILD" 2>/dev/null
  { log "stopped by a signal: the table of what ran"; print_table; } >&3 2>&1
  exit 143
}
trap on_signal TERM INT
record_failure() {  # variant error message → a JSON line, so the table shows what did not run
  "$PY" -c 'import json,sys; print(json.dumps(dict(variant=sys.argv[1], error=sys.argv[2], message=sys.argv[3])))' \
    "$1" "$2" "$3" >>"$RESULTS"
}

# --- 1. install: the wheels carried in .whl/ only where the image lacks the packages -------------------
if "$PY" -c "import grain, array_record, ml_collections, portpicker, cloud_tpu_diagnostics" 2>/dev/null; then
  export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
else
  log "installing .whl/*.whl into /tmp/site"
  bounded 120 "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    >>"$LOG" 2>&1 || { log "FATAL: wheel install failed (was .whl carried?)"; tail -20 "$LOG"; exit 1; }
  export PYTHONPATH=/tmp/site:$PWD
fi
bounded 60 "$PY" - >>"$LOG" 2>&1 <<'EOF'
import importlib, platform
print("python", platform.python_version())
for name in ("jax", "jaxlib", "flax", "optax", "orbax.checkpoint", "grain", "ml_collections", "torch", "transformers"):
    try:
        print(name, getattr(importlib.import_module(name), "__version__", "?"))
    except Exception as e:
        print(name, "MISSING", e)
EOF
command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv >>"$LOG" 2>&1

if [ "$SMOKE" = 1 ]; then
  export JAX_PLATFORMS=cpu
  PRESET=demo
  SHAPE="--config.train.seq_len=128"
  STEPS="--steps 2 --warmup 1"
  HF_STEPS="--steps 2 --warmup 1"
  ATTN=xla
else
  PRESET=nucleotide_gpt_500m
  SHAPE="--config.train.seq_len=8192"
  STEPS="--steps 10 --warmup 2"
  HF_STEPS="--steps 8 --warmup 3"
  ATTN=cudnn
fi
log "preset $PRESET $SHAPE; deadline ${DEADLINE_S}s; per variant ${VARIANT_TIMEOUT_S}s"

# --- 2. XLA flags: keep only those this jaxlib knows (an unknown flag aborts the process) ---------------
flags_ok() { XLA_FLAGS="$1" bounded 90 "$PY" -c "import jax.numpy as jnp; jnp.ones(8).block_until_ready()" >/dev/null 2>&1; }
TUNED_CHECKED=0
check_tuned_flags() {  # once, when a variant first asks for the tuned set (the GPU list has none since 2026-11-25)
  [ "$TUNED_CHECKED" = 1 ] && return
  TUNED_CHECKED=1
  if ! flags_ok "$TUNED_FLAGS"; then
    local kept="" flag
    for flag in $TUNED_FLAGS; do
      if flags_ok "$flag"; then kept="$kept $flag"; else log "XLA rejects $flag: dropped"; fi
    done
    TUNED_FLAGS=${kept# }
  fi
  log "tuned XLA_FLAGS: '$TUNED_FLAGS'"
}
# While profiling, XLA runs CUDA graphs op by op unless told otherwise: keep the step as it runs unprofiled.
PROFILE_FLAGS="--xla_enable_command_buffers_during_profiling=true"
flags_ok "$PROFILE_FLAGS" || { log "XLA rejects $PROFILE_FLAGS: profiling without it"; PROFILE_FLAGS=""; }
flags_ok "$CUBLAS_FLAGS" || { log "XLA rejects $CUBLAS_FLAGS: the cublas variants run without it"; CUBLAS_FLAGS=""; }
flags_ok "$GEMMV2_FLAGS" || { log "XLA rejects $GEMMV2_FLAGS: the gemmv2 variants are skipped"; GEMMV2_FLAGS=""; }

# --- 3. cuDNN attention vs the XLA reference at the published shape (benchmarks.attention_check), the
#        RMSNorm backward kernels (benchmarks.norm_check), and whether the candidate remat policy really
#        keeps the cuDNN forward's residuals --------------------------------------------------------------
# a tool's JSON line, not a warning printed after it; cut to $2 characters (default 400) for the log and table
last_json() { grep '^{' "$1" | tail -1 | cut -c1-"${2:-400}"; }
bounded 150 "$PY" -m benchmarks.attention_check >"$WORK/attention.txt" 2>&1
cat "$WORK/attention.txt" >>"$LOG"
ATTENTION_LINE="attention: $(last_json "$WORK/attention.txt")"
log "$ATTENTION_LINE"
# cuDNN alone at the step's 8 rows (batch 1 is fewer than 4 waves of blocks on an H100): its TFLOP/s is
# the attention rate the step can reach; the xla reference would need ~17 GB of scores here.
bounded 90 "$PY" -m benchmarks.attention_check --batch 8 --nocompare >"$WORK/attention_b8.txt" 2>&1
cat "$WORK/attention_b8.txt" >>"$LOG"
ATTENTION_B8_LINE="attention b8: $(last_json "$WORK/attention_b8.txt")"
log "$ATTENTION_B8_LINE"
# The Pallas norm kernels at the step's shape, XLA's against theirs in a few tilings (benchmarks.norm_check):
# RMSNorm's backward (model.norm_backward=pallas), and a sublayer boundary forward and backward, unjoined
# and joined (model.join_norms); the smoke run sends a small shape through Pallas' interpreter instead.
# Prints the JSON line; its fastest Pallas tiling (named PREFIX<tiling>) goes to $FASTEST, empty for auto.
norm_check() {  # check prefix
  local args=""
  [ "$SMOKE" = 1 ] && args="--rows 256 --d_model 64 --layouts auto,4x8x4 --repeats 2 --interpret"
  bounded 90 "$PY" -m benchmarks.norm_check --check "$1" $args >"$WORK/$1.txt" 2>&1
  cat "$WORK/$1.txt" >>"$LOG"
  FASTEST=$(last_json "$WORK/$1.txt" 100000 | "$PY" -c '
import json, sys
prefix = sys.argv[1]
ms = {k[len(prefix):]: v for k, v in json.loads(sys.stdin.read() or "{}").get("ms", {}).items() if k.startswith(prefix)}
best = min(ms, key=ms.get) if ms else "auto"
print("" if best == "auto" else best)' "$2" 2>/dev/null)
}
norm_check norm_backward pallas_
NORM_LINE="norm backward: $(last_json "$WORK/norm_backward.txt" 700)"
log "$NORM_LINE"
# The Pallas variants below run each kernel's fastest tiling here, if not auto's.
NORM_LAYOUT=$FASTEST
[ -n "$NORM_LAYOUT" ] && log "the Pallas variants use the fastest tiling measured here: model.norm_kernel_layout=$NORM_LAYOUT"
norm_check join join_
JOIN_LINE="norm join: $(last_json "$WORK/join.txt" 700)"
log "$JOIN_LINE"
JOIN_LAYOUT=$FASTEST
[ -n "$JOIN_LAYOUT" ] && log "the joined variants use the fastest tiling measured here: model.join_kernel_layout=$JOIN_LAYOUT"
bounded 120 "$PY" - >"$WORK/residuals.txt" 2>&1 <<'EOF'
import jax, jax.numpy as jnp
from jax._src.ad_checkpoint import saved_residuals
from nucgpt.model import transformer
from nucgpt.model import attention

if jax.default_backend() != "gpu":
    print("save_matmuls keeps the cuDNN residuals: not checked (no GPU)")
    raise SystemExit
q = jnp.ones((1, 256, 8, 128), jnp.bfloat16)
loss = lambda q, k, v: jnp.sum(attention.attend(q, k, v, None, backend="cudnn").astype(jnp.float32))
policy = transformer.REMAT_POLICIES["save_matmuls"]
kept = saved_residuals(jax.checkpoint(loss, policy=policy), q, q, q)
print("save_matmuls keeps the cuDNN residuals:", any("dot_product_attention_fwd" in str(s) for _, s in kept))
EOF
cat "$WORK/residuals.txt" >>"$LOG"
RESIDUALS_LINE=$(tail -1 "$WORK/residuals.txt")
log "$RESIDUALS_LINE"

# --- 4. the variants, most promising first; skipped past the deadline or after a smaller batch OOM'd ----
declare -A OOM_AT
MFU_EXPECTED_S=75  # until the first timed variant says how long one takes here
MFU_MEASURED=0
fits_in_time() {  # label seconds: there is time left for a step expected to take `seconds`
  [ "$(remaining_s)" -ge "$2" ] && return 0
  log "$1: skipped (time: ${2}s expected, $(remaining_s)s left)"; record_failure "$1" skipped "time budget"; return 1
}
clipped_limit() {  # seconds: the limit, or less when the deadline is nearer
  local left
  left=$(remaining_s)
  if [ "$left" -lt "$1" ]; then echo "$left"; else echo "$1"; fi
}
out_of_memory() {  # rc log: the tool's own OOM exit, or an allocation failure (not XLA's "not a failure" warning)
  [ "$1" = 3 ] && return 0
  grep -E "RESOURCE_EXHAUSTED|[Oo]ut of memory" "$2" | grep -v "not a failure" >/dev/null  # no -q: pipefail + SIGPIPE
}
run_mfu() {  # label batch remat scan flagset(default|tuned|cublas|gemmv2) [extra args, comma-separated]
  local label=$1 batch=$2 remat=$3 scan=$4 flagset=$5 extra=${6:-} rc flags="" started=$SECONDS limit
  local shape_args=${extra//--compare_timing/}  # timing-only flags do not change what fits in memory
  local key="$remat|$scan|$flagset|${shape_args//,/}"
  if [ -n "${OOM_AT[$key]:-}" ] && [ "$batch" -ge "${OOM_AT[$key]}" ]; then
    log "$label: skipped (batch ${OOM_AT[$key]} already ran out of memory)"; record_failure "$label" skipped "oom at smaller batch"; return
  fi
  fits_in_time "$label" "$MFU_EXPECTED_S" || return
  if [ "$flagset" = tuned ]; then check_tuned_flags; flags=$TUNED_FLAGS; fi
  [ "$flagset" = cublas ] && flags=$CUBLAS_FLAGS
  if [ "$flagset" = gemmv2 ]; then
    [ -n "$GEMMV2_FLAGS" ] || { log "$label: skipped (this XLA has no $GEMMV2_FLAGS)"; record_failure "$label" skipped "flag unknown to XLA"; return; }
    flags=$GEMMV2_FLAGS
  fi
  limit=$(clipped_limit "$VARIANT_TIMEOUT_S")
  log "$label: start (XLA_FLAGS='$flags' ${extra//,/ }; limit ${limit}s)"
  XLA_FLAGS="$flags" bounded "$limit" "$PY" -m benchmarks.mfu \
    --config "configs/pretrain.py:$PRESET" $SHAPE --config.train.global_batch_size="$batch" \
    --config.model.remat_policy="$remat" --config.model.attention="$ATTN" --config.model.scan_layers="$scan" \
    ${extra//,/ } $STEPS --label "$label" --json_out "$RESULTS" >"$WORK/$label.txt" 2>&1
  rc=$?
  cat "$WORK/$label.txt" >>"$LOG"
  if [ $rc = 0 ]; then
    log "$label: done in $((SECONDS - started))s"
    if [ "$MFU_MEASURED" = 0 ]; then MFU_MEASURED=1; MFU_EXPECTED_S=$((SECONDS - started + 10)); fi
  elif [ $rc = 124 ] || [ $rc = 137 ]; then
    record_failure "$label" timeout "over ${limit}s"; log "$label: timed out"
  elif out_of_memory $rc "$WORK/$label.txt"; then
    OOM_AT[$key]=$batch
    [ $rc = 3 ] || record_failure "$label" out_of_memory "crashed (rc $rc)"
    log "$label: out of memory"
  else
    record_failure "$label" failed "rc $rc: $(grep -v '^\s*$' "$WORK/$label.txt" | tail -1 | cut -c1-200)"
    log "$label: FAILED rc $rc"; tail -15 "$WORK/$label.txt"
  fi
}
big_memory() {  # more than 100 GB on the device (H200: 141 GB): batch 16 without remat may fit
  [ "$SMOKE" = 1 ] && return 0
  local mib
  mib=$(nvidia-smi --query-gpu=memory.total --format=csv,noheader,nounits 2>/dev/null | head -1)
  [ -n "$mib" ] && [ "$mib" -gt 100000 ]
}
run_b16_if_it_can_fit() {  # label: batch 16 without remat needs more than an 80 GB card (b8 took 56 GiB)
  if big_memory; then run_mfu "$1" 16 none false default; else
    log "$1: skipped (device memory 100 GB or less, or unknown)"; record_failure "$1" skipped "device memory <= 100 GB"
  fi
}
run_profile() {  # label batch remat scan: where the step's device time goes (benchmarks.profile_step)
  local label=$1 rc limit
  fits_in_time "$label" $((MFU_EXPECTED_S + 15)) || return
  limit=$(clipped_limit "$VARIANT_TIMEOUT_S")
  log "$label: start (XLA_FLAGS='$PROFILE_FLAGS'; limit ${limit}s)"
  XLA_FLAGS="$PROFILE_FLAGS" bounded "$limit" "$PY" -m benchmarks.profile_step \
    --config "configs/pretrain.py:$PRESET" $SHAPE --config.train.global_batch_size="$2" \
    --config.model.remat_policy="$3" --config.model.attention="$ATTN" --config.model.scan_layers="$4" \
    --steps 3 --warmup 2 --top 25 --label "$label" --trace_dir "$OUT/profile_trace" \
    --json_out "$OUT/profile.jsonl" >"$WORK/$label.txt" 2>&1
  rc=$?
  cat "$WORK/$label.txt" >>"$LOG"
  if [ $rc = 0 ]; then
    log "$label: done"; PROFILE_TABLE="$WORK/$label.txt"
  else
    record_failure "$label" failed "rc $rc: $(grep -v '^\s*$' "$WORK/$label.txt" | tail -1 | cut -c1-200)"
    log "$label: FAILED rc $rc"; tail -15 "$WORK/$label.txt"
  fi
}
run_hf() {  # mode(eager|compile) batch
  local label=hf_$1 rc need=60 limit=$VARIANT_TIMEOUT_S
  [ "$1" = compile ] && need=150 && limit=$((VARIANT_TIMEOUT_S + 90))  # inductor compiles fwd + bwd first
  fits_in_time "$label" "$need" || return
  limit=$(clipped_limit "$limit")
  log "$label: start (limit ${limit}s)"
  bounded "$limit" "$PY" -m benchmarks.compare_hf --config "configs/pretrain.py:$PRESET" $SHAPE \
    --config.train.global_batch_size="$2" --mode "$1" $HF_STEPS --json_out "$RESULTS" >"$WORK/$label.txt" 2>&1
  rc=$?
  cat "$WORK/$label.txt" >>"$LOG"
  if [ $rc = 0 ]; then log "$label: done"; elif [ $rc = 124 ] || [ $rc = 137 ]; then
    record_failure "$label" timeout "over ${limit}s"; log "$label: timed out"
  else
    record_failure "$label" failed "rc $rc: $(grep -v '^\s*$' "$WORK/$label.txt" | tail -1 | cut -c1-200)"
    log "$label: FAILED rc $rc"; tail -15 "$WORK/$label.txt"
  fi
}


# Measured on an H100 (benchmarks/NOTES.md): unrolled layers beat scanned by 8-10%, remat none fits batch 8
# (RMSNorm and GeLU recompute on their own), default XLA flags beat the tuned set by ~2%. Since then: the
# embedding is a one-hot matmul (A/B: gather), steps are timed pipelined as the trainer runs them (A/B inside
# the first variant via --compare_timing). Candidates from the H100 step compiled offline (2026-12-04): q, k, v
# in one matmul (model.fused_qkv), every GEMM on cuBLAS (the GeLU folds into the up-projection's epilogue),
# RMSNorm's backward in one pass (model.norm_backward=pallas, a Triton kernel: 24 GiB less per step), all three
# (the least traffic offline), and batch 16 with the Pallas norm and fused q/k/v (66 GiB planned: it fits an
# H100 now; with cuBLAS GEMMs it would not, the GeLU epilogue keeps its input too). Then (2026-12-04, third
# session) each out-norm, residual add and next norm joined into one Pallas kernel each way (model.join_norms:
# 12 GiB less per step offline, on top of all three); the rows without it are its A/B; then the joined row under
# XLA's experimental GEMM fusion (GeLU into the GEMMs' prologues: 13 GiB less memory, tanh recomputed per tile).
# Order: the expected best's baseline, the peer the target compares it with, the candidates, the profile
# (where the time goes; on an H200 before the candidates: it carries the H100 estimate), then the rows that
# compiled worse offline or are A/B only (RMSNorm's hand-written jnp backward moves 9 GiB more per step there).
# GPU_CHECK_VARIANTS overrides the list: space-separated "label:batch:remat:scan:flagset[:extra,args]" for our
# step and "hf:mode:batch" for the peer, e.g. GPU_CHECK_VARIANTS="b4u:4:save_matmuls:false:default hf:compile:4".
PALLAS=--config.model.norm_backward=pallas${NORM_LAYOUT:+,--config.model.norm_kernel_layout=$NORM_LAYOUT}
QKV=--config.model.fused_qkv=true
JOIN=--config.model.join_norms=true${JOIN_LAYOUT:+,--config.model.join_kernel_layout=$JOIN_LAYOUT}
if [ -n "${GPU_CHECK_VARIANTS:-}" ]; then
  for spec in $GPU_CHECK_VARIANTS; do
    IFS=: read -r a b c d e f <<<"$spec"
    if [ "$a" = hf ]; then run_hf "$b" "$c"; else run_mfu "$a" "$b" "$c" "$d" "$e" "$f"; fi
  done
else  # the smoke run goes through the same rows (the demo preset, on CPU), and a different tail
  HF_BATCH=4; [ "$SMOKE" = 1 ] && HF_BATCH=8
  run_mfu b8u_none_default 8 none false default --compare_timing
  run_hf compile "$HF_BATCH"
  big_memory && run_profile b8u_none_profile 8 none false  # an H200 (and the smoke run): its H100 estimate needs the profile
  run_mfu b8u_none_pallas_cublas_qkv_join 8 none false cublas "$PALLAS,$QKV,$JOIN"
  run_mfu b8u_none_pallas_qkv_join 8 none false default "$PALLAS,$QKV,$JOIN"
  run_mfu b8u_none_pallas_cublas_qkv 8 none false cublas "$PALLAS,$QKV"
  run_mfu b8u_none_pallas_qkv 8 none false default "$PALLAS,$QKV"
  run_mfu b8u_none_pallas_qkv_join_gemmv2 8 none false gemmv2 "$PALLAS,$QKV,$JOIN"
  run_mfu b8u_none_pallas 8 none false default "$PALLAS"
  run_mfu b8u_none_qkv 8 none false default "$QKV"
  run_mfu b8u_none_cublas_qkv 8 none false cublas "$QKV"
  big_memory || run_profile b8u_none_profile 8 none false
  run_mfu b16u_none_pallas_qkv 16 none false default "$PALLAS,$QKV"
  run_mfu b8u_none_cublas 8 none false cublas
  run_b16_if_it_can_fit b16u_none_default
  run_mfu b8u_none_normvjp 8 none false default --config.model.norm_backward=saved_rsqrt
  run_mfu b8u_none_gather 8 none false default --config.model.embedding_lookup=gather
  if [ "$SMOKE" = 1 ]; then
    run_mfu b8_smc_scan_tuned 8 save_matmuls true tuned  # the tuned flag set and scanned layers, exercised
  else
    run_mfu b4u_none_default 4 none false default
    run_mfu b8u_smc_default 8 save_matmuls false default
    run_hf eager 4
  fi
fi
print_table
