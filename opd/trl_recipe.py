"""`taopd train engine=trl`: the selector comparison of `opd.trainer`, each arm trained by TRL.

Same run as the project's trainer (`opd.engines.run_training`), with the same run directory, setup and
outputs: `setup_run` (pair, held-out problems, common bank, base evaluation, every seed's prompt stream),
one arm per (selector, ratio, seed) through `opd.trainer.run_arms`, `finish_arm` (live gain on the common
bank, the final student, arms/<arm>/metrics.parquet, result.json), `collect` and `build_manifest` (metrics.parquet,
live_gain.parquet, manifest.json); `taopd train` then writes the same comparison.parquet/.md through
`analysis.training`. Only the training loop of an arm differs: `SelectiveDistillationTrainer`
(`opd.integrations.trl`, a subclass of `trl.DistillationTrainer`) generates the rollouts, computes the
signals, selects with the registry over the global batch and applies the configured loss and
normalisation; TRL runs the optimizer, checkpoints (every `checkpoint_every` steps, under
arms/<arm>/trl/, resumed with `--resume`), and logs through `report_to` (`TrainConfig.report_to`).

What maps how (`opd.integrations.trl.distillation_config`): the arm's prompt stream in order (each prompt repeated
`samples_per_prompt` times), steps, rollouts per step, completion length, temperature, loss and normalisation, AdamW
(betas, weight decay; TRL exempts biases and norm weights from the decay), `optimizer: paper` (the release's
Megatron Adam) as the same adamw_torch with the preset's betas, weight decay and clipping and TRL's eps 1e-8 (HF's
decay split, biases and `*norm*` weights, is Megatron's biases and 1-D parameters on Qwen-family models:
tests/opd/test_opd_trl_recipe.py), constant lr, clipping, float32 on CPU (on CUDA with `mixed_precision`: float32
student weights and TRL's bf16 autocast, as the own engine). `trl_args` adds or overrides DistillationConfig
settings (vLLM generation: `{use_vllm: true, vllm_mode: colocate}`). Both models' embedding and LM-head rows past
the tokenizer's vocabulary are dropped when their row counts differ (`cut_vocab`: TRL needs equal vocab sizes; the
logits on real ids are unchanged); with equal row counts (a Qwen family pair) the models stay as saved, so TRL's
vLLM weight sync sees the checkpoint's shapes, and the signals and the registry losses read the first V columns
(`signal_vocab_size`), as the own engine; TRL's JSD kernel (reverse_kl / forward_kl with kept_global) then spans the
padding rows too (probability ~0 in trained models).
Streams differ from the project's: TRL samples with `args.seed` = the arm's seed, and the random
selector's scores use `SelectiveDistillationTrainer._selection_seed`.

Evaluation: greedy held-out exact match and KL(pT||pS) on the common bank every `eval_every` steps and
after the last (`opd.monitor.evaluate`, as the own engine), recorded in TRL's log history (so a
resumed arm keeps them). Per-step metrics rows: TRL's loss, the global kept and valid token counts,
cumulative training time (generation to optimizer step, without evaluation), peak memory of the step.

Not supported here (clear errors): `micro_batch_size` (TRL's micro-batching is gradient accumulation,
and the registry losses count kept positions per generation batch), optimizers other than adamw and paper,
`rollout_backend` other than hf (TRL's own vLLM path is `trl_args`).
`save_rollouts` keeps every step's completions as the own engine does (`SelectiveDistillationTrainer.save_rollouts`),
so `taopd diagnose protocol=paper train.engine=trl` banks the TRL run's rollouts.
"""

from __future__ import annotations

import math
import shutil
import sys
import time
from importlib import metadata
from pathlib import Path
from typing import Any

import torch
from transformers import AutoTokenizer, PrinterCallback, TrainerCallback

from diagnostics.core.nonfinite import write_nonfinite_record
from diagnostics.generation.hf import encode_prompts
from diagnostics.lm.models import load_model
from opd.config import Arm, TrainConfig
from opd.integrations.trl import SelectiveDistillationTrainer, cut_vocab, distillation_config
from opd.memory import peak_mb, reset_peak
from opd.monitor import evaluate
from opd.nonfinite import find_blowup, quantity_of
from opd.step import NonFiniteError
from opd.trainer import RunContext, finish_arm, metric_row

TRL_TRAINER = "opd.integrations.trl.SelectiveDistillationTrainer (a trl.DistillationTrainer subclass)"


def check_trl_config(config: TrainConfig) -> None:
    """What this recipe cannot run, named by key."""
    if config.micro_batch_size:
        raise ValueError(f"micro_batch_size: engine=trl runs the whole local batch per step (TRL's micro-batching is "
                         f"gradient accumulation, not supported with the registry losses); got "
                         f"{config.micro_batch_size}, use 0")
    if config.optimizer not in ("adamw", "paper"):
        raise ValueError(f"optimizer: engine=trl runs AdamW (TRL's adamw_torch): adamw or paper, got "
                         f"{config.optimizer!r}")
    if config.rollout_backend != "hf":
        raise ValueError(f"rollout_backend: engine=trl generates through TRL; for vLLM set trl_args "
                         f"{{use_vllm: true, vllm_mode: colocate | server}} (README), got {config.rollout_backend!r}")


