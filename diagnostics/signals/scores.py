"""The selection-score registry, the registered scores of spec section 2, and ``selection_scores``.

A score is a pure function of the batch-normalised signals H~, D~, C~ (``normalize_batch`` over the
valid positions of one rollout batch). ``register_score`` adds one by name; ``register_q3_variant``
derives the Q3-restricted copy of a registered score (same function, -inf outside Q3);
``selection_scores`` normalises H, D, C once and evaluates every registered score, in registration
order, plus the Q3 mask. The diagnostic (``score_<name>`` columns), the analysis and the trainer's
selectors all read this one registry.
"""

from __future__ import annotations

import zlib
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Literal, overload

import torch
from torch import Tensor

from diagnostics.registry import add_once, lookup
from diagnostics.signals.checks import NEG_INF
from diagnostics.signals.normalize import normalize_batch, quantile_linear

ScoreFn = Callable[[dict[str, Tensor], Tensor, torch.Generator], Tensor]
_NORMALISED = ("H", "D", "C")  # the normalised signals a score may use: H~, D~, C~


@dataclass(frozen=True)
class ScoreSpec:
    """One registered selection score.

    fn(norm, valid, generator) -> [B, T] float, pure: ``norm`` maps "H", "D", "C" to the
    normalised [B, T] signals (0 at invalid positions), ``valid`` is the [B, T] bool mask, and
    ``generator`` a torch.Generator seeded per (seed, name) for random scores.
    """

    name: str
    fn: ScoreFn
    description: str
    needs: tuple[str, ...] = field(default_factory=tuple)
    restrict_to_q3: bool = False


_SCORES: dict[str, ScoreSpec] = {}


def register_score(
    name: str, *, description: str, needs: Iterable[str] = (), q3: bool = False
) -> Callable[[ScoreFn], ScoreFn]:
    """Decorator registering a score function under ``name``.

    ``needs``: the normalised signals it reads (subset of "H", "D", "C"). ``q3=True``: the score
    only ranks inside Q3 (low H~, high D~); ``selection_scores`` sets it to -inf outside Q3.
    Raises ValueError on a duplicate name or an unknown need.
    """
    needs = tuple(needs)
    unknown = [n for n in needs if n not in _NORMALISED]
    if unknown:
        raise ValueError(f"score {name!r} needs unknown signals {unknown}; known: {list(_NORMALISED)}")

    if name == "q3":
        raise ValueError('"q3" is reserved: selection_scores returns the Q3 mask under that key')

    def decorator(fn: ScoreFn) -> ScoreFn:
        add_once(_SCORES, "score", name, ScoreSpec(name, fn, description, needs, q3))
        return fn

    return decorator


def register_q3_variant(base: str, *, description: str, name: str | None = None) -> ScoreSpec:
    """Register the registered score ``base`` restricted to Q3 as ``name`` (default ``q3_<base>``).

    The variant runs ``base``'s function with ``base``'s needs; ``selection_scores`` sets it to -inf
    outside Q3. Random scores stay independent: the generator is seeded by the variant's own name.
    """
    spec = get_score(base)
    name = f"q3_{base}" if name is None else name
    register_score(name, description=description, needs=spec.needs, q3=True)(spec.fn)
    return _SCORES[name]


def get_score(name: str) -> ScoreSpec:
    """The registered ScoreSpec; KeyError listing the registered names if unknown."""
    return lookup(_SCORES, "score", "scores", name)


def list_scores() -> list[str]:
    """Registered score names, in registration order."""
    return list(_SCORES)


# --------------------------------------------------------------------------------------------
# The registered scores (spec section 2 table); registration order is the column order
# --------------------------------------------------------------------------------------------


def _soft_or(a: Tensor, b: Tensor) -> Tensor:
    return a + b - a * b


@register_score("full", description="every valid position (full-token OPD baseline)")
def _full(norm, valid, generator):
    return torch.ones(valid.shape, device=valid.device)


@register_score("random", description="uniform random")
def _random(norm, valid, generator):
    return torch.rand(valid.shape, generator=generator).to(valid.device)


@register_score("entropy", description="H~, normalised student entropy", needs=("H",))
def _entropy(norm, valid, generator):
    return norm["H"]


@register_score("kl", description="D~, normalised top-K disagreement (raw KL selector)", needs=("D",))
def _kl(norm, valid, generator):
    return norm["D"]


@register_score("compat", description="C~, normalised compatibility mass (C-only)", needs=("C",))
def _compat(norm, valid, generator):
    return norm["C"]


@register_score("teachability", description="D~ C~, learnable disagreement D^L (TA-OPD)", needs=("D", "C"))
def _teachability(norm, valid, generator):
    return norm["D"] * norm["C"]


