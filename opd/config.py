"""`TrainConfig`: the one config of `taopd train`; `configs/train.yaml` mirrors it key for key.

A run trains one student per arm, arm = (selector, ratio, seed): the `full` selector at ratio 1.0
(full-token OPD), a weight rule (IW-OPD: every token, weighted) at 1.0, and every other selector at every
ratio in `ratios` (or in `selector_ratios[selector]`), each for every seed in `seeds`, all with the same
prompts per seed, number of steps and rollouts. Range and cross-field checks run in `__post_init__` and name
the key; `diagnostics.core.config.load_config` adds the file.
"""

from __future__ import annotations

import copy
import dataclasses
import json
from dataclasses import dataclass, field
from typing import Any, Literal

from diagnostics.core.config import (
    check,
    check_at_least,
    check_cpu_threads,
    check_device,
    check_out_dir,
    check_run_name,
    check_temperature,
    check_unique,
    config_to_dict,
    explicit_keys,
)
from diagnostics.core.rundir import config_hash
from diagnostics.data.problems import ANSWER_CHECKS
from diagnostics.lm.precision import check_mixed_precision
from diagnostics.losses import list_losses
from diagnostics.signals import SIGNAL_NORMALIZATIONS, SelectionOptions, get_score, list_scores
from diagnostics.signals.selectors import SIGNAL_MODES, TIE_BREAKS
from opd.normalization import NORMALIZATIONS
from opd.optim import OPTIMIZERS, PAPER_ADAM

# Keys left out of the config fingerprint while at these defaults: the run hashes of configs written
# before the keys existed stay the same (the manifest records every selection option either way).
OMITTED_AT_DEFAULT = {"preset": "", "selector_ratios": {}, "signals": "exact", "signal_normalization": "valid_rows",
                      "tie_break": "row_major", "top_up": "", "q3_fill": False, "mixed_precision": "auto",
                      "rollout_backend": "hf", "engine": "own", "trl_args": {}, "answer_check": "exact",
                      "prompt_column": "prompt", "answer_column": "answer", "enable_thinking": None,
                      "budget": "exact"}
# Keys that do not change what a run computes: a resume may differ in them.
RESUME_IGNORED = ("progress", "report_to", "save_rollouts", "arm_workers")