class ArmCallback(TrainerCallback):
    """Per step: peak memory and time; every `eval_every` steps and after the last, the project's evaluation;
    appended to TRL's log history (saved in its checkpoints), the evaluation also to the step's TRL metrics
    (heldout/accuracy, heldout/kl_to_teacher: logged through report_to). Stops on a non-finite loss."""

    def __init__(self, ctx: RunContext, teacher: torch.nn.Module):
        self.ctx, self.teacher, self.trainer, self.started = ctx, teacher, None, time.perf_counter()

    def on_step_begin(self, args, state, control, **kwargs):
        reset_peak(self.ctx.world.device)
        self.started = time.perf_counter()

    def on_step_end(self, args, state, control, **kwargs):
        ctx, step = self.ctx, state.global_step
        entry: dict[str, Any] = {"step": step, "peak_mem_mb": peak_mb(ctx.world.device),
                                 "step_seconds": time.perf_counter() - self.started}  # generation to update
        if step % ctx.config.eval_every == 0 or step == state.max_steps:
            student = self.trainer.accelerator.unwrap_model(self.trainer.model)
            result = evaluate(student, self.teacher, ctx.tokenizer, ctx.eval_problems, ctx.bank, ctx.vocab_size,
                              ctx.pair.max_new_tokens, ctx.world)
            student.train()
            entry.update(result)
            for key, value in result.items():  # into this step's TRL log, so report_to (trackio, wandb) shows it
                self.trainer._metrics["train"][f"heldout/{key}"].append(value)
        state.log_history.append(entry)

    def on_log(self, args, state, control, logs=None, **kwargs):
        loss = (logs or {}).get("loss")
        if loss is not None and not math.isfinite(loss):
            raise NonFiniteError(f"TRL's training loss non-finite at step {state.global_step}: {loss}")


def arm_rows(arm: Arm, history: list[dict], base_eval: dict[str, float]) -> list[dict]:
    """metrics.parquet rows of an arm (the own engine's columns) from TRL's log history."""
    rows = {0: metric_row(arm, 0, **{k: base_eval[k] for k in ("accuracy", "kl_to_teacher", "peak_mem_mb")})}
    seconds = 0.0
    for entry in sorted(history, key=lambda e: e["step"]):  # stable: a step's entries keep their order
        step = int(entry["step"])
        row = rows.setdefault(step, metric_row(arm, step))
        if "selection/kept_tokens" in entry:  # TRL's training log of the step (logging_steps=1)
            row.update(loss=float(entry["loss"]), kept_tokens=round(entry["selection/kept_tokens"]),
                       valid_tokens=round(entry["selection/valid_tokens"]))
        if "step_seconds" in entry:  # ArmCallback's: generation, signals, selection, update (no evaluation)
            seconds += float(entry["step_seconds"])
            row["wall_time_s"] = seconds
        row.update({k: float(entry[k]) for k in ("accuracy", "kl_to_teacher", "peak_mem_mb") if k in entry})
    return [rows[step] for step in sorted(rows)]


def make_trainer(ctx: RunContext, arm: Arm, arm_dir: Path, student, teacher) -> SelectiveDistillationTrainer:
    """The arm's TRL trainer: settings mapped from the config, its prompt stream, its selector."""
    from datasets import Dataset

    config, world = ctx.config, ctx.world
    texts = ctx.train_texts[arm.seed]
    tokenizer = AutoTokenizer.from_pretrained(ctx.pair.student_path, padding_side="left")
    if tokenizer(text=texts[:64])["input_ids"] != encode_prompts(ctx.tokenizer, texts[:64]):
        raise RuntimeError("TRL and the project encode the training prompts differently (special tokens?)")
    prompts = [text for text in texts for _ in range(config.samples_per_prompt)]  # TRL samples one per prompt
    save = dict(save_strategy="steps", save_steps=config.checkpoint_every) if config.checkpoint_every else {}
    args = distillation_config(
        config, max_new_tokens=ctx.pair.max_new_tokens, seed=arm.seed, output_dir=str(arm_dir / "trl"),
        processes=world.size, use_cpu=world.device.type == "cpu", bf16=ctx.precision.compute == torch.bfloat16,
        logging_steps=1, disable_tqdm=not (config.progress and world.is_main and sys.stderr.isatty()),  # quiet logs
        report_to=config.report_to, project="taopd", run_name=f"{config.run_id()}/{arm.name}",
        dataloader_num_workers=0, ddp_find_unused_parameters=False,
        **{**save, **{k: v for k, v in config.trl_args.items() if k != "teacher_model_init_kwargs"}})  # load_teacher
    trainer = SelectiveDistillationTrainer(
        model=student, teacher_model=teacher, args=args, processing_class=tokenizer,
        train_dataset=Dataset.from_dict({"prompt": prompts}), selector=arm.selector, ratio=arm.ratio,
        min_per_sequence=config.min_per_sequence, k=ctx.pair.k, loss=config.loss, signal_vocab_size=ctx.vocab_size,
        selection_options=config.selection_options(),
        normalization=config.normalization, clip_low=config.clip_low, clip_high=config.clip_high,
        rollout_dir=arm_dir / "rollouts" if config.save_rollouts else None,
        samples_per_prompt=config.samples_per_prompt)
    trainer.remove_callback(PrinterCallback)  # one printed dict per step otherwise
    return trainer