@register_score("incompatible", description="D~ (1 - C~), incompatible disagreement D^I", needs=("D", "C"))
def _incompatible(norm, valid, generator):
    return norm["D"] * (1.0 - norm["C"])


@register_score("tip", description="H~ + D~ - H~ D~ (TIP soft-OR)", needs=("H", "D"))
def _tip(norm, valid, generator):
    return _soft_or(norm["H"], norm["D"])


@register_score(
    "teachability_entropy", description="H~ + s - H~ s, s = D~ C~ (TA-OPD + entropy)", needs=("H", "D", "C")
)
def _teachability_entropy(norm, valid, generator):
    return _soft_or(norm["H"], norm["D"] * norm["C"])


register_q3_variant("compat", description="C~ inside Q3")
register_q3_variant("teachability", description="D~ C~ inside Q3")
register_q3_variant("incompatible", description="D~ (1 - C~) inside Q3")
register_q3_variant("random", name="q3_only", description="uniform random inside Q3 (paper's Q3-only selector)")


# --------------------------------------------------------------------------------------------
# Every registered score over one rollout batch
# --------------------------------------------------------------------------------------------


def _score_generator(seed: int, name: str) -> torch.Generator:
    """Per-score generator: seeded by (seed, name) so adding a score never shifts another's draws."""
    return torch.Generator().manual_seed((seed * 1_000_003 + zlib.crc32(name.encode())) % 2**63)


def _raw_signals(signals: dict[str, Tensor], valid: Tensor) -> dict[str, Tensor]:
    """{"H", "D", "C": [B, T]} picked from ``signals`` (H: the full-vocabulary entropy if present)."""
    h_key = "student_entropy" if "student_entropy" in signals else "student_entropy_topk"
    raw = {}
    for short, key in (("H", h_key), ("D", "disagreement"), ("C", "compat_mass")):
        if key not in signals:
            raise ValueError(f"signals lacks {key!r} (has {sorted(signals)})")
        if signals[key].shape != valid.shape:
            raise ValueError(
                f"signals[{key!r}] shape {list(signals[key].shape)} differs from valid {list(valid.shape)}"
            )
        raw[short] = signals[key]
    return raw


def _q3_mask(norm: dict[str, Tensor], valid: Tensor) -> Tensor:
    """valid & H~ < median(H~) & D~ >= median(D~), medians over the valid positions (linear)."""
    (h_med,) = quantile_linear(norm["H"][valid], (0.5,))
    (d_med,) = quantile_linear(norm["D"][valid], (0.5,))
    return valid & (norm["H"] < h_med) & (norm["D"] >= d_med)


@overload
def selection_scores(
    signals: dict[str, Tensor], valid: Tensor, *, seed: int = 0, return_normalized: Literal[False] = False
) -> dict[str, Tensor]: ...


@overload
def selection_scores(
    signals: dict[str, Tensor], valid: Tensor, *, seed: int = 0, return_normalized: Literal[True]
) -> tuple[dict[str, Tensor], dict[str, Tensor]]: ...


def selection_scores(
    signals: dict[str, Tensor], valid: Tensor, *, seed: int = 0, return_normalized: bool = False
) -> dict[str, Tensor] | tuple[dict[str, Tensor], dict[str, Tensor]]:
    """Every registered score over a rollout batch, plus the Q3 mask.

    Args:
        signals: dict of [B, T] tensors with "disagreement", "compat_mass" and "student_entropy"
            (or, failing it, "student_entropy_topk").
        valid: [B, T] bool mask of the valid response positions (at least one True).
        seed: seeds the random scores (one generator per score name).
        return_normalized: also return the normalised signals the scores were computed from.
    Returns:
        scores: {name: [B, T] float32} for every registered score (0 at invalid positions; q3
        scores -inf outside Q3), and "q3": [B, T] bool = valid & H~ < median(H~) & D~ >= median(D~),
        medians over the valid positions with linear interpolation.
        With ``return_normalized``: (scores, normalized), normalized = {"H": H~, "D": D~, "C": C~},
        each [B, T] float32 from ``normalize_batch`` (0 at invalid positions).
    """
    norm = {short: normalize_batch(x, valid) for short, x in _raw_signals(signals, valid).items()}
    q3 = _q3_mask(norm, valid)
    out: dict[str, Tensor] = {}
    for name, spec in _SCORES.items():
        score = spec.fn(norm, valid, _score_generator(seed, name)).float()
        if score.shape != valid.shape:
            raise ValueError(
                f"score {name!r} returned shape {list(score.shape)}, expected {list(valid.shape)}"
            )
        score = score.masked_fill(~valid, 0.0)
        out[name] = score.masked_fill(~q3, NEG_INF) if spec.restrict_to_q3 else score
    out["q3"] = q3
    return (out, norm) if return_normalized else out
