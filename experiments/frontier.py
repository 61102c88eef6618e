"""The quality–speed frontier at equal device counts (``+experiment=frontier``).

For each device count D in ``study.frontier``, every study point that fits on D devices is a
candidate (a method on fewer devices can always run on more). A point is on the *front* for
a quality measure when no other candidate is at least as fast and at least as good with one
of the two strictly better: PSNR against the sequential samples (higher is better) and ΔFD
against the sequential sampler (lower is better), both by their means; the intervals are
printed beside them, so a front decided inside overlapping intervals can be seen as such.
Speed is ``predicted_speedup_comm`` (``experiments/speed.py``: this machine's FLOP rate,
communication included).
"""
from __future__ import annotations

from pathlib import Path

from experiments import atomic
from experiments import quality as Q

SPEED = "predicted_speedup_comm"


def family(row: dict) -> str:
    """The method a point belongs to (the plots' colours, the tables' first column)."""
    if row.get("cache"):
        return "step cache"
    if row["n"] == 1:
        return "CFG-parallel" if row.get("cfg_parallel") else "sequential (fewer steps)"
    if row.get("cfg_parallel"):
        return "hybrid (CFG × AsyncDiff)"
    return "AsyncDiff + cool-down" if row.get("cooldown") else "AsyncDiff"


def pareto(points: list[tuple[float, float]]) -> list[int]:
    """Indices of the points (speed, quality; both higher is better) that no other point
    dominates. (Written here: a dozen points need no library; scipy has no Pareto front.)"""
    front = []
    for i, (s, q) in enumerate(points):
        if not any((s2 >= s and q2 >= q) and (s2 > s or q2 > q)
                   for j, (s2, q2) in enumerate(points) if j != i):
            front.append(i)
    return sorted(front, key=lambda i: points[i][0])


def fronts(rows: list[dict], device_counts: list[int]) -> list[dict]:
    """Per device count: the candidates and the indices (into ``rows``) on each front."""
    out = []
    for dev in sorted(device_counts):
        idx = [i for i, r in enumerate(rows) if r["devices"] <= dev]
        psnr = pareto([(rows[i][SPEED], rows[i]["psnr_db"][0]) for i in idx])
        fd = pareto([(rows[i][SPEED], -rows[i]["fd_delta"][0]) for i in idx])
        out.append({"devices": dev, "candidates": idx, "psnr_front": [idx[k] for k in psnr],
                    "fd_front": [idx[k] for k in fd]})
    return out


def dominated_by(rows: list[dict], i: int, front: list[int], key: str, sign: int):
    """The front point that is at least as fast as row ``i`` and best on ``key``, and its
    margin (``sign`` = −1 when lower is better); None when ``i`` is on the front."""
    if i in front:
        return None
    better = [j for j in front if rows[j][SPEED] >= rows[i][SPEED]]
    if not better:
        return None
    j = max(better, key=lambda j: sign * rows[j][key][0])
    return j, sign * (rows[j][key][0] - rows[i][key][0])


def markdown(rows: list[dict], result: list[dict], title: str) -> str:
    lines = [f"**{title}** — {rows[0]['samples']} samples per point; speed predicted "
             "(FLOPs at this machine's measured rate, loopback communication included), "
             "against the sequential sampler at the full step count on one device. "
             "● on the front, otherwise the front point at least as fast that beats it "
             "and by how much.", ""]
    for fr in result:
        lines += [f"### {fr['devices']} device{'s' if fr['devices'] > 1 else ''}", "",
                  "| method | point | devices | speedup | PSNR dB [95% CI] | PSNR front | "
                  "ΔFD [95% CI] | ΔFD front |", "|" + "---|" * 8]
        for i in sorted(fr["candidates"], key=lambda i: rows[i][SPEED]):
            r = rows[i]
            cells = []
            for front, key, sign, unit in ((fr["psnr_front"], "psnr_db", 1, "dB"),
                                           (fr["fd_front"], "fd_delta", -1, "")):
                dom = dominated_by(rows, i, front, key, sign)
                cells.append("●" if i in front else
                             f"{rows[dom[0]]['point']} ({dom[1]:+.2f}{unit})" if dom else "")
            lines.append(f"| {family(r)} | {r['point']} | {r['devices']} | {r[SPEED]:.2f}x | "
                         f"{Q.fmt_ci(r['psnr_db'], 1)} | {cells[0]} | "
                         f"{Q.fmt_ci(r['fd_delta'], 2)} | {cells[1]} |")
        lines.append("")
    return "\n".join(lines)


