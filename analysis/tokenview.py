"""A self-contained HTML page showing sampled responses token by token, shaded by a score or by the gain.

`write_token_view` writes one HTML file (inline CSS, no JavaScript, no external resources) in which
each sampled response is a paragraph of tokens; a token's background encodes the chosen column
(a sequential scale for non-negative scores, a diverging scale centred at 0 for signed columns such
as the gain), and the positions a selector keeps at a retention ratio (exact top-N over the WHOLE
table, as in `analysis.selectors`) are underlined and boxed. Hovering a token shows its values.
"""

from __future__ import annotations

import html
from pathlib import Path

import matplotlib as mpl
import numpy as np
import pandas as pd
from matplotlib.colors import Normalize, TwoSlopeNorm, to_hex

from analysis.io import canonical_order, require_columns
from analysis.selectors import kept_mask, n_keep

SIGNED_COLUMNS: tuple[str, ...] = ("gain", "gain_rel", "spillover", "kl_reverse_change")
SEQ_CMAP = "YlOrBr"  # light-to-dark, text stays readable
DIV_CMAP = "RdBu"  # same diverging map as the figures: red < 0 < blue

_CSS = """
body { font-family: -apple-system, 'Segoe UI', Helvetica, Arial, sans-serif; margin: 24px; color: #222; background: #fff; }
h1 { font-size: 20px; margin-bottom: 4px; }
.meta { color: #555; font-size: 13px; margin-bottom: 14px; }
.legend { display: flex; align-items: center; gap: 18px; font-size: 13px; margin: 10px 0 18px 0; flex-wrap: wrap; }
.bar { width: 260px; height: 14px; border: 1px solid #999; }
.ticks { display: flex; justify-content: space-between; width: 260px; font-size: 11px; color: #444; }
.seq { border-top: 1px solid #ddd; padding: 8px 0 10px 0; }
.seqhead { font-size: 12px; color: #666; margin-bottom: 4px; font-family: monospace; }
.toks { font-family: 'DejaVu Sans Mono', Menlo, Consolas, monospace; font-size: 14px; line-height: 1.9; white-space: pre-wrap; word-break: break-word; }
.t { padding: 1px 0; border-radius: 2px; }
.kept { outline: 2px solid #111; outline-offset: -1px; text-decoration: underline; text-decoration-thickness: 2px; font-weight: bold; }
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
    sel_col = f"score_{selector}"
    require_columns(df, ["seq_id", "pos", score, sel_col], "token view")
    if len(df) == 0:
        raise ValueError("token view: the table is empty")
    df = canonical_order(df)
    run_name = run_name or str(df.attrs.get("run_name", "run"))
    values = df[score].to_numpy(np.float64)
    finite = values[np.isfinite(values)]
    signed = score in SIGNED_COLUMNS or (finite.size > 0 and finite.min() < 0 < finite.max())
    norm, cmap_name = _scale(values, signed)
    cmap = mpl.colormaps[cmap_name]
    kept = kept_mask(df, sel_col, ratio)
    gain = df["gain"].to_numpy(np.float64) if "gain" in df.columns else np.full(len(df), np.nan)
    tokens = (df["token"].astype(str) if "token" in df.columns
              else df.get("token_id", pd.Series(["?"] * len(df))).astype(str)).to_numpy()

    seq_ids = df["seq_id"].unique()
    shown = _sample_sequences(df["seq_id"].to_numpy(), kept, n_seqs, seed)
    starts = np.searchsorted(df["seq_id"].to_numpy(), shown, side="left")
    ends = np.searchsorted(df["seq_id"].to_numpy(), shown, side="right")

    blocks = []
    n_kept_shown = 0
    for sid, a, b in zip(shown, starts, ends):
        spans = []
        for i in range(a, b):
            v = values[i]
            title = (f"pos {int(df['pos'].iat[i])} | token {tokens[i]!r} | {score} = {_fmt(v)} | "
                     f"gain G = {_fmt(gain[i])} nats | kept by {selector} at {ratio:.0%}: {'yes' if kept[i] else 'no'}")
            cls = "t kept" if kept[i] else "t"
            if np.isfinite(v):
                rgba = cmap(norm(v))
                style = f' style="background:{to_hex(rgba)};color:{_text_color(rgba)}"'
            else:  # NaN, or -inf (not a candidate of a Q3 variant)
                cls += " nc"
                style = ""
            spans.append(f'<span class="{cls}"{style} title="{html.escape(title)}">{_token_text(tokens[i])}</span>')
        n_k = int(kept[a:b].sum())
        n_kept_shown += n_k
        pid = f" prompt {int(df['prompt_id'].iat[a])}" if "prompt_id" in df.columns else ""
        head = (f"seq {int(sid)}{pid} | {b - a} tokens | kept {n_k} | "
                f"mean G {_fmt(float(np.nanmean(gain[a:b])) if np.isfinite(gain[a:b]).any() else float('nan'))} nats")
        blocks.append(f'<div class="seq"><div class="seqhead">{html.escape(head)}</div>'
                      f'<div class="toks">{"".join(spans)}</div></div>')

    stops = ", ".join(to_hex(cmap(x)) for x in np.linspace(0, 1, 11))
    lo, hi = norm.inverse(0.0), norm.inverse(1.0)
    mid = norm.inverse(0.5)
    unit = " (nats)" if score in ("gain", "spillover", "kl_reverse_change") else ""
    legend = (
        f'<div class="legend"><div><div class="bar" style="background:linear-gradient(to right, {stops})"></div>'
        f'<div class="ticks"><span>{_fmt(float(lo))}</span><span>{_fmt(float(mid))}</span><span>{_fmt(float(hi))}</span></div>'
        f'<div>{html.escape(score)}{unit}{" (diverging, centred at 0)" if signed else ""}; '
        "colours clipped to the 1st-99th percentile</div></div>"
        f'<div><span class="t kept sample">kept</span> = in the top {n_keep(len(df), ratio)} of {len(df)} positions by '
        f'{html.escape(sel_col)} ({ratio:.0%}, whole table)</div>'
        f'<div><span class="t nc sample">hatched</span> = no value (not a candidate)</div></div>'
    )
    page = (
        "<!DOCTYPE html><html lang=\"en\"><head><meta charset=\"utf-8\">"
        f"<title>{html.escape(run_name)}: token view</title><style>{_CSS}</style></head><body>"
        f"<h1>{html.escape(run_name)}: token view</h1>"
        f'<div class="meta">{len(shown)} of {seq_ids.size} responses sampled (seed {seed}; up to half among responses '
        f'with kept positions); {n_kept_shown} kept positions shown. '
        "Hover a token for its position, values and selection.</div>"
        f"{legend}{''.join(blocks)}</body></html>"
    )
    out = Path(out_html)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(page, encoding="utf-8")
    return out