@dataclass
class TrainConfig:
    """Config of `taopd train` (TA-OPD and the baseline selectors); see configs/train.yaml."""

    # models and data
    student: str = ""  # model dir or hub id; "" = the embedded testbed's student
    teacher: str = ""  # "" = the embedded testbed's teacher
    testbed_config: str = "configs/testbed.yaml"
    prompts: str = ""  # training prompts for real models (.jsonl/.json/.parquet or hub id); "" = testbed problems
    eval_prompts: str = ""  # held-out prompts for real models (as prompts); "" = testbed held-out problems
    prompt_column: str = "prompt"  # real models: both files' prompt column, a name or dotted path (prompt.0.content)
    answer_column: str = "answer"  # real models: the answer column (e.g. reward_model.ground_truth, label)
    enable_thinking: bool | None = None  # real models: Qwen3's chat-template switch; None = the template's default
    # arms
    selectors: list[str] = field(default_factory=lambda: ["full", "teachability", "entropy", "kl", "tip", "random"])
    ratios: list[float] = field(default_factory=lambda: [0.05])  # retention of every selector but full (1.0)
    # budgets replacing `ratios` for the selection rules named, e.g. {entropy: [0.05, 0.2]} (80/20 = entropy at 0.2)
    selector_ratios: dict[str, list[float]] = field(default_factory=dict)
    seeds: list[int] = field(default_factory=lambda: [0, 1, 2])
    min_per_sequence: int = 0  # kept positions guaranteed per response, beyond the budget (released code: 1)
    k: int = 0  # top-K of the signals; 0 = the pair's default (testbed 4, real models 16)
    # selection details (named options; `preset: paper` = the released code's: opd.config, configs/train.yaml)
    preset: Literal["", "paper"] = ""  # "" = the keys as given | paper: the release's values of the keys it names
    signals: Literal["exact", "release_topk"] = "exact"  # H, D, C selection reads: exact | the release's top-K proxies
    signal_normalization: Literal["valid_rows", "all_response_rows"] = "valid_rows"  # Q05/Q95 rows and formula
    tie_break: Literal["row_major", "earliest_position"] = "row_major"  # equal scores: sequence first | position first
    top_up: str = ""  # min_per_sequence top-up: "" = the selector's own score | a registered score (all positions)
    q3_fill: bool = False  # a Q3 selector short of its budget fills it with the best positions outside Q3
    budget: Literal["exact", "release"] = "exact"  # kept count: exact ceil(ratio n) | release: float ceil(n * ratio)
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
    optimizer: Literal["adamw", "adam", "paper"] = "adamw"  # paper: the release's Megatron Adam (opd.optim)
    lr: float = 1e-4  # testbed value from a sweep on the full arm (configs/train.yaml)
    weight_decay: float = 0.1
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])
    max_grad_norm: float = 0.0  # 0 = no clipping (the paper names none)
    micro_batch_size: int = 0  # sequences per forward/backward; 0 = the whole local batch
    # evaluation and the live selector check
    eval_every: int = 50  # steps between held-out evaluations (also after the last step)
    eval_problems: int = 500  # held-out problems for greedy accuracy
    answer_check: str = "exact"  # exact (whole response, the testbed) | math (math-verify: diagnostics.data.problems)
    bank_sequences: int = 64  # held-out base-student rollouts: the common bank for KL and live gain
    bank_max_tokens: int = 192  # bank responses cut to this many tokens
    # checkpoints, output, machine
    checkpoint_every: int = 50  # steps between checkpoints (0 = none)
    save_students: bool = True  # keep each arm's final student under arms/<arm>/student
    save_rollouts: bool = False  # keep every step's rollouts in arms/<arm>/rollouts/ (opd.paper_protocol's bank)
    device: str = "auto"
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"
    # the student: float32 master weights + bf16 autocast forwards (diagnostics.lm.precision); auto = bf16 when dtype
    # resolves to bfloat16 (CUDA), else no
    mixed_precision: str | bool = "auto"  # auto | no | bf16 (bool: YAML reads a bare `no` as false)
    rollout_backend: Literal["hf", "vllm"] = "hf"  # vllm: colocated, weights synced each step (opd.rollout_engine)
    cpu_threads: int = 1  # torch threads on CPU; 0 = torch's default (see the YAML)
    arm_workers: int = 1  # processes training arms side by side (each cpu_threads threads); the run is the same
    scoring_tokens: int = 16384  # tokens per teacher-forcing batch when scoring
    run_name: str = ""  # "" = train-<config hash>
    out_dir: str = "results/train"
    progress: bool = True
    # engine
    engine: Literal["own", "trl"] = "own"  # own: opd.trainer; trl: opd.trl_recipe (TRL's DistillationTrainer)
    report_to: str = "none"  # engine=trl only: TRL's report_to (none | trackio | wandb | tensorboard, comma-separated)
    trl_args: dict[str, Any] = field(default_factory=dict)  # engine=trl only: more DistillationConfig settings

    def __post_init__(self) -> None:
        apply_presets(self)  # first: the checks below see the preset's (and optimizer: paper's) values
        unknown = [s for s in self.selectors if s not in list_scores()]
        check(not unknown, "selectors",
              f"unknown selector {unknown[0]!r}; registered: {', '.join(list_scores())}" if unknown else "")
        check(len(self.selectors) >= 1, "selectors", "must name at least one selector")
        check_unique(self.selectors, "selectors")
        bad = [r for r in self.ratios if not 0 < r <= 1]
        check(not bad, "ratios", f"each ratio must be in (0, 1], got {bad[0] if bad else ''}")
        check_unique(self.ratios, "ratios")
        self._check_selector_ratios()
        check(len(self.ratios) >= 1 or self.selectors == ["full"], "ratios", "must hold at least one ratio")
        check(len(self.seeds) >= 1, "seeds", "must hold at least one seed")
        check_unique(self.seeds, "seeds")
        check(all(0 <= s < 2**31 for s in self.seeds), "seeds", f"each seed must be in [0, 2**31), got {self.seeds}")
        check_at_least(self, 0, "min_per_sequence")
        check(self.k >= 0, "k", f"must be >= 1 (or 0 for the pair's default), got {self.k}")
        check_at_least(self, 1, "steps", "batch_size", "samples_per_prompt")
        check_at_least(self, 0, "max_new_tokens")
        check_temperature(self.temperature)
        # top_p < 1 samples from the nucleus-renormalised distribution, whose support moves with every update (a
        # sampled token can leave the nucleus: log-prob -inf); the loss would train against a distribution that
        # was not sampled, so it is refused rather than silently ignored.
        check(self.top_p == 1.0, "top_p", f"must be 1.0 in training (the loss uses log_softmax(logits / temperature) "
              f"over the whole vocabulary and cannot honour nucleus sampling), got {self.top_p}")
        check(self.loss in list_losses(), "loss", f"unknown loss {self.loss!r}; registered: {', '.join(list_losses())}")
        check(self.signals in SIGNAL_MODES, "signals", f"must be one of {list(SIGNAL_MODES)}, got {self.signals!r}")
        check(self.signal_normalization in SIGNAL_NORMALIZATIONS, "signal_normalization",
              f"must be one of {list(SIGNAL_NORMALIZATIONS)}, got {self.signal_normalization!r}")
        check(self.tie_break in TIE_BREAKS, "tie_break", f"must be one of {list(TIE_BREAKS)}, got {self.tie_break!r}")
        check(not self.top_up or self.top_up in list_scores(), "top_up",
              f"must be '' or a registered score ({', '.join(list_scores())}), got {self.top_up!r}")
        check(not self.top_up or not get_score(self.top_up).restrict_to_q3, "top_up",
              f"{self.top_up!r} is -inf outside Q3; a top-up score must rank every position")
        check(not self.top_up or get_score(self.top_up).kind == "selection", "top_up",
              f"{self.top_up!r} is a weight rule (it weights every token); a top-up ranks by a selection score")
        check(self.optimizer in OPTIMIZERS, "optimizer", f"must be one of {list(OPTIMIZERS)}, got {self.optimizer!r}")
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
        check(self.answer_check in ANSWER_CHECKS, "answer_check",
              f"must be one of {', '.join(ANSWER_CHECKS)}, got {self.answer_check!r}")
        check_at_least(self, 0, "checkpoint_every")
        check_cpu_threads(self.cpu_threads)
        check_at_least(self, 1, "scoring_tokens")
        self.mixed_precision = check_mixed_precision(self.mixed_precision)
        check(self.rollout_backend in ("hf", "vllm"), "rollout_backend",
              f"must be hf or vllm, got {self.rollout_backend!r}")
        # accelerate places each process: "cuda" (one GPU per process, by LOCAL_RANK) or "cpu"; no cuda:N here
        check_device(self.device, allowed=("auto", "cpu", "cuda"), indexed=False)
        self._check_engine()
        check(bool(self.student) == bool(self.teacher), "teacher",
              "give both student and teacher, or neither (testbed)")
        check(not self.student or bool(self.prompts), "prompts", "real models need a training prompt file")
        check(not self.student or bool(self.eval_prompts), "eval_prompts", "real models need a held-out prompt file")
        for key in ("prompt_column", "answer_column", "enable_thinking"):  # the testbed's problems have neither
            check(bool(self.student) or getattr(self, key) == OMITTED_AT_DEFAULT[key], key,
                  "applies to real models' prompt files (student=, teacher=, prompts=), not the testbed's own problems")
        for key in ("prompts", "eval_prompts"):  # the testbed trains and evaluates on its own problems
            check(bool(self.student) or not getattr(self, key), key, "applies to real models (student=, teacher=); "
                  "the testbed trains and evaluates on its own problems (drop it, or give the models)")
        if self.run_name:
            check_run_name(self.run_name)
        check_out_dir(self.out_dir)
        names = [arm.name for arm in self.arms()]
        clash = next((n for n in names if names.count(n) > 1), None)
        check(clash is None, "ratios", f"two arms would share the name {clash!r} ({self.ratios}: ratios equal to 6 "
              f"significant digits); give distinct ratios")

    def _check_engine(self) -> None:
        """engine, its TRL-only keys, and arm_workers (side by side: the own engine on hf rollouts)."""
        check(self.engine in ("own", "trl"), "engine", f"must be own or trl, got {self.engine!r}")
        check(self.engine == "trl" or self.report_to == "none", "report_to",
              f"is for engine=trl (TRL's report_to); the own engine logs to the console, got {self.report_to!r}")
        check(self.engine == "trl" or not self.trl_args, "trl_args",
              f"is for engine=trl (TRL's DistillationConfig settings), got {self.trl_args!r}")
        check_at_least(self, 1, "arm_workers")
        check(self.arm_workers == 1 or (self.rollout_backend == "hf" and self.engine == "own"), "arm_workers",
              f"trains arms side by side with engine own and rollout_backend hf only, got engine {self.engine} and "
              f"rollout_backend {self.rollout_backend}")

    def _check_selector_ratios(self) -> None:
        """selector_ratios: each key a selection rule of `selectors` (not full), each budget in (0, 1]."""
        for name, ratios in self.selector_ratios.items():
            check(name in list_scores(), "selector_ratios",
                  f"unknown selector {name!r}; registered: {', '.join(list_scores())}")
            check(get_score(name).kind == "selection" and name != "full", "selector_ratios",
                  f"{name!r} {'keeps every token' if name == 'full' else 'is a weight rule (it weights every token)'}"
                  f": it takes no budget")
            check(name in self.selectors, "selector_ratios", f"{name!r} is not in selectors {self.selectors}")
            check(isinstance(ratios, list) and len(ratios) >= 1, "selector_ratios",
                  f"{name}: must be a non-empty list of ratios, got {ratios!r}")
            bad = [r for r in ratios if not (isinstance(r, (int, float)) and 0 < r <= 1)]
            check(not bad, "selector_ratios", f"{name}: each ratio must be in (0, 1], got {bad[0] if bad else ''}")
            check_unique(ratios, f"selector_ratios.{name}")

    def arms(self) -> list[Arm]:
        """Every (selector, ratio, seed) of the run: full and weight rules (every token) at 1.0, the others at each
        ratio (`selector_ratios`' for the rules it names, else `ratios`)."""
        def budgets(s: str) -> list[float]:
            if s == "full" or get_score(s).kind == "weight":
                return [1.0]
            return self.selector_ratios.get(s, self.ratios)

        pairs = [(s, r) for s in self.selectors for r in budgets(s)]
        return [Arm(selector, float(ratio), seed) for selector, ratio in pairs for seed in self.seeds]

    def selection_options(self) -> SelectionOptions:
        """The selection's named choices (`diagnostics.signals.select_by_name`)."""
        return SelectionOptions(signals=self.signals, normalization=self.signal_normalization,
                                tie_break=self.tie_break, q3_fill=self.q3_fill, top_up=self.top_up, budget=self.budget)

    def preset_keys(self) -> list[str]:
        """The keys whose values `preset` (and `optimizer: paper`) set, for the manifest."""
        keys = list(PRESETS.get(self.preset, {}))
        return keys + [k for k in OPTIMIZER_FIXED.get(self.optimizer, {}) if k not in keys]

    def fingerprint(self) -> dict:
        """The config as a plain dict without the keys a resume may change (nor OMITTED_AT_DEFAULT ones)."""
        data = json.loads(json.dumps(config_to_dict(self)))
        for key in RESUME_IGNORED:
            data.pop(key, None)
        for key, default in OMITTED_AT_DEFAULT.items():
            if data.get(key) == default:
                data.pop(key)
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


