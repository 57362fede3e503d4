"""A self-contained HTML page showing sampled responses token by token, shaded by a score or by the gain.

`write_token_view` writes one HTML file (inline CSS, no JavaScript, no external resources) in which
each sampled response is a paragraph of tokens; a token's background encodes the chosen column
(a sequential scale for non-negative scores, a diverging scale centred at 0 for signed columns such
as the gain), and the positions a selector keeps at a retention ratio (exact top-N over the WHOLE
table, as in `analysis.selectors`) are underlined and boxed. Hovering a token shows its values.
"""

from __future__ import annotations

import html
from dataclasses import dataclass
from pathlib import Path

import matplotlib as mpl
import numpy as np
import pandas as pd
from matplotlib.colors import Colormap, Normalize, TwoSlopeNorm, to_hex

from analysis.io import canonical_order, require_columns
from analysis.selectors import kept_mask, n_keep

SIGNED_COLUMNS: tuple[str, ...] = ("gain", "gain_rel", "spillover", "kl_reverse_change")
SEQ_CMAP = "YlOrBr"  # light-to-dark, text stays readable
DIV_CMAP = "RdBu"  # same diverging map as the figures: red < 0 < blue

_CSS = """
body { font-family: -apple-system, 'Segoe UI', Helvetica, Arial, sans-serif; margin: 24px; color: #222;
       background: #fff; }
h1 { font-size: 20px; margin-bottom: 4px; }
.meta { color: #555; font-size: 13px; margin-bottom: 14px; }
.legend { display: flex; align-items: center; gap: 18px; font-size: 13px; margin: 10px 0 18px 0; flex-wrap: wrap; }
.bar { width: 260px; height: 14px; border: 1px solid #999; }
.ticks { display: flex; justify-content: space-between; width: 260px; font-size: 11px; color: #444; }
.seq { border-top: 1px solid #ddd; padding: 8px 0 10px 0; }
.seqhead { font-size: 12px; color: #666; margin-bottom: 4px; font-family: monospace; }
.toks { font-family: 'DejaVu Sans Mono', Menlo, Consolas, monospace; font-size: 14px; line-height: 1.9;
        white-space: pre-wrap; word-break: break-word; }
.t { padding: 1px 0; border-radius: 2px; }
.kept { outline: 2px solid #111; outline-offset: -1px; text-decoration: underline; text-decoration-thickness: 2px;
        font-weight: bold; }
.nc { background: repeating-linear-gradient(45deg, #f4f4f4, #f4f4f4 3px, #e4e4e4 3px, #e4e4e4 6px); color: #888; }
.sample { padding: 2px 6px; }
"""


def _text_color(rgba: tuple[float, float, float, float]) -> str:
    """Black or white text, whichever reads better on the background (relative luminance)."""
    r, g, b = rgba[:3]
    return "#000" if 0.2126 * r + 0.7152 * g + 0.0722 * b > 0.5 else "#fff"


def _scale(values: np.ndarray, signed: bool) -> tuple[Normalize, str]:
    """Normalisation over the finite values of the whole table (1st-99th percentile; symmetric if signed)."""
    finite = values[np.isfinite(values)]
    if finite.size == 0:
        return Normalize(0.0, 1.0), SEQ_CMAP
    lo, hi = np.quantile(finite, [0.01, 0.99])
    if signed:
        m = max(abs(lo), abs(hi)) or 1.0
        return TwoSlopeNorm(vcenter=0.0, vmin=-m, vmax=m), DIV_CMAP
    if hi <= lo:
        hi = lo + 1.0
    return Normalize(lo, hi), SEQ_CMAP


def _fmt(v: float) -> str:
    return "n/a" if np.isnan(v) else ("-inf" if v == -np.inf else f"{v:.4g}")