def exact(row: dict, key: str) -> bool:
    """Whether a point is exact on ``key``: every sample's PSNR at the cap (identical to the
    sequential sampler's: CFG-parallel, the sequential sampler itself)."""
    return key == "psnr_db" and row["psnr_capped_fraction"] == 1.0


def figure(rows: list[dict], result: list[dict], title: str):
    """PSNR and ΔFD against predicted speedup, one column per device count, fronts joined;
    exact points at the top of the PSNR axis, marked "exact" (``plots.exact_at_top``)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from experiments.plots import exact_at_top

    fams = sorted({family(r) for r in rows})
    colours = {f: plt.get_cmap("tab10")(k) for k, f in enumerate(fams)}
    cols = len(result)
    fig, axes = plt.subplots(2, cols, figsize=(3.2 * cols, 6.2), squeeze=False)
    for c, fr in enumerate(result):
        for r_ax, (key, front, name) in enumerate((("psnr_db", fr["psnr_front"], "PSNR (dB)"),
                                                   ("fd_delta", fr["fd_front"], "ΔFD"))):
            ax = axes[r_ax][c]
            for i in fr["candidates"]:
                r = rows[i]
                if exact(r, key):
                    continue  # drawn at the top of the axis, below
                m, lo, hi = r[key]
                ax.errorbar(r[SPEED], m, yerr=[[m - lo], [hi - m]], fmt="o", ms=4,
                            color=colours[family(r)], capsize=2,
                            mfc="none" if i not in front else colours[family(r)])
            top = exact_at_top(ax, [(rows[i][SPEED], colours[family(rows[i])], i in front,
                                     "exact") for i in fr["candidates"] if exact(rows[i], key)])
            line = [(rows[i][SPEED], top if exact(rows[i], key) else rows[i][key][0])
                    for i in front]
            if line:
                ax.plot(*zip(*line), color="black", lw=0.8, ls="--")
            ax.set_title(f"{fr['devices']} device(s)", fontsize=8)
            ax.set_xlabel("predicted speedup (x)", fontsize=7)
            ax.set_ylabel(name, fontsize=7)
            ax.tick_params(labelsize=6)
            ax.grid(alpha=0.3)
    handles = [plt.Line2D([], [], marker="o", ls="", color=colours[f], label=f) for f in fams]
    fig.legend(handles=handles, loc="lower center", ncol=len(fams), fontsize=7)
    fig.suptitle(f"{title}: filled = on the front (dashed); ▲ exact (PSNR capped at "
                 f"{Q.PSNR_CAP:g} dB), at the top of the axis", fontsize=9)
    fig.tight_layout(rect=(0, 0.05, 1, 1))
    return fig


def plot(rows: list[dict], result: list[dict], path: Path, title: str) -> None:
    """:func:`figure`, saved to ``path``."""
    import matplotlib.pyplot as plt

    fig = figure(rows, result, title)
    atomic.save_figure(fig, path, dpi=110)
    plt.close(fig)


def write(rows: list[dict], device_counts: list[int], out: Path, title: str) -> list[dict]:
    """frontier.md, frontier.json and frontier.png in ``out``; returns the fronts."""
    result = fronts(rows, device_counts)
    atomic.write_text(out / "frontier.md", markdown(rows, result, title) + "\n")
    atomic.write_json(out / "frontier.json", {"speed": SPEED, "fronts": [
        {**fr, "psnr_front": [rows[i]["point"] for i in fr["psnr_front"]],
         "fd_front": [rows[i]["point"] for i in fr["fd_front"]],
         "candidates": [rows[i]["point"] for i in fr["candidates"]]} for fr in result]})
    plot(rows, result, out / "frontier.png", title)
    return result
