"""TRL cross-check of the project's full-token OPD arm (issue 11): the same budget through a library.

The selector comparison through TRL is `taopd train engine=trl` (opd/trl_recipe.py, with the project's
selection and losses inside TRL); this script keeps plain, unmodified `DistillationTrainer` beside the
project's trainer, as an outside reference for the reverse-KL arm.

On one testbed pair and one budget (prompts, steps, rollouts per step, max new tokens, temperature, lr)
this trains, for each seed:

  trl      TRL's `DistillationTrainer` (trl 1.16, `beta=1`: per completion token the reverse KL
           KL(pS || pT) over the full vocabulary, on the student's own samples, normalised by the
           batch's completion-token count); the on-policy trainer of the stable API. (`GKDTrainer`
           with `lmbda=1, beta=1` computes the same loss, but lives in `trl.experimental` in 1.x.)
  project  the project's trainer (`opd.engines.run_training`, `selectors=[full]`) with `reverse_kl`
           and with the configured loss (`--loss`, default the train config's `loss`),

then prints the held-out greedy exact match of each side by side (same held-out problems as the
trainer's evaluation: `eval_problems` of the testbed's split 0, `diagnostics.accuracy`), with the
base student's accuracy measured both ways as a consistency check, and writes the table to
`<out>/crosscheck.json` and `.md`. Project runs are cached by config hash under `<out>/project/`
(a rerun with the same settings reuses finished arms).

Setting mapping (project `TrainConfig` -> TRL `DistillationConfig`; same value unless noted):
  training_texts(seed)           dataset "prompt" column in stream order, `shuffle_dataset=False`
                                 (each prompt repeated `samples_per_prompt` times: TRL samples n=1)
  batch_size x samples_per_prompt  per_device_train_batch_size (gradient_accumulation_steps=1)
  steps                          max_steps (one fresh on-policy batch per optimizer step, both sides)
  max_new_tokens (testbed's)     max_completion_length; completion mask up to and including EOS
                                 (the project's `valid`: cut after the first stop token, EOS kept)
  temperature, top_p             temperature, top_p, top_k=0 (no top-k truncation, both sides). TRL
                                 also divides the logits in the LOSS by the temperature; the
                                 project's loss uses raw logits: identical at T = 1 only
  loss reverse_kl, kept_global   beta=1.0 (reverse KL), loss sum / global completion-token count
  optimizer adamw, betas         optim="adamw_torch", adam_beta1/2 (eps 1e-8 both)
  lr (constant)                  learning_rate, lr_scheduler_type="constant", warmup_steps=0
                                 (TRL's defaults: linear decay to 0 and lr 1e-6)
  weight_decay                   weight_decay; TRL (transformers) exempts biases and norm weights
                                 from it, the project decays every parameter (negligible here)
  max_grad_norm 0 = no clipping  max_grad_norm=0 (TRL's default: 1.0)
  dtype float32 on CPU           bf16=False (TRL's default: bf16=True), gradient_checkpointing=False
                                 (TRL's default: True; it only trades memory for time)
  padded LM-head rows dropped    both models' embeddings and LM heads truncated to the tokenizer's
                                 V rows (TRL requires equal vocab sizes; on ids < V the models are
                                 unchanged, checked), so both losses run over the same V tokens
  prompt padding                 TRL left-pads prompts without position ids; Qwen2's rotary
                                 embeddings are relative, so a uniform shift changes nothing
Differences that remain: random streams (sampling seeds), and the weight-decay groups above.

Budget: per seed, one TRL arm plus one project arm per loss (two unless --loss reverse_kl), each
about one full arm of `make train-taopd` (their training times are equal within ~10% here), plus a
greedy evaluation of the held-out problems per arm. If `make train-taopd` fits its 30 minutes with
6 selectors x 3 seeds (<= 100 s per arm), 3 seeds here take <= 3 x 3 x 100 s ~ 15 minutes.
Measured on the shared 2-core machine: small testbed (configs/testbed_small.yaml, train_quick, 20
steps x 8 rollouts, 2 seeds) 32 s in all; a 4-word sort pair with 100 steps x 32 rollouts, 3 seeds
and both project losses 73 s (5 s of training per arm). Single-threaded (`torch.set_num_threads(1)`:
much faster for tiny models here).

Usage: python benchmarks/trl_crosscheck.py --testbed-config configs/testbed.yaml \
           --train-config configs/train.yaml --steps 100 --lr 3e-4 --seeds 0 1 2 --loss sampled_pg
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from dataclasses import dataclass, replace
from pathlib import Path

os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")  # TRL pings the Hub at trainer init otherwise
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
import torch  # noqa: E402

from diagnostics.accuracy import exact_match_accuracy  # noqa: E402
from diagnostics.core.config import load_config  # noqa: E402
from diagnostics.lm.models import check_pair, load_model  # noqa: E402
from diagnostics.pair import resolve_pair  # noqa: E402
from opd.config import TrainConfig  # noqa: E402
from opd.engines import run_training  # noqa: E402
from opd.integrations.trl import cut_vocab, distillation_config  # noqa: E402
from opd.trainer import EVAL_SPLIT_SEED, heldout, training_texts  # noqa: E402


@dataclass
class ArmResult:
    """One trained student: which engine and loss, its seed, held-out accuracy and loss trace."""

    engine: str  # "trl" | "project"
    loss: str
    seed: int
    acc_before: float
    acc_after: float
    loss_first: float  # mean training loss over the first 10% of steps
    loss_last: float  # ... and the last 10%
    seconds: float  # training wall time of the arm (steps only: no evaluation, no setup)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--testbed-config", default="configs/testbed.yaml")
    p.add_argument("--train-config", default="configs/train.yaml")
    p.add_argument("--steps", type=int, default=None, help="optimizer steps (default: the train config's)")
    p.add_argument("--lr", type=float, default=None, help="learning rate (default: the train config's)")
    p.add_argument("--seeds", type=int, nargs="+", default=None, help="seeds (default: the train config's)")
    p.add_argument("--loss", default=None, help="the project's configured loss, run beside reverse_kl "
                                               "(default: the train config's)")
    p.add_argument("--out", default="results/trl_crosscheck", help="output directory")
    return p.parse_args(argv)


def base_config(args: argparse.Namespace) -> TrainConfig:
    """The train config with the command's overrides, the full arm only, evaluation at the end only."""
    overrides = [f"testbed_config={args.testbed_config}", "selectors=[full]", "checkpoint_every=0",
                 "save_students=false", "progress=false", "run_name=", f"out_dir={Path(args.out) / 'project'}"]
    if args.steps is not None:
        overrides += [f"steps={args.steps}"]
    if args.lr is not None:
        overrides += [f"lr={args.lr}"]
    if args.seeds is not None:
        overrides += [f"seeds={list(args.seeds)}"]
    if args.loss is not None:
        overrides += [f"loss={args.loss}"]
    config = load_config(TrainConfig, args.train_config, overrides)
    return replace(config, eval_every=config.steps)


