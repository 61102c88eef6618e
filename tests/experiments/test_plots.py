"""The plots show every method: an exact one (PSNR capped at ``quality.PSNR_CAP``: every
sample identical to the sequential sampler's) sits at the top of the PSNR axis, marked
"exact", instead of stretching the axis to 100 dB or falling off it. Drawn from the digits
frontier study's shipped rows (``docs/results/digits/frontier/results.json``)."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from experiments import frontier
from experiments import plots

ROWS = (Path(__file__).resolve().parents[2] / "docs" / "results" / "digits" / "frontier"
        / "results.json")


def _rows() -> list[dict]:
    return json.loads(ROWS.read_text())["rows"]


def _markers(ax) -> list[tuple[float, float]]:
    return [(float(x), float(y)) for line in ax.get_lines()
            for x, y in zip(line.get_xdata(), line.get_ydata())]


def _exact_shown(ax, x: float) -> None:
    lo, hi = ax.get_ylim()
    assert (pytest.approx(x), pytest.approx(hi)) in _markers(ax)
    assert any(t.get_text().startswith("exact") and t.xy[0] == pytest.approx(x)
               for t in ax.texts)


def test_frontier_plot_shows_the_exact_method_at_the_top_of_the_psnr_axis():
    rows = _rows()
    exact = [r for r in rows if r["psnr_capped_fraction"] == 1.0]
    assert [frontier.family(r) for r in exact] == ["CFG-parallel"]
    result = frontier.fronts(rows, [1, 2, 4])
    fig = frontier.figure(rows, result, "digits")
    psnr_axes = [ax for ax in fig.axes if ax.get_ylabel() == "PSNR (dB)"]
    assert [ax.get_title() for ax in psnr_axes] == ["1 device(s)", "2 device(s)",
                                                    "4 device(s)"]
    cfg = exact[0]
    for ax, fr in zip(psnr_axes, result):
        shown = rows.index(cfg) in fr["candidates"]
        assert shown == (cfg["devices"] <= fr["devices"])
        if shown:
            _exact_shown(ax, cfg[frontier.SPEED])
        # every other point inside the axis: none pushed off or squashed by the cap
        lo, hi = ax.get_ylim()
        for i in fr["candidates"]:
            if rows[i] is not cfg:
                assert lo < rows[i]["psnr_db"][0] < hi


def test_study_quality_plot_shows_the_exact_method(tmp_path):
    rows = _rows()
    cfg = next(r for r in rows if r["psnr_capped_fraction"] == 1.0)
    fig = plots.study_quality_figure(rows, 0.0, "digits")
    ax = fig.axes[0]
    _exact_shown(ax, cfg["predicted_speedup"])
    plots.study_quality(rows, 0.0, tmp_path / "q.png", "digits")
    assert (tmp_path / "q.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
