"""analysis.tokenview: page content, kept marks, colour scales; rendering in headless Chromium."""

from __future__ import annotations

import os
import re
import shutil
import subprocess

import numpy as np
import pytest

from analysis.selectors import kept_mask
from analysis.tokenview import write_token_view

CHROMIUM = shutil.which("chromium") or ("/usr/bin/chromium" if os.path.exists("/usr/bin/chromium") else None)


def test_page_content(small_tokens, tmp_path):
    path = write_token_view(small_tokens, tmp_path / "v.html", n_seqs=small_tokens["seq_id"].nunique())
    page = path.read_text()
    assert page.startswith("<!DOCTYPE html>") and "<script" not in page and "http" not in page
    assert "synthetic-test: token view" in page
    # every kept position of the whole table is marked exactly once (all sequences shown)
    token_classes = re.findall(r'<span class="(t[^"]*)"', page)
    token_classes = [c for c in token_classes if not c.endswith("sample")]  # the legend's two samples
    assert len(token_classes) == len(small_tokens)
    assert sum("kept" in c for c in token_classes) == int(kept_mask(small_tokens, "score_teachability", 0.05).sum())
    assert "kept by teachability at 5%: yes" in page and "gain G = " in page
    assert "linear-gradient" in page  # legend bar


def test_sample_shows_kept_positions(small_tokens, tmp_path):
    page = write_token_view(small_tokens, tmp_path / "s.html", n_seqs=4, seed=3).read_text()
    assert len(re.findall(r'class="seqhead"', page)) == 4
    assert 'class="t kept"' in page  # at least one sampled response holds a kept position


def test_gain_is_diverging_and_inf_is_hatched(small_tokens, tmp_path):
    page = write_token_view(small_tokens, tmp_path / "g.html", score="gain", n_seqs=3).read_text()
    assert "diverging, centred at 0" in page
    page = write_token_view(small_tokens, tmp_path / "q.html", score="score_q3_compat", selector="q3_compat",
                            n_seqs=40).read_text()
    assert 'class="t nc"' in page and "= -inf" in page and "diverging" not in page.split("</style>")[1]


def test_bad_input(small_tokens, tmp_path):
    with pytest.raises(ValueError, match="score_nope"):
        write_token_view(small_tokens, tmp_path / "x.html", selector="nope")
    with pytest.raises(ValueError, match="empty"):
        write_token_view(small_tokens.iloc[:0], tmp_path / "x.html")


@pytest.mark.browser
@pytest.mark.slow
def test_renders_in_headless_chromium(small_tokens, tmp_path):
    if CHROMIUM is None:
        if os.environ.get("TAOPD_REQUIRE_BROWSER"):
            pytest.fail("chromium not found but TAOPD_REQUIRE_BROWSER is set")
        pytest.skip("chromium not installed (set TAOPD_REQUIRE_BROWSER=1 to make this a failure)")
    import matplotlib.image

    html = write_token_view(small_tokens, tmp_path / "view.html", score="gain", n_seqs=8)
    png = tmp_path / "shot.png"
    cmd = [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
           "--disable-background-networking", "--disable-component-update", "--disable-sync",
           f"--user-data-dir={tmp_path / 'profile'}", f"--screenshot={png}", "--window-size=1200,800",
           html.resolve().as_uri()]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert png.exists() and png.stat().st_size > 0, proc.stderr[-2000:]
    img = matplotlib.image.imread(png)[..., :3]
    assert img.std() > 0.01  # not blank
    assert (img < 0.95).any(axis=-1).mean() > 0.02  # a real share of non-white pixels (text, shaded tokens)
    # both diverging colours appear: reddish (gain < 0) and bluish (gain > 0) pixels
    r, b = img[..., 0], img[..., 2]
    assert ((r - b) > 0.2).sum() > 50 and ((b - r) > 0.2).sum() > 50
    assert np.isfinite(img).all()