# Tokenizer-internal whitespace marks (byte-level BPE "Ġ"/"Ċ"/"ĉ", SentencePiece "▁") shown as the text they stand for.
_WHITESPACE_MARKS = str.maketrans({"\u0120": " ", "\u2581": " ", "\u010a": "\n", "\u0109": "\t"})


def _token_text(tok: str) -> str:
    """Escaped display text of a token; newlines shown as a visible mark followed by a line break."""
    text = tok.translate(_WHITESPACE_MARKS)
    return html.escape(text).replace("\n", "\u21b5\n") if text else "\u00b7"


def _sample_sequences(seq: np.ndarray, kept: np.ndarray, n_seqs: int, seed: int) -> np.ndarray:
    """Sorted seq_ids: uniform draws, up to half of them among responses holding a kept position."""
    rng = np.random.default_rng(seed)
    all_ids = np.unique(seq)
    with_kept = np.unique(seq[kept])
    n = min(n_seqs, all_ids.size)
    k = min(max(n // 2, 1), with_kept.size) if n else 0
    first = rng.choice(with_kept, size=k, replace=False) if k else np.empty(0, dtype=all_ids.dtype)
    rest = np.setdiff1d(all_ids, first)
    return np.sort(np.concatenate([first, rng.choice(rest, size=n - k, replace=False)]))


@dataclass(frozen=True)
class _Shading:
    """Per-row arrays of the (canonically ordered) table and how a value maps to a colour."""

    df: pd.DataFrame
    values: np.ndarray  # [N] the shading column
    gain: np.ndarray  # [N] G, NaN when the table has none
    tokens: np.ndarray  # [N] token text (or id)
    kept: np.ndarray  # [N] bool, kept by the selector at the ratio
    norm: Normalize
    cmap: Colormap
    signed: bool
    score: str
    selector: str
    ratio: float


def _shading(df: pd.DataFrame, score: str, selector: str, ratio: float) -> _Shading:
    """The arrays and colour scale of the token view over the whole table."""
    values = df[score].to_numpy(np.float64)
    finite = values[np.isfinite(values)]
    signed = score in SIGNED_COLUMNS or (finite.size > 0 and finite.min() < 0 < finite.max())
    norm, cmap_name = _scale(values, signed)
    kept = kept_mask(df, f"score_{selector}", ratio)
    gain = df["gain"].to_numpy(np.float64) if "gain" in df.columns else np.full(len(df), np.nan)
    tokens = (df["token"].astype(str) if "token" in df.columns
              else df.get("token_id", pd.Series(["?"] * len(df))).astype(str)).to_numpy()
    return _Shading(df, values, gain, tokens, kept, norm, mpl.colormaps[cmap_name], signed, score, selector, ratio)


def _token_span(view: _Shading, i: int) -> str:
    """One token of row i as a shaded <span>, its values in the hover title."""
    v = view.values[i]
    title = (f"pos {int(view.df['pos'].iat[i])} | token {view.tokens[i]!r} | {view.score} = {_fmt(v)} | "
             f"gain G = {_fmt(view.gain[i])} nats | "
             f"kept by {view.selector} at {view.ratio:.0%}: {'yes' if view.kept[i] else 'no'}")
    cls = "t kept" if view.kept[i] else "t"
    if np.isfinite(v):
        rgba = view.cmap(view.norm(v))
        style = f' style="background:{to_hex(rgba)};color:{_text_color(rgba)}"'
    else:  # NaN, or -inf (not a candidate of a Q3 variant)
        cls += " nc"
        style = ""
    return f'<span class="{cls}"{style} title="{html.escape(title)}">{_token_text(view.tokens[i])}</span>'


def _sequence_block(view: _Shading, sid: int, a: int, b: int) -> str:
    """Rows [a, b) (one response) as a headed paragraph of token spans."""
    spans = [_token_span(view, i) for i in range(a, b)]
    gain = view.gain[a:b]
    pid = f" prompt {int(view.df['prompt_id'].iat[a])}" if "prompt_id" in view.df.columns else ""
    head = (f"seq {int(sid)}{pid} | {b - a} tokens | kept {int(view.kept[a:b].sum())} | "
            f"mean G {_fmt(float(np.nanmean(gain)) if np.isfinite(gain).any() else float('nan'))} nats")
    return (f'<div class="seq"><div class="seqhead">{html.escape(head)}</div>'
            f'<div class="toks">{"".join(spans)}</div></div>')


def _legend(view: _Shading) -> str:
    """The colour bar with its ticks, and what the kept and hatched marks mean."""
    stops = ", ".join(to_hex(view.cmap(x)) for x in np.linspace(0, 1, 11))
    ticks = [_fmt(float(view.norm.inverse(x))) for x in (0.0, 0.5, 1.0)]
    unit = " (nats)" if view.score in ("gain", "spillover", "kl_reverse_change") else ""
    n = len(view.df)
    return (
        f'<div class="legend"><div><div class="bar" style="background:linear-gradient(to right, {stops})"></div>'
        f'<div class="ticks">{"".join(f"<span>{t}</span>" for t in ticks)}</div>'
        f'<div>{html.escape(view.score)}{unit}{" (diverging, centred at 0)" if view.signed else ""}; '
        "colours clipped to the 1st-99th percentile</div></div>"
        f'<div><span class="t kept sample">kept</span> = in the top {n_keep(n, view.ratio)} of {n} positions by '
        f'{html.escape(f"score_{view.selector}")} ({view.ratio:.0%}, whole table)</div>'
        f'<div><span class="t nc sample">hatched</span> = no value (not a candidate)</div></div>'
    )


def write_token_view(
    df: pd.DataFrame,
    out_html: str | Path,
    *,
    score: str = "score_teachability",
    selector: str = "teachability",
    ratio: float = 0.05,
    n_seqs: int = 20,
    run_name: str | None = None,
    seed: int = 0,
) -> Path:
    """Write the token view of `n_seqs` sampled responses; returns the path.

    `score` is the column shading the tokens (any numeric column: a ``score_*`` column, ``gain``, ...);
    a column in `SIGNED_COLUMNS` or with values of both signs gets the diverging scale centred at 0.
    `selector` names the ``score_<selector>`` whose exact top-N at `ratio` over the whole table is marked.
    Responses are drawn with `seed` (up to half among those holding a kept position, so the marks are
    visible) and shown in seq_id order.
    """
    require_columns(df, ["seq_id", "pos", score, f"score_{selector}"], "token view")
    if len(df) == 0:
        raise ValueError("token view: the table is empty")
    df = canonical_order(df)
    run_name = run_name or str(df.attrs.get("run_name", "run"))
    view = _shading(df, score, selector, ratio)
    seq = df["seq_id"].to_numpy()
    shown = _sample_sequences(seq, view.kept, n_seqs, seed)
    starts = np.searchsorted(seq, shown, side="left")
    ends = np.searchsorted(seq, shown, side="right")
    blocks = [_sequence_block(view, sid, a, b) for sid, a, b in zip(shown, starts, ends)]
    n_kept_shown = sum(int(view.kept[a:b].sum()) for a, b in zip(starts, ends))
    page = (
        "<!DOCTYPE html><html lang=\"en\"><head><meta charset=\"utf-8\">"
        f"<title>{html.escape(run_name)}: token view</title><style>{_CSS}</style></head><body>"
        f"<h1>{html.escape(run_name)}: token view</h1>"
        f'<div class="meta">{len(shown)} of {df["seq_id"].unique().size} responses sampled (seed {seed}; '
        f"up to half among responses with kept positions); {n_kept_shown} kept positions shown. "
        "Hover a token for its position, values and selection.</div>"
        f"{_legend(view)}{''.join(blocks)}</body></html>"
    )
    out = Path(out_html)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(page, encoding="utf-8")
    return out
