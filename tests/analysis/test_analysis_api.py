"""analysis' public names resolve lazily (`import analysis` does not pull in matplotlib); the layering itself is held by
tests/test_house.py."""

from __future__ import annotations

import analysis


def test_public_api():
    for name in ("summarize", "format_report", "make_all_figures", "write_token_view", "load_run", "with_k"):
        assert callable(getattr(analysis, name))