PRESETS: dict[str, dict[str, object]] = {
    "paper": {
        "signals": "release_topk",
        "signal_normalization": "all_response_rows",
        "tie_break": "earliest_position",
        "top_up": "teachability_entropy_ndc",
        "q3_fill": False,
        "min_per_sequence": 1,
        "budget": "release",
        "normalization": "per_sequence_mean",
        "optimizer": "paper",
    },
}
# What `optimizer: paper` fixes (the optimizer's construction reads the rest from opd.optim.PAPER_ADAM).
OPTIMIZER_FIXED = {"paper": {key: PAPER_ADAM[key] for key in ("betas", "weight_decay", "max_grad_norm")}}


def _default(config, key: str):
    spec = next(f for f in dataclasses.fields(config) if f.name == key)
    return spec.default_factory() if spec.default is dataclasses.MISSING else spec.default


def _impose(config, values: dict[str, object], source: str) -> None:
    """Write `values` into `config`; a key the user wrote with another value is an error naming both (through
    `load_config`: `explicit_keys`; a config built in Python: any value other than the default)."""
    written = explicit_keys(config)
    for key, value in values.items():
        current = getattr(config, key)
        user_set = key in written if written is not None else current != _default(config, key)
        check(current == value or not user_set, key,
              f"set to {current!r} {_where(written, key)}, but {source} sets it to {value!r}: drop one of the two "
              f"(the preset's keys are written into config.json and the manifest)")
        setattr(config, key, copy.deepcopy(value))  # no list shared with the preset table


def _where(written: dict[str, str] | None, key: str) -> str:
    if written is None or key not in written:
        return "in the config"
    return "on the command line" if written[key] == "the command line" else f"in {written[key]}"


def apply_presets(config) -> None:
    """Write `config.preset`'s values, then `config.optimizer`'s fixed hyperparameters, into `config`."""
    check(config.preset in ("", *PRESETS), "preset", f"must be '' or one of {list(PRESETS)}, got {config.preset!r}")
    if config.preset:
        _impose(config, PRESETS[config.preset], f"preset: {config.preset}")
    if config.optimizer in OPTIMIZER_FIXED:
        _impose(config, OPTIMIZER_FIXED[config.optimizer], f"optimizer: {config.optimizer}")
