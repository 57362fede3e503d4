"""A selector by name under named options: ``SelectionOptions`` and ``select_by_name``.

One call goes from a rollout batch's [B, T] signals to its kept mask, the way the trainer (and any
other engine) selects: which signal keys feed H, D, C (``signals``), how they are normalised
(``normalization``), the registered score, how ties break (``tie_break``), whether a Q3 selector fills
past Q3 (``q3_fill``) and which score tops up a response with too few kept positions (``top_up``).

``SelectionOptions()`` is the project's behaviour; ``SelectionOptions.paper()`` the released training
code's (TA-OPD/slime_ta_opd/slime/rollout/tip_compat.py, public repository ckjsuperhh/taopd-baseline):
top-K proxy signals (L271-354, L372-374), quantiles over all response rows without eps (L404-419),
ties by (score, -position) (L517-523), a Q3 selector keeps min(budget, |Q3|) (L503: no fill; the
release's offline top-N analysis, tools/matched_fixed_context_topn.py ``prepare``, does fill:
``is_q3 * 2 + score``) and the top-up of an empty response by ``teachability_entropy_ndc``
(softor(H~, Norm(D C)), L392, L526-538).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

from torch import Tensor

from diagnostics.signals.normalize import SIGNAL_NORMALIZATIONS
from diagnostics.signals.scores import (
    SELECTION_SIGNAL_SOURCES,
    get_score,
    list_scores,
    missing_signals,
    selection_scores,
    unrestricted_score,
)
from diagnostics.signals.selection import BUDGET_RULES, select

TIE_BREAKS = ("row_major", "earliest_position")
SIGNAL_MODES = tuple(SELECTION_SIGNAL_SOURCES)  # ("exact", "release_topk")
RELEASE_TOP_UP = "teachability_entropy_ndc"  # the release's top-up score (tip_compat.py L538)


@dataclass(frozen=True)
class SelectionOptions:
    """The named choices of a selection; defaults = the project's behaviour.

    signals: "exact" | "release_topk" (``scores.SELECTION_SIGNAL_SOURCES``).
    normalization: "valid_rows" | "all_response_rows" (``normalize``).
    tie_break: "row_major" (earliest sequence, then position) | "earliest_position" (the release's
        (score, -position) key; for its ascending "low" selectors that is the latest position).
    q3_fill: a Q3 selector with fewer candidates than the budget fills it with the best other valid
        positions by its unrestricted score.
    top_up: "" = a short response is topped up by the selector's own score among its candidates;
        else a registered score, ranked over all the response's valid positions.
    budget: "exact" (ceil of the exact ratio x n: 7% of 100 keeps 7) | "release" (the release's float
        ceil(n * ratio), tip_compat.py L450: 7% of 100 keeps 8) (``selection.BUDGET_RULES``).
    """

    signals: str = "exact"
    normalization: str = "valid_rows"
    tie_break: str = "row_major"
    q3_fill: bool = False
    top_up: str = ""
    budget: str = "exact"

    def __post_init__(self) -> None:
        for key, value, allowed in (("signals", self.signals, SIGNAL_MODES),
                                    ("normalization", self.normalization, SIGNAL_NORMALIZATIONS),
                                    ("tie_break", self.tie_break, TIE_BREAKS),
                                    ("budget", self.budget, BUDGET_RULES)):
            if value not in allowed:
                raise ValueError(f"{key}: must be one of {list(allowed)}, got {value!r}")
        if self.top_up:
            get_score(self.top_up)  # KeyError listing the registered scores
            if get_score(self.top_up).restrict_to_q3:
                raise ValueError(f"top_up: {self.top_up!r} is a Q3 score; a top-up needs a score at every position")
            if get_score(self.top_up).kind != "selection":
                raise ValueError(f"top_up: {self.top_up!r} is a weight rule; a top-up ranks by a selection score")

    @classmethod
    def paper(cls) -> SelectionOptions:
        """The released training code's choices (module docstring)."""
        return cls(signals="release_topk", normalization="all_response_rows", tie_break="earliest_position",
                   q3_fill=False, top_up=RELEASE_TOP_UP, budget="release")

    def source_keys(self) -> tuple[str, ...]:
        """The signal keys this selection reads (H, D, C), in that order."""
        return tuple(SELECTION_SIGNAL_SOURCES[self.signals].values())

    def to_dict(self) -> dict:
        return asdict(self)


def tie_order_for(selector: str, tie_break: str) -> str:
    """``select``'s tie_order for a registered selector: the release's key (score, -position) sorted
    descending keeps earlier positions first, sorted ascending (``low_first`` selectors) later ones."""
    if tie_break == "row_major":
        return "row_major"
    return "latest_position" if get_score(selector).low_first else "earliest_position"


def select_by_name(
    signals: dict[str, Tensor],
    valid: Tensor,
    selector: str,
    ratio: float,
    *,
    min_per_sequence: int,
    seed: int,
    options: SelectionOptions = SelectionOptions(),
    response_rows: Tensor | None = None,
) -> Tensor:
    """[B, T] kept mask of one rollout batch for the registered ``selector`` at ``ratio``.

    Args:
        signals: {key: [B, T]} holding ``options.source_keys()`` (e.g. a scoring pass's signals).
        valid: [B, T] bool, the selectable positions. response_rows: [B, T] bool superset of valid,
            the rows "all_response_rows" normalises over (default: valid).
        seed: seeds the random scores (``selection_scores``).
    Returns:
        [B, T] bool, a subset of valid. With options=SelectionOptions() this is exactly
        ``select(selection_scores(...)[selector], valid, ratio, min_per_sequence=...)``.
    Raises ValueError for a weight rule (it weights every token: ``scores.rule_weights``) and for a rule
    reading a raw signal ``signals`` lacks (e.g. the teacher's entropy under top-K signals).
    """
    spec = get_score(selector)
    if spec.kind != "selection":
        raise ValueError(f"selector {selector!r} is a weight rule (it weights every token, no budget); selection "
                         f"rules: {', '.join(list_scores('selection'))}")
    missing = missing_signals(selector, signals)
    if missing:
        raise ValueError(f"selector {selector!r} needs the signal(s) {missing}, absent here (have {sorted(signals)})")
    named = {canonical: signals[key] for canonical, key in SELECTION_SIGNAL_SOURCES[options.signals].items()}
    named.update({key: signals[key] for key in spec.raw_needs})
    scores, norm = selection_scores(named, valid, seed=seed, return_normalized=True,
                                    normalization=options.normalization, response_rows=response_rows)
    fill = unrestricted_score(selector, norm, valid, seed) if options.q3_fill and spec.restrict_to_q3 else None
    top_up = scores[options.top_up] if options.top_up else None
    return select(scores[selector], valid, ratio, min_per_sequence=min_per_sequence,
                  tie_order=tie_order_for(selector, options.tie_break), fill_score=fill, top_up_score=top_up,
                  budget_rule=options.budget)