def load_teacher(ctx: RunContext) -> torch.nn.Module:
    """The teacher on this process's device, or placed by `trl_args.teacher_model_init_kwargs` (from_pretrained
    keywords, e.g. device_map={model: cuda:1, lm_head: cuda:0}: its backbone on its own GPU; TRL needs both LM
    heads on one device and moves the teacher's hidden states to its head)."""
    placement = ctx.config.trl_args.get("teacher_model_init_kwargs")
    if not placement:
        return load_model(ctx.pair.teacher_path, ctx.world.device, ctx.dtype).eval()
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(ctx.pair.teacher_path, **{"dtype": ctx.dtype, **placement}).eval()


def stop_trl_arm(err: BaseException, ctx: RunContext, arm: Arm, arm_dir: Path, trainer) -> None:
    """A step that raised: a NonFiniteError, or an error a blow-up explains (`opd.nonfinite.find_blowup`), writes
    arms/<arm>/nonfinite.json (arm, step, quantity, message, TRL's last checkpoint: the last good state) and
    raises NonFiniteError naming arm, step and quantity; any other error is re-raised unchanged."""
    student = trainer.accelerator.unwrap_model(trainer.model)
    reason = str(err) if isinstance(err, NonFiniteError) else find_blowup(student, ctx.bank, err)
    if reason is None:
        raise err
    step = int(trainer.state.global_step) + 1  # the step that failed
    quantity = quantity_of(reason)
    checkpoints = sorted((arm_dir / "trl").glob("checkpoint-*"), key=lambda p: int(p.name.split("-")[-1]))
    last_good = str(checkpoints[-1]) if checkpoints else None
    if ctx.world.is_main:
        write_nonfinite_record(arm_dir, recipe="train", engine="trl", arm=arm.name, step=step, quantity=quantity,
                               message=reason, checkpoint=last_good)
    raise NonFiniteError(f"{arm.name}: step {step}: {reason}; last good state: {last_good or 'the base student'}; "
                         f"nonfinite.json in {arm_dir}") from None


def train_arm_trl(ctx: RunContext, arm: Arm) -> None:
    """Train one arm through TRL (from its last TRL checkpoint with `resume`); writes arms/<arm>/ when done."""
    arm_dir = ctx.run_dir / "arms" / arm.name
    if (arm_dir / "result.json").is_file():
        return
    device = ctx.world.device  # student: float32 master weights under mixed precision (TRL's bf16 autocast)
    student = load_model(ctx.pair.student_path, device, ctx.precision.master).train()
    teacher = load_teacher(ctx)
    rows = {m.get_output_embeddings().weight.shape[0] for m in (student, teacher)}
    if len(rows) > 1:  # TRL needs equal vocab sizes: drop the padding rows of both (see the module docstring)
        student, teacher = (cut_vocab(m, ctx.vocab_size) for m in (student, teacher))
    for p in teacher.parameters():
        p.requires_grad_(False)
    trainer = make_trainer(ctx, arm, arm_dir, student, teacher)
    callback = ArmCallback(ctx, teacher)
    callback.trainer = trainer
    trainer.add_callback(callback)
    checkpoints = sorted((arm_dir / "trl").glob("checkpoint-*"), key=lambda p: int(p.name.split("-")[-1]))
    if checkpoints:
        ctx.logger.info(f"[{arm.name}] resuming TRL from {checkpoints[-1]}")
    try:
        trainer.train(resume_from_checkpoint=str(checkpoints[-1]) if checkpoints else None)
    except (RuntimeError, ValueError) as err:  # a blow-up: nonfinite.json as the own engine writes (opd.nonfinite)
        stop_trl_arm(err, ctx, arm, arm_dir, trainer)
    trained = trainer.accelerator.unwrap_model(trainer.model)
    finish_arm(ctx, arm, arm_dir, trained, arm_rows(arm, trainer.state.log_history, ctx.base_eval))
    if ctx.world.is_main:
        shutil.rmtree(arm_dir / "trl", ignore_errors=True)  # TRL's checkpoints, as finish_arm removes the own
    ctx.world.barrier()


def trl_manifest(config: TrainConfig) -> dict[str, Any]:
    """What manifest.json adds for a run trained by TRL."""
    return dict(engine="trl", trl_trainer=TRL_TRAINER, trl_version=metadata.version("trl"),
                rollout_backend="trl (transformers generate; vLLM with use_vllm)",
                old_logprobs="student log-probs of the trainer's signals pass (no grad), before the update",
                report_to=config.report_to)
