"""Mixed precision for the models that are updated (the trained student, the engine's single updates).

The defect this fixes: on a GPU `dtype: auto` is bfloat16, and an optimizer that steps bfloat16
parameters directly loses every update smaller than half a bf16 spacing (8 significand bits: a
weight of 0.02 has spacing 2^-13 ~ 1.2e-4, so an Adam step of lr 1e-6 rounds back to the old value).
Measured on a N(0, 0.02) Qwen2 (tests/opd/test_opd_precision.py): 10 AdamW steps at lr 1e-6 change
2.9% of the weights in bf16 (the issue measured 1.9%), every weight in float32.

The cure is accelerate's / torch AMP's `mixed_precision="bf16"`: the updated model keeps float32
MASTER weights (the optimizer and in-place updates act on them, so small steps accumulate), and its
forwards run under `torch.autocast(dtype=torch.bfloat16)` (matmuls in bf16 with float32
accumulation; softmax, log_softmax and norms in float32). Backward runs outside the autocast region,
as torch recommends; gradients arrive in float32 on the float32 parameters. Frozen models (the
teacher) only run inference and may stay stored in bf16.

`mixed_precision` (TrainConfig, DiagnoseConfig):
* "auto": "bf16" when the run's dtype resolves to bfloat16 (`dtype: auto` on CUDA), else "no";
* "bf16": float32 master weights + bf16 autocast, on CPU or CUDA (the CPU test uses it);
* "no":  parameters stored and stepped in `dtype` (with dtype bfloat16 that is pure-bf16 training,
  whose small updates vanish; kept for comparison, not recommended).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass

import torch
from torch import Tensor

from diagnostics.core.config import check
from diagnostics.lm.forward import PositionLM
from diagnostics.lm.models import load_model

MIXED_PRECISION = ("auto", "no", "bf16")


@dataclass(frozen=True)
class Precision:
    """How an updated model is stored and computed.

    master: dtype of its parameters (float32 under mixed precision, else the run's dtype).
    compute: autocast dtype of its forwards, or None (forwards in `master`).
    device_type: "cuda" or "cpu", for torch.autocast.
    """

    master: torch.dtype
    compute: torch.dtype | None
    device_type: str

    @property
    def mixed(self) -> bool:
        return self.compute is not None

    @property
    def name(self) -> str:
        """The resolved option: "bf16" or "no" (recorded in manifests)."""
        return "bf16" if self.mixed else "no"

    def autocast(self) -> contextlib.AbstractContextManager:
        """The forward's autocast region (a no-op context without mixed precision)."""
        return autocast(self.device_type, self.compute)


def autocast(device_type: str, compute: torch.dtype | None) -> contextlib.AbstractContextManager:
    """torch.autocast(device_type, compute), or a no-op context when `compute` is None."""
    if compute is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device_type, dtype=compute)


def resolve_precision(mixed_precision: str, dtype: torch.dtype, device: torch.device) -> Precision:
    """The precision of the updated model for a run's `mixed_precision` option and resolved `dtype`."""
    if mixed_precision not in MIXED_PRECISION:
        raise ValueError(f"mixed_precision: must be one of {list(MIXED_PRECISION)}, got {mixed_precision!r}")
    mixed = mixed_precision == "bf16" or (mixed_precision == "auto" and dtype == torch.bfloat16)
    if mixed:
        return Precision(torch.float32, torch.bfloat16, device.type)
    return Precision(dtype, None, device.type)


def check_master_weights(model: torch.nn.Module, mixed: bool, what: str = "student") -> None:
    """Under mixed precision every trainable parameter must be float32 (else updates round away)."""
    if not mixed:
        return
    bad = sorted({str(p.dtype) for p in model.parameters() if p.requires_grad and p.dtype != torch.float32})
    if bad:
        raise ValueError(f"{what}: mixed precision (bf16 compute) keeps float32 master weights, but its parameters "
                         f"are {', '.join(bad)}; load it with dtype float32")


class AutocastPositionLM(PositionLM):
    """`PositionLM` whose forward runs under the run's autocast (float32 master weights, bf16 compute).

    The autocast region covers the forward only: a caller's backward on the returned logits runs
    outside it, and DDP (which calls this forward) sees float32 parameters and float32 gradients.
    """

    def __init__(self, model: torch.nn.Module, vocab_size: int, precision: Precision):
        super().__init__(model, vocab_size)
        self.precision = precision

    def forward(self, input_ids: Tensor, attention_mask: Tensor | None, rows: Tensor, cols: Tensor) -> Tensor:
        with self.precision.autocast():
            return super().forward(input_ids, attention_mask, rows, cols)


def position_lm(model: torch.nn.Module, vocab_size: int, precision: Precision) -> PositionLM:
    """The kept-position forward of an updated model: autocast under mixed precision, plain otherwise."""
    check_master_weights(model, precision.mixed)
    return AutocastPositionLM(model, vocab_size, precision) if precision.mixed else PositionLM(model, vocab_size)


@contextlib.contextmanager
def inference(precision: Precision) -> Iterator[None]:
    """No-grad forwards of the updated model (rollouts, scoring, evaluation) in its compute precision."""
    with torch.no_grad(), precision.autocast():
        yield


def changed_fraction(before: dict[str, Tensor], model: torch.nn.Module, names: list[str] | None = None) -> float:
    """Share of parameter entries whose value differs from `before` (name -> tensor), over `names`
    (default: every parameter). How much of an update survived storage."""
    params = dict(model.named_parameters())
    names = list(before) if names is None else names
    changed = sum(int((params[n].detach() != before[n].to(params[n].dtype)).sum()) for n in names)
    total = sum(before[n].numel() for n in names)
    return changed / max(total, 1)


def master_weights(model: torch.nn.Module, path: str, precision: Precision) -> torch.nn.Module:
    """The model with float32 master weights under mixed precision: reloaded from `path` in float32 when it was
    loaded in a lower precision (a cast would keep the bf16 rounding of a float32 checkpoint), else unchanged."""
    if not precision.mixed or all(p.dtype == torch.float32 for p in model.parameters()):
        return model

    device = next(model.parameters()).device
    return load_model(path, device, torch.float32).train(model.training)


def check_mixed_precision(value: object, key: str = "mixed_precision") -> str:
    """The config option as a string, or a ConfigError naming `key`. YAML (1.1, PyYAML) reads a bare `no`
    (accelerate's spelling) as false, so false is "no"."""
    value = "no" if value is False else value
    check(value in MIXED_PRECISION, key, f"must be one of {list(MIXED_PRECISION)}, got {value!r}")
    return value
