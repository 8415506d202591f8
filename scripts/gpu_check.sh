#!/usr/bin/env bash
# One call on the GPU machine: GPU tests, `attnlab info`, and the attention benchmark against
# the anchors (cuDNN and XLA through jax.nn, tokamax when its wheels are carried).
#
# Run from the repo root there (the device tool's working tree):
#   bash scripts/gpu_check.sh [steps]         # carry [".whl"] as well to time tokamax
# steps: any of tests, info, bench, decode, memory, lightning, model, mosaic, mosaic-sweep,
# mosaic-cases, star, mla-tests (the gpu-marked MLA decode tests), ncu (Nsight Compute
# profiles of the MLA decode and the causal forward, scripts/ncu_kernels.py),
# mla, sp, lasp, lasp1, scaling, and full-<experiment> (experiments/<experiment>.py --preset
# full, its JSON and PNG into $OUT; one 10-minute call each)
# (default: the first five; the others are the later issues' benchmarks and are asked for by
# name; lasp1 runs on one GPU; scaling needs several GPUs
# and a call of its own: `bash scripts/gpu_check.sh scaling` on nvidia-h200-x8 with
# timeout_s=600, see attnlab/bench/scaling.py). Each step fits
# the budget given below; split them over two calls when all do not fit one 10-minute call.
# The package is not installed on that machine (JAX 0.11.2, Python 3.12, no network), so it
# runs from the tree through PYTHONPATH. Results land in $OUT (the tool's output folder).
# Budget per step: tests 280 s, info 60 s, bench 310 s, decode 120 s, memory 90 s; each step has
# its own timeout so a slow one cannot eat the next one's share, and no step's failure stops
# the others.
set -u
cd "$(dirname "$0")/.."
OUT=${OUT:-$PWD/.device_out}
mkdir -p "$OUT"
export PYTHONPATH=$PWD
export PYTHONUNBUFFERED=1
export NCCL_NVLS_ENABLE=0  # the machine's rule: NVLink multicast stays off
status=0