def _loss_ends(losses: list[float]) -> tuple[float, float]:
    """Mean loss over the first and the last 10% of steps (at least one step each)."""
    n = max(1, len(losses) // 10)
    return float(np.mean(losses[:n])), float(np.mean(losses[-n:]))


# ------------------------------------------------------------------------------------------ project


def project_arms(config: TrainConfig) -> list[ArmResult]:
    """The project's full arm for every seed (a finished run with the same config is reused)."""
    run_dir = Path(config.out_dir) / config.run_id()
    run_training(config, resume=(run_dir / "config.json").is_file())
    metrics = pd.read_parquet(run_dir / "metrics.parquet")
    out = []
    for seed in config.seeds:
        rows = metrics[metrics["seed"] == seed].sort_values("step")
        trained = rows[rows["step"] > 0]
        first, last = _loss_ends(trained["loss"].tolist())
        out.append(ArmResult("project", config.loss, seed, float(rows["accuracy"].iloc[0]),
                             float(rows["accuracy"].iloc[-1]), first, last, float(rows["wall_time_s"].iloc[-1])))
    return out


# ------------------------------------------------------------------------------------------ TRL


def trl_arm(config: TrainConfig, seed: int, pair, tokenizer, vocab_size: int, eval_problems, out: Path) -> ArmResult:
    """TRL's DistillationTrainer with the project's settings (see the mapping in the module docstring)."""
    from datasets import Dataset
    from transformers import AutoTokenizer, PrinterCallback
    from trl import DistillationTrainer  # imported (warnings filtered) by opd.integrations.trl

    cpu = torch.device("cpu")  # padded LM-head rows dropped from both (TRL needs equal vocab sizes)
    student = cut_vocab(load_model(pair.student_path, cpu, torch.float32), vocab_size)
    teacher = cut_vocab(load_model(pair.teacher_path, cpu, torch.float32), vocab_size).eval()
    before = exact_match_accuracy(student, tokenizer, eval_problems, max_new_tokens=pair.max_new_tokens)
    texts = training_texts(config, pair.testbed, seed, tokenizer)
    prompts = [t for t in texts for _ in range(config.samples_per_prompt)]  # TRL samples one per prompt
    # the TRL side is always reverse KL (beta = 1), whatever the project's configured loss
    args = distillation_config(replace(config, loss="reverse_kl", normalization="kept_global"),
                               max_new_tokens=pair.max_new_tokens, seed=seed, output_dir=str(out / f"trl-{seed}"),
                               use_cpu=True, logging_steps=1, disable_tqdm=True, dataloader_num_workers=0)
    trl_tokenizer = AutoTokenizer.from_pretrained(pair.student_path, padding_side="left")
    trainer = DistillationTrainer(model=student, teacher_model=teacher, args=args, processing_class=trl_tokenizer,
                                  train_dataset=Dataset.from_dict({"prompt": prompts}))
    trainer.remove_callback(PrinterCallback)  # one printed dict per step otherwise
    started = time.perf_counter()
    trainer.train()
    seconds = time.perf_counter() - started
    after = exact_match_accuracy(trainer.model, tokenizer, eval_problems, max_new_tokens=pair.max_new_tokens)
    first, last = _loss_ends([row["loss"] for row in trainer.state.log_history if "loss" in row])
    return ArmResult("trl", "reverse_kl", seed, before, after, first, last, seconds)


def check_prompt_ids(texts: list[str], tokenizer) -> None:
    """TRL encodes prompts with the tokenizer's defaults; the project without special tokens."""
    from diagnostics.generation.hf import encode_prompts

    trl_ids = tokenizer(text=texts)["input_ids"]
    if trl_ids != encode_prompts(tokenizer, texts):
        raise RuntimeError("TRL and the project encode the training prompts differently (special tokens?)")


# ------------------------------------------------------------------------------------------ report


def summarize(results: list[ArmResult]) -> pd.DataFrame:
    """One row per (engine, loss): accuracy before/after (mean, sd over seeds), loss trace, time."""
    frame = pd.DataFrame([r.__dict__ for r in results])
    rows = []
    for (engine, loss), g in frame.groupby(["engine", "loss"], sort=False):
        gain = g["acc_after"] - g["acc_before"]
        rows.append({
            "engine": engine, "loss": loss, "seeds": len(g),
            "acc_before": g["acc_before"].mean(), "acc_after": g["acc_after"].mean(),
            "acc_after_sd": g["acc_after"].std(ddof=1) if len(g) > 1 else math.nan,
            "gain": gain.mean(), "per_seed_after": " ".join(f"{a:.3f}" for a in g["acc_after"]),
            "loss_first": g["loss_first"].mean(), "loss_last": g["loss_last"].mean(),
            "train_s": g["seconds"].mean(),
        })
    return pd.DataFrame(rows)


def render(table: pd.DataFrame, config: TrainConfig, max_new_tokens: int) -> str:
    head = (f"TRL cross-check: {config.testbed_config}, {config.steps} steps x "
            f"{config.batch_size * config.samples_per_prompt} rollouts, max_new_tokens {max_new_tokens}, "
            f"T {config.temperature}, lr {config.lr:g}, seeds {config.seeds}, "
            f"{config.eval_problems} held-out problems (greedy exact match)")
    cells = [[f"{v:.4f}" if isinstance(v, float) else str(v) for v in row] for row in table.itertuples(index=False)]
    lines = ["| " + " | ".join(table.columns) + " |", "|" + "---|" * len(table.columns)]
    lines += ["| " + " | ".join(row) + " |" for row in cells]
    return head + "\n\n" + "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    torch.set_num_threads(1)
    import transformers

    transformers.utils.logging.disable_progress_bar()  # a "Loading weights" bar per model load
    config = base_config(args)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    pair = resolve_pair(config.student, config.teacher, testbed_config=config.testbed_config, k=config.k,
                        max_new_tokens=config.max_new_tokens, progress=False)
    tokenizer, vocab_size = check_pair(pair.student_path, pair.teacher_path)
    eval_problems = heldout(config, pair, config.eval_problems, EVAL_SPLIT_SEED, tokenizer)
    check_prompt_ids(training_texts(config, pair.testbed, config.seeds[0], tokenizer)[:64], tokenizer)
    results = [trl_arm(config, seed, pair, tokenizer, vocab_size, eval_problems, out) for seed in config.seeds]
    for loss in dict.fromkeys(["reverse_kl", config.loss]):
        results += project_arms(replace(config, loss=loss))  # __post_init__ validates
    table = summarize(results)
    text = render(table, config, pair.max_new_tokens)
    print(text)
    (out / "crosscheck.md").write_text(text)
    (out / "crosscheck.json").write_text(json.dumps([r.__dict__ for r in results], indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
