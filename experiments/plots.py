"""Plots of runs and sweeps (PNG, matplotlib's Agg backend; no display needed).

* :func:`speedup_vs_quality` — speedup against PSNR vs the sequential sample, one point per
  run, labelled N/S/W (the paper's Fig. 1 trade-off);
* :func:`latency_vs_n` — latency against N, one line per (S, W), the sequential latency dashed;
* :func:`device_timeline` — one run's rounds per device: compute, then waiting/communication.
"""
from __future__ import annotations

from collections import defaultdict
from collections.abc import Sequence
from pathlib import Path

from experiments import atomic
from experiments.quality import PSNR_CAP


def _plt():
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def _save(fig, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    atomic.save_figure(fig, path, dpi=100)
    fig.clf()
    _plt().close(fig)
    return path


def exact_at_top(ax, points: Sequence[tuple[float, object, bool, str]],
                 cap: float = PSNR_CAP) -> float:
    """Draw methods that are exact against the sequential sampler (every sample identical:
    PSNR capped at ``cap``) at the top of ``ax``'s PSNR axis, each a triangle with its label
    ("exact …") above it; return that height. ``points``: (x, colour, filled, label).

    At the cap itself (100 dB) they would squash every other method into the bottom of the
    axis; left out, the exact method would be invisible. Call it after the other points."""
    lo, hi = ax.get_ylim() if ax.has_data() else (cap - 10.0, cap)
    if not points:
        return hi
    ax.set_ylim(lo, hi)  # fixed from here on: the markers sit on the axis' top edge
    for x, colour, filled, label in points:
        ax.plot([x], [hi], marker="^", ms=6, ls="", color=colour, clip_on=False, zorder=3,
                mfc=colour if filled else "none")
        ax.annotate(label, (x, hi), xytext=(0, 5), textcoords="offset points", ha="center",
                    fontsize=6, color=colour, annotation_clip=False)
    return hi


def _label(r: dict) -> str:
    return f"N{r['n']} S{r['stride']} W{r['warmup']}"


def speedup_vs_quality(rows: Sequence[dict], path: Path) -> Path:
    plt = _plt()
    fig, ax = plt.subplots(figsize=(6, 4.2))
    pts = [r for r in rows if r.get("psnr_db") is not None and r.get("speedup") is not None]
    ax.scatter([r["psnr_db"] for r in pts], [r["speedup"] for r in pts], c="tab:blue")
    for r in pts:
        ax.annotate(_label(r), (r["psnr_db"], r["speedup"]), fontsize=7,
                    xytext=(3, 3), textcoords="offset points")
    ax.axhline(1.0, color="grey", lw=0.8, ls="--")
    ax.set_xlabel("PSNR vs sequential (dB; capped at 100 when identical)")
    ax.set_ylabel("speedup over sequential")
    ax.set_title("speedup against quality", fontsize=10)
    return _save(fig, path)


def latency_vs_n(rows: Sequence[dict], path: Path) -> Path:
    plt = _plt()
    fig, ax = plt.subplots(figsize=(6, 4.2))
    lines: dict[tuple, list] = defaultdict(list)
    for r in rows:
        if r.get("latency_s") is not None:
            lines[(r["stride"], r["warmup"])].append((r["n"], r["latency_s"]))
    for (s, w), pts in sorted(lines.items()):
        pts.sort()
        ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=f"S={s} W={w}")
    seq = [r["sequential_s"] for r in rows if r.get("sequential_s") is not None]
    if seq:
        ax.axhline(sum(seq) / len(seq), color="grey", ls="--", lw=1, label="sequential (mean)")
    ax.set_xlabel("N (stages)")
    ax.set_ylabel("latency (s)")
    ax.set_xticks(sorted({r["n"] for r in rows}))
    ax.legend(fontsize=8)
    ax.set_title("latency against N", fontsize=10)
    return _save(fig, path)


