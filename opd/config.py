"""`TrainConfig`: the one config of `taopd train`; `configs/train.yaml` mirrors it key for key.

A run trains one student per arm, arm = (selector, ratio, seed): the `full` selector at ratio 1.0
(full-token OPD) and every other selector at every ratio in `ratios`, each for every seed in
`seeds`, all with the same prompts per seed, number of steps and rollouts. Range and cross-field
checks run in `__post_init__` and name the key; `diagnostics.config.load_config` adds the file.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Literal

from diagnostics.config import check, check_at_least, config_to_dict
from diagnostics.losses import list_losses
from diagnostics.run import config_hash
from diagnostics.signals import list_scores
from opd.normalization import NORMALIZATIONS

# Keys that do not change what a run computes: a resume may differ in them.
RESUME_IGNORED = ("progress",)


@dataclass
class TrainConfig:
    """Config of `taopd train` (TA-OPD and the baseline selectors); see configs/train.yaml."""

    # models and data
    student: str = ""  # model dir or hub id; "" = the embedded testbed's student
    teacher: str = ""  # "" = the embedded testbed's teacher
    testbed_config: str = "configs/testbed.yaml"
    prompts: str = ""  # JSONL {"prompt", "answer"} training prompts for real models; "" = testbed problems
    eval_prompts: str = ""  # JSONL held-out prompts for real models; "" = testbed held-out problems
    # arms
    selectors: list[str] = field(default_factory=lambda: ["full", "teachability", "entropy", "kl", "tip", "random"])
    ratios: list[float] = field(default_factory=lambda: [0.05])  # retention of every selector but full (1.0)
    seeds: list[int] = field(default_factory=lambda: [0, 1, 2])
    min_per_sequence: int = 0  # kept positions guaranteed per response, beyond the budget (released code: 1)
    k: int = 0  # top-K of the signals; 0 = the pair's default (testbed 4, real models 16)
    # rollouts
    steps: int = 200  # optimizer steps per arm; one fresh rollout batch per step
    batch_size: int = 32  # prompts per step, over all processes
    samples_per_prompt: int = 1
    max_new_tokens: int = 0  # 0 = the testbed's response length, or 256 for real models
    temperature: float = 1.0  # rollout temperature (the paper: 1.0); the loss uses the tempered student (opd.step)
    top_p: float = 1.0  # must be 1.0: the loss cannot use the nucleus-renormalised distribution (see __post_init__)
    # loss and optimizer
    loss: str = "sampled_pg"
    normalization: Literal["kept_global", "per_sequence_mean"] = "kept_global"
    clip_low: float = 0.2
    clip_high: float = 0.28
    optimizer: Literal["adamw", "adam"] = "adamw"
    lr: float = 1e-4  # testbed value from a sweep on the full arm (configs/train.yaml)
    weight_decay: float = 0.1
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])
    max_grad_norm: float = 0.0  # 0 = no clipping (the paper names none)
    micro_batch_size: int = 0  # sequences per forward/backward; 0 = the whole local batch
    # evaluation and the live selector check
    eval_every: int = 50  # steps between held-out evaluations (also after the last step)
    eval_problems: int = 500  # held-out problems for greedy exact match
    bank_sequences: int = 64  # held-out base-student rollouts: the common bank for KL and live gain
    bank_max_tokens: int = 192  # bank responses cut to this many tokens
    # checkpoints, output, machine
    checkpoint_every: int = 50  # steps between checkpoints (0 = none)
    save_students: bool = True  # keep each arm's final student under arms/<arm>/student
    device: str = "auto"
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"
    cpu_threads: int = 1  # torch threads on CPU; 0 = torch's default (see the YAML)
    scoring_tokens: int = 16384  # tokens per teacher-forcing batch when scoring
    run_name: str = ""  # "" = train-<config hash>
    out_dir: str = "results/train"
    progress: bool = True

    def __post_init__(self) -> None:
        unknown = [s for s in self.selectors if s not in list_scores()]
        check(not unknown, "selectors",
              f"unknown selector {unknown[0]!r}; registered: {', '.join(list_scores())}" if unknown else "")
        check(len(self.selectors) >= 1, "selectors", "must name at least one selector")
        check(len(set(self.selectors)) == len(self.selectors), "selectors", f"duplicate selector in {self.selectors}")
        bad = [r for r in self.ratios if not 0 < r <= 1]
        check(not bad, "ratios", f"each ratio must be in (0, 1], got {bad[0] if bad else ''}")
        check(len(self.ratios) >= 1 or self.selectors == ["full"], "ratios", "must hold at least one ratio")
        check(len(self.seeds) >= 1, "seeds", "must hold at least one seed")
        check(len(set(self.seeds)) == len(self.seeds), "seeds", f"duplicate seed in {self.seeds}")
        check(all(0 <= s < 2**31 for s in self.seeds), "seeds", f"each seed must be in [0, 2**31), got {self.seeds}")
        check_at_least(self, 0, "min_per_sequence")
        check(self.k >= 0, "k", f"must be >= 1 (or 0 for the pair's default), got {self.k}")
        check_at_least(self, 1, "steps", "batch_size", "samples_per_prompt")
        check_at_least(self, 0, "max_new_tokens")
        check(self.temperature > 0, "temperature", f"must be > 0, got {self.temperature}")
        # top_p < 1 samples from the nucleus-renormalised distribution, whose support moves with every update (a
        # sampled token can leave the nucleus: log-prob -inf); the loss would train against a distribution that
        # was not sampled, so it is refused rather than silently ignored.
        check(self.top_p == 1.0, "top_p", f"must be 1.0 in training (the loss uses log_softmax(logits / temperature) "
              f"over the whole vocabulary and cannot honour nucleus sampling), got {self.top_p}")
        check(self.loss in list_losses(), "loss", f"unknown loss {self.loss!r}; registered: {', '.join(list_losses())}")
        check(self.normalization in NORMALIZATIONS, "normalization",
              f"must be one of {list(NORMALIZATIONS)}, got {self.normalization!r}")
        check(0 <= self.clip_low < 1, "clip_low", f"must be in [0, 1), got {self.clip_low}")
        check_at_least(self, 0, "clip_high")
        check(self.lr > 0, "lr", f"must be > 0, got {self.lr}")
        check_at_least(self, 0, "weight_decay")
        check(len(self.betas) == 2 and all(0 <= b < 1 for b in self.betas), "betas",
              f"must be two numbers in [0, 1), got {self.betas}")
        check(self.max_grad_norm >= 0, "max_grad_norm", f"must be >= 0 (0 = off), got {self.max_grad_norm}")
        check_at_least(self, 0, "micro_batch_size")
        check_at_least(self, 1, "eval_every", "eval_problems", "bank_sequences", "bank_max_tokens")
        check_at_least(self, 0, "checkpoint_every", "cpu_threads")
        check_at_least(self, 1, "scoring_tokens")
        check(bool(self.student) == bool(self.teacher), "teacher",
              "give both student and teacher, or neither (testbed)")
        check(not self.student or bool(self.prompts), "prompts", "real models need a JSONL training prompt file")
        check(not self.student or bool(self.eval_prompts), "eval_prompts",
              "real models need a JSONL held-out prompt file")

    def arms(self) -> list[Arm]:
        """Every (selector, ratio, seed) of the run: full at 1.0, the others at each ratio."""
        pairs = [(s, r) for s in self.selectors for r in ([1.0] if s == "full" else self.ratios)]
        return [Arm(selector, float(ratio), seed) for selector, ratio in pairs for seed in self.seeds]

    def fingerprint(self) -> dict:
        """The config as a plain dict without the keys a resume may change."""
        data = json.loads(json.dumps(config_to_dict(self)))
        for key in RESUME_IGNORED:
            data.pop(key, None)
        return data

    def run_id(self) -> str:
        """The run directory name: `run_name`, or `train-<hash of the config>`."""
        if self.run_name:
            return self.run_name
        payload = {k: v for k, v in self.fingerprint().items() if k not in ("run_name", "out_dir")}
        return "train-" + config_hash(payload)


@dataclass(frozen=True)
class Arm:
    """One training run of a student: a selector at a retention ratio, with a seed."""

    selector: str
    ratio: float
    seed: int

    @property
    def name(self) -> str:
        return f"{self.selector}-r{self.ratio:g}-s{self.seed}"