# Optional tokamax (BENCHMARKS.md): wheels carried in .whl/, installed off-line into /tmp/site.
if compgen -G ".whl/*.whl" > /dev/null; then
  if python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
      --target /tmp/site .whl/*.whl; then
    # tokamax imports xprof's kernel-stats tool at import time but only uses it to profile.
    mkdir -p /tmp/site/xprof/cli/tools
    touch /tmp/site/xprof/__init__.py /tmp/site/xprof/cli/__init__.py \
      /tmp/site/xprof/cli/tools/__init__.py
    cat > /tmp/site/xprof/cli/tools/get_kernel_stats_tool.py <<'PY'
"""Stub so that tokamax imports without xprof; profiling through it is not available."""
def compute_kernel_stats(*args, **kwargs):
    raise NotImplementedError("xprof is not installed (stub for tokamax's import)")
PY
    export PYTHONPATH=$PWD:/tmp/site
  else
    echo "gpu_check: installing .whl/*.whl failed; going on without tokamax" >&2
  fi
fi

echo "== devices"
nvidia-smi -L
python3 -c 'import jax, jaxlib; print("jax", jax.__version__, "jaxlib", jaxlib.__version__, jax.devices())'
python3 -c 'import tokamax; print("tokamax", getattr(tokamax, "__version__", "?"))' 2>/dev/null \
  || echo "tokamax: not importable (carry .whl to time it)"

STEPS=${*:-tests info bench decode memory}
# Per-step time limits for the later benchmarks (seconds), overridable from the environment.
LIGHTNING_TIMEOUT=${LIGHTNING_TIMEOUT:-300}
MODEL_TIMEOUT=${MODEL_TIMEOUT:-300}
SP_TIMEOUT=${SP_TIMEOUT:-500}
SCALING_TIMEOUT=${SCALING_TIMEOUT:-570}
want() { [[ " $STEPS " == *" $1 "* ]]; }
# step LOG LIMIT CMD...: CMD under a time limit of LIMIT seconds, its output also in
# $OUT/LOG.log; a failure (or the limit) marks the whole run failed, and the next step runs.
step() {
  local log=$1 limit=$2
  shift 2
  timeout "$limit" "$@" 2>&1 | tee "$OUT/$log.log"
  [ "${PIPESTATUS[0]}" -eq 0 ] || status=1
}

if want tests; then
echo "== GPU tests"
set -o pipefail
# GPU_TEST_WORKERS > 1 runs the tests in that many processes (pytest-xdist), each allocating
# GPU memory as it needs it instead of preallocating 75 % of the card.
workers=()
if [ "${GPU_TEST_WORKERS:-1}" -gt 1 ]; then
  export XLA_PYTHON_CLIENT_PREALLOCATE=false
  workers=(-n "$GPU_TEST_WORKERS")
fi
timeout ${GPU_TEST_TIMEOUT:-280} python3 -m pytest -m gpu -q -p no:cacheprovider "${workers[@]}" \
  tests 2>&1 | tee "$OUT/gpu_tests.log"
rc=$?
set +o pipefail
echo "gpu tests exit status: $rc"
[ "$rc" -ne 0 ] && [ "$rc" -ne 5 ] && status=1  # 5: no test collected
fi

if want info; then
echo "== attnlab info"
timeout 60 python3 -m attnlab.cli info --json > "$OUT/info.json" || status=1
fi

if want bench; then
echo "== bench attention (H=16, D=128, B*S=32768, bf16; fwd both masks, fwd+bwd causal)"
# The bench rewrites its JSON after every (S, causal, pass) group, so a timeout keeps what ran.
step bench_attention 310 python3 -m attnlab.cli bench attention --shapes 2048,8192,32768 \
  --batch-tokens 32768 --heads 16 --head-dim 128 --dtype bfloat16 \
  --causal both --passes fwd,fwdbwd --bwd-causal-only --repeats 20 \
  --out "$OUT/bench_attention_h100.json"
fi

if want decode && [ -f attnlab/bench/decode.py ]; then
echo "== bench decode (T=1, GQA 8, bf16, KV 32K-128K)"
step bench_decode 120 python3 -m attnlab.bench.decode --out "$OUT/bench_decode_h100.json"
fi

if want memory; then
echo "== peak temp memory at 32K vs 64K (compiled, causal, bf16, H=16, D=128)"
timeout 90 python3 scripts/memory_check.py --lengths 32768,65536 \
  --out "$OUT/memory_h100.json" || status=1
fi

if want lightning && [ -f attnlab/bench/lightning.py ]; then
echo "== bench lightning (H=16, D=128, bf16, B*T=65536; fla chunk_lightning_attn when carried)"
step bench_lightning "$LIGHTNING_TIMEOUT" python3 -m attnlab.bench.lightning \
  --out "$OUT/bench_lightning.json"
fi

if want model && [ -f attnlab/bench/model.py ]; then
echo "== bench model (350M softmax at 4K; 7:1 lightning hybrid vs softmax at 32K)"
step bench_model "$MODEL_TIMEOUT" python3 -m attnlab.bench.model --out "$OUT/bench_model.json"
fi

if want mosaic; then
echo "== Mosaic GPU forward against cuDNN, tokamax and pallas_triton (H=16, D=128, B*S=32K, bf16)"
step bench_mosaic "${MOSAIC_TIMEOUT:-150}" python3 -m attnlab.cli bench attention \
  --shapes 8192,32768 --batch-tokens 32768 --heads 16 --head-dim 128 --dtype bfloat16 \
  --causal both --passes "${MOSAIC_PASSES:-fwd}" --bwd-causal-only --repeats 10 \
  --impls pallas_mosaic_gpu,pallas_triton --out "$OUT/bench_mosaic.json"
fi

if want mosaic-sweep; then
echo "== Mosaic GPU forward tiles (block_kv, compute warpgroups, pipeline depth) against cuDNN"
# MOSAIC_SWEEP_PASS=fwdbwd: causal forward+backward, the Triton against the Mosaic backward.
pass=${MOSAIC_SWEEP_PASS:-fwd}
step "mosaic_sweep_$pass" "${MOSAIC_SWEEP_TIMEOUT:-450}" python3 scripts/mosaic_sweep.py \
  --budget-s $((${MOSAIC_SWEEP_TIMEOUT:-450} - 60)) ${MOSAIC_SWEEP_MAX:+--max-candidates $MOSAIC_SWEEP_MAX} \
  --pass "$pass" --out "$OUT/mosaic_sweep_$pass.json"
fi

if want mosaic-cases; then
echo "== Mosaic GPU forward on GQA, a 4K window, segment ids and soft-cap against cuDNN and Triton"
step mosaic_cases "${MOSAIC_CASES_TIMEOUT:-240}" python3 scripts/mosaic_cases.py \
  --out "$OUT/mosaic_cases.json"
fi

if want star; then
echo "== Star Attention prefill (context phase) against full causal, 32K-128K, blocks 8K/16K"
step bench_star "${STAR_TIMEOUT:-120}" python3 -m attnlab.bench.star --out "$OUT/bench_star.json"
fi

if want mla-tests; then
echo "== MLA latent decode kernels compiled (gpu-marked tests)"
XLA_PYTHON_CLIENT_PREALLOCATE=false step mla_tests "${MLA_TESTS_TIMEOUT:-200}" python3 -m pytest \
  -m gpu -q -p no:cacheprovider tests/ops/test_mla_mosaic_gpu.py tests/ops/test_mla.py
fi

if want mla; then
echo "== MLA latent decode (B=32, N=128, d_c=512, d_R=64; MLA_SWEEP=1: the Triton config sweep,"
echo "   MLA_SWEEP=mosaic: the Mosaic GPU kernel's)"
sweep=()
[ "${MLA_SWEEP:-0}" = 1 ] && sweep=(--sweep --seq-lens "${MLA_SWEEP_LENS:-32768}")
[ "${MLA_SWEEP:-0}" = mosaic ] && sweep=(--sweep-mosaic --seq-lens "${MLA_SWEEP_LENS:-8192,32768}")
name=bench_mla; [ "${MLA_SWEEP:-0}" != 0 ] && name=bench_mla_sweep_${MLA_SWEEP/1/triton}
step "$name" "${MLA_TIMEOUT:-200}" python3 -m attnlab.bench.mla --repeats 10 "${sweep[@]}" \
  --out "$OUT/$name.json"
fi

if want ncu; then
echo "== Nsight Compute: the MLA latent decode alone at 8K and 32K; the causal forward at 8K"
echo "   (cuDNN, the Mosaic GPU kernel with 64- and 128-key tiles); one call each, warmed up"
sections=(--section SpeedOfLight --section Occupancy --section LaunchStats
          --section WarpStateStats --section MemoryWorkloadAnalysis)
ncu_one() {
  local name=$1
  shift
  timeout "${NCU_TIMEOUT:-120}" ncu --profile-from-start off "${sections[@]}" \
    python3 scripts/ncu_kernels.py "$@" > "$OUT/ncu_$name.txt" 2>&1 || status=1
  grep -E "^  [a-z_A-Z].*\(|Duration|DRAM Throughput|Compute \(SM\) Throughput" \
    "$OUT/ncu_$name.txt" | head -n 40
}
ncu_one mla_8k mla --seq-len 8192
ncu_one mla_32k mla --seq-len 32768
ncu_one attention_cudnn attention --impl cudnn
ncu_one attention_mosaic64 attention --approx-math
ncu_one attention_mosaic128 attention --approx-math --block-kv 128
fi

for s in $STEPS; do
  case $s in full-*)
    name=${s#full-}
    echo "== experiments/$name.py --preset full"
    step "${name}_full" "${FULL_TIMEOUT:-590}" python3 "experiments/$name.py" --preset full \
      --out "$OUT"
  esac
done

if want sp && [ -f attnlab/bench/sp.py ]; then
echo "== bench sequence parallelism (needs >= 2 GPUs)"
step bench_sp "$SP_TIMEOUT" python3 -m attnlab.bench.sp --out "$OUT/bench_sp.json"
fi

if want lasp; then
echo "== LASP / LASP-2 on 2 GPUs at 2T vs 1 GPU at T, with data_parallel and the per-block pieces"
step bench_lasp "${LASP_TIMEOUT:-240}" python3 -m attnlab.bench.lightning --lasp \
  --seq-lens 32768,65536 --repeats 5 --out "$OUT/bench_lasp.json"
fi

if want lasp1; then
echo "== LASP / LASP-2 on a one-device mesh (collectives are no-ops): the compute each adds per device"
step bench_lasp_1dev "${LASP_TIMEOUT:-240}" python3 -m attnlab.bench.lightning --lasp \
  --lasp-devices 1 --seq-lens 32768,65536 --repeats 10 --out "$OUT/bench_lasp_1dev.json"
fi

if want scaling && [ -f attnlab/bench/scaling.py ]; then
echo "== bench scaling (meshes 1, 2, 4, 8 and 2x4 of the visible GPUs; ring, zigzag, striped,"
echo "   Ulysses, LASP, LASP-2; budget SCALING_TIMEOUT - 30 s, JSON rewritten after every row)"
step bench_scaling "$SCALING_TIMEOUT" python3 -m attnlab.bench.scaling \
  --budget-s $((SCALING_TIMEOUT - 30)) --out "$OUT/bench_scaling.json" \
  --plot "$OUT/bench_scaling.png"
fi

echo "gpu_check: done (status $status)"
exit $status