def device_timeline(rows: Sequence[dict], path: Path, title: str = "",
                    replica: int = 0) -> Path:
    """Gantt chart of one pipeline's rounds (CFG-parallel: the first guidance group's):
    solid = stage compute, light = waiting for and sending values (until the round's ε is in)."""
    plt = _plt()
    mine = [r for r in rows if r.get("replica", 0) == replica and r.get("group", 0) == 0]
    devices = sorted({r["device"] for r in mine})
    t0 = min((r["start_s"] for r in mine), default=0.0)
    fig, ax = plt.subplots(figsize=(9, 1.2 + 0.45 * len(devices)))
    for r in mine:
        start = (r["start_s"] - t0) * 1e3
        ax.barh(r["device"], r["compute_ms"], left=start, color="tab:blue", edgecolor="white",
                lw=0.3)
        ax.barh(r["device"], r["round_ms"] - r["compute_ms"], left=start + r["compute_ms"],
                color="tab:orange", alpha=0.35)
    ax.set_yticks(devices)
    ax.set_yticklabels([f"device {d}" for d in devices])
    ax.invert_yaxis()
    ax.set_xlabel("ms since the first round started")
    ax.set_title(title or "per-device timeline (blue: compute, orange: wait/communicate)",
                 fontsize=10)
    return _save(fig, path)


def study_quality_figure(rows, floor, title: str):
    """The quality study's figure (experiments/study.py): PSNR and FD against predicted
    speedup; an exact method at the top of the PSNR axis (:func:`exact_at_top`)."""
    plt = _plt()
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.8))
    for ax, key, name in ((axes[0], "psnr_db", "PSNR vs sequential (dB)"),
                          (axes[1], "fd", "Fréchet distance to real (bars: paired ΔFD CI)")):
        exact = []
        for r in rows:
            marker = "s" if r["n"] == 1 else "o"
            if key == "psnr_db" and r["psnr_capped_fraction"] == 1.0:
                exact.append((r["predicted_speedup"], "tab:blue", True, f"exact: {r['point']}"))
                continue
            if key == "fd":  # the interval of the paired difference, around the estimate
                d, lo, hi = r["fd_delta"]
                m, lo, hi = r["fd"], r["fd"] - (d - lo), r["fd"] + (hi - d)
            else:
                m, lo, hi = r[key]
            ax.errorbar(r["predicted_speedup"], m, yerr=[[m - lo], [hi - m]], fmt=marker,
                        capsize=3)
            ax.annotate(r["point"], (r["predicted_speedup"], m), fontsize=6,
                        xytext=(3, 3), textcoords="offset points")
        if key == "psnr_db":
            exact_at_top(ax, exact)
        if key == "fd":
            ax.axhline(floor, color="grey", ls="--", label="real-vs-real floor (same n)")
            ax.legend(fontsize=7)
        ax.set_xlabel("predicted speedup (x)")
        ax.set_ylabel(name)
        ax.grid(alpha=0.3)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    return fig


def study_quality(rows, floor, path: Path, title: str) -> None:
    """:func:`study_quality_figure`, saved to ``path``."""
    fig = study_quality_figure(rows, floor, title)
    atomic.save_figure(fig, path, dpi=110)
    _plt().close(fig)


def stage_similarity(sim: dict, path: Path, title: str) -> None:
    """Each stage's input between consecutive sequential steps (experiments/study.py)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 3.8))
    for s, v in sim["stages"].items():
        name = "latent (stage 0)" if int(s) == 0 else f"stage {s} input"
        k = range(1, len(v["cosine"]) + 1)
        axes[0].plot(k, v["cosine"], label=name)
        axes[1].semilogy(k, v["relative_change"], label=name)
    axes[0].set_ylabel("cosine(step k, step k−1)")
    axes[1].set_ylabel("‖v_k − v_{k−1}‖ / ‖v_k‖")
    for ax in axes:
        ax.set_xlabel("step k")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.suptitle(f"{title}: inputs of each stage between consecutive sequential steps "
                 f"(N={sim['n']}, {sim['samples']} samples)", fontsize=9)
    fig.tight_layout()
    atomic.save_figure(fig, path, dpi=110)
    plt.close(fig)
