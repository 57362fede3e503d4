"""The config of `taopd diagnose` (`DiagnoseConfig`; `configs/diagnose.yaml` mirrors it key for key) and what its
protocols measure. Every range and cross-key rule is checked here, before any model is loaded."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any, Literal

from diagnostics.core.config import (
    check,
    check_applies,
    check_at_least,
    check_device,
    check_run_keys,
    check_temperature,
    config_to_dict,
)
from diagnostics.core.rundir import config_hash
from diagnostics.generation.backends import list_backends
from diagnostics.lm.precision import check_mixed_precision
from diagnostics.losses import list_losses
from diagnostics.signals import list_scores

PROTOCOL_MEANING = {
    "single-step": "the gain at a token from one update on that token's own loss (fixed context, held-out "
                   "base-student rollouts)",
    "paper": "the gain at a token after full-token OPD trained on all tokens: latest checkpoint vs the base "
             "student, re-scored on the OPD run's own first rollouts (the paper's protocol)",
}


# Keys left out of the run hash and config.json while at these defaults: runs made before they existed keep
# their names and resume.
OMITTED_AT_DEFAULT = {"prompt_column": "prompt", "answer_column": "answer", "enable_thinking": None}


@dataclass
class DiagnoseConfig:
    """Config of `taopd diagnose`; `configs/diagnose.yaml` mirrors it key for key."""

    student: str = ""  # model dir or hub id; "" = the embedded testbed's student
    teacher: str = ""  # "" = the embedded testbed's teacher
    testbed_config: str = "configs/testbed.yaml"
    prompts: str = ""  # real models' prompts (.jsonl/.json/.parquet or hub id); "" = testbed held-out problems
    prompt_column: str = "prompt"  # real models: the prompt column, a name or dotted path (prompt.0.content)
    answer_column: str = "answer"  # real models: the answer column (e.g. reward_model.ground_truth, label)
    enable_thinking: bool | None = None  # real models: Qwen3's chat-template switch; None = the template's default
    n_sequences: int = 256  # B: responses in the bank (the paper: 300)
    max_response_tokens: int = 192  # L: responses are cut to this many tokens
    temperature: float = 1.0  # rollout sampling temperature (the paper's 1.0)
    top_p: float = 1.0
    max_new_tokens: int = 0  # 0 = the testbed's response length, or 256 for real models
    backend: str = "auto"  # "auto" or a registered backend (`diagnostics.generation.backends.list_backends`)
    mode: Literal["single-step", "checkpoint", "first-order"] = "single-step"
    protocol: Literal["single-step", "paper"] = "single-step"  # what the gain measures (PROTOCOL_MEANING)
    bank: str = ""  # parquet of responses (BANK_COLUMNS) to re-score instead of sampling fresh rollouts
    train: dict[str, Any] = field(default_factory=dict)  # protocol=paper: TrainConfig overrides of its OPD run
    loss: str = "reverse_kl"  # a registered loss (diagnostics.losses), at its first step
    optimizer: Literal["sgd", "adam"] = "sgd"
    lr: float = 1e-5  # small-step regime: first-order estimate and measured gain agree on the testbed
    k: int = 0  # top-K of the signals; 0 = the pair's default (testbed: its k; real models: 16)
    extra_k: list[int] = field(default_factory=list)  # more K values, columns suffixed _k{K}
    group_selectors: list[str] = field(
        default_factory=lambda: ["teachability", "incompatible", "kl", "entropy", "tip", "random", "prefix", "suffix",
                                 "teacher_entropy", "excess_loss", "topk_overlap", "iw_opd"]
    )  # a weight rule (iw_opd) runs at 1.0 beside full (engine.group_plan)
    group_ratios: list[float] = field(default_factory=lambda: [0.05])
    checkpoint: str = ""  # the trained student for mode=checkpoint
    method: Literal["auto", "vmap", "loop"] = "auto"  # single-step implementation
    memory_budget_gb: float = 2.0  # for the vmap method's stacked per-position gradients
    shard_sequences: int = 16  # sequences per resumable shard
    seed: int = 0
    device: str = "auto"
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"
    mixed_precision: str | bool = "auto"  # auto | no | bf16: float32 master weights (diagnostics.lm.precision)
    run_name: str = ""  # "" = derived from the config hash, so a rerun resumes the same run
    out_dir: str = "results/diagnose"
    n_boot: int = 1000  # cluster-bootstrap resamples for the summary

    def __post_init__(self) -> None:
        check_at_least(self, 1, "n_sequences", "max_response_tokens")
        check_temperature(self.temperature)
        backends = ["auto", *list_backends()]
        check(self.backend in backends, "backend", f"must be one of {backends}, got {self.backend!r}")
        check(self.loss in list_losses(), "loss", f"unknown loss {self.loss!r}; registered: {', '.join(list_losses())}")
        check(0 < self.top_p <= 1, "top_p", f"must be in (0, 1], got {self.top_p}")
        check_at_least(self, 0, "max_new_tokens")
        # one small step: first-order regime; lr > 1 moves weights by O(1) per step (Adam) and gives absurd gains
        check(0 < self.lr <= 1, "lr", f"must be in (0, 1] (the diagnostic measures one small step), got {self.lr}")
        check_device(self.device)
        check(self.k >= 0, "k", f"must be >= 1 (or 0 for the pair's default), got {self.k}")
        check(all(k >= 1 for k in self.extra_k), "extra_k", f"every K must be >= 1, got {self.extra_k}")
        check(all(0 < r <= 1 for r in self.group_ratios), "group_ratios",
              f"each ratio must be in (0, 1], got {self.group_ratios}")
        unknown = [s for s in self.group_selectors if s not in list_scores()]
        check(not unknown, "group_selectors", f"unknown selector {unknown[:1]}; registered: {', '.join(list_scores())}")
        check_at_least(self, 1, "shard_sequences")
        check(self.memory_budget_gb > 0, "memory_budget_gb", f"must be > 0, got {self.memory_budget_gb}")
        check_at_least(self, 0, "n_boot")
        self.mixed_precision = check_mixed_precision(self.mixed_precision)
        check(bool(self.student) == bool(self.teacher), "teacher",
              "give both student and teacher, or neither (testbed)")
        check(self.mode != "checkpoint" or bool(self.checkpoint) or self.protocol == "paper", "checkpoint",
              "mode=checkpoint needs a checkpoint path (protocol=paper trains its own)")
        check(self.protocol == "paper" or not self.train, "train",
              f"only protocol=paper trains (got protocol={self.protocol}); remove the train overrides")
        for key, default in OMITTED_AT_DEFAULT.items():  # the testbed's problems have neither columns nor template
            check(bool(self.student) or getattr(self, key) == default, key,
                  "applies to real models' prompt files (student=, teacher=, prompts=), not the testbed's own problems")
        self._check_lists_and_applicability()

    def _check_lists_and_applicability(self) -> None:
        """No value twice in a list, a run name of one directory, no key the mode or source would ignore."""
        check_run_keys(self, unique=("extra_k", "group_selectors", "group_ratios"), seeds=("seed",))
        check(bool(self.group_ratios) or not self.group_selectors, "group_ratios", "is empty while group_selectors "
              "is set: no group rows would be computed (group_selectors=[] turns the group variant off)")
        check(self.mode != "first-order" or self.method != "loop", "method",
              "mode=first-order needs the per-position gradients of method=vmap (or auto); method=loop has none")
        banked = "bank= re-scores the bank file's responses; no rollouts are sampled"
        sampled = not self.bank or self.protocol == "paper"  # a bank's responses replace the sampled rollouts
        for key, applies, why in (
            ("prompts", bool(self.student), "the testbed's held-out problems are its own (for real models only)"),
            ("checkpoint", self.mode == "checkpoint", f"mode=checkpoint re-scores it; mode={self.mode} never does"),
            ("group_selectors", self.mode == "single-step" or not self.group_selectors,
             f"the group variant is a single-step construction (mode={self.mode}); set group_selectors=[]"),
            *((key, sampled, banked) for key in ("temperature", "top_p", "max_new_tokens", "backend", "prompts")),
        ):
            check_applies(self, key, applies, why)

    def fingerprint(self) -> dict[str, Any]:
        """The config as a plain dict without the OMITTED_AT_DEFAULT keys at their defaults."""
        data = json.loads(json.dumps(config_to_dict(self)))
        return {k: v for k, v in data.items() if not (k in OMITTED_AT_DEFAULT and v == OMITTED_AT_DEFAULT[k])}

    def run_id(self, models: dict[str, str] | None = None) -> str:
        """The run directory name: stable for a config and its resolved model paths, so a rerun
        resumes it (and a rebuilt testbed, which lives under a new cache key, starts a new run)."""
        if self.run_name:
            return self.run_name
        payload = {k: v for k, v in self.fingerprint().items() if k not in ("run_name", "out_dir", "n_boot")}
        payload["models"] = models or {}
        return f"{self.protocol if self.protocol == 'paper' else self.mode}-{config_hash(payload)}"


def protocol_meaning(config: DiagnoseConfig) -> str:
    """What the run's gain measures, for manifest.json and the summary."""
    if config.mode == "checkpoint" and config.protocol == "single-step":
        return "the gain at a token between the base student and the given checkpoint (fixed context)"
    return PROTOCOL_MEANING[config.protocol]
