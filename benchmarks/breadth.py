"""Breadth: every denoiser the zoo describes, compiled and verified at N = 2, 3, 4.

    python benchmarks/breadth.py [--models NAME ...] [--out docs/breadth.md]

For every tiny model YAML (``conf/model/*.yaml`` and ``conf/model/zoo/*.yaml``: one per
denoiser class diffusers ships) and the hand-written networks of ``benchmarks/handwritten.py``,
it compiles the model at N = 2, 3, 4 (FLOP cost model, depth 4, finer where a model has too few
blocks) with verification on, and records: the backend used, whether the stages equal the eager
model bit for bit at each N, the imbalance with the conditioning each stage runs, the bytes sent
per step, the parameters each stage holds, what is computed once per run, and the planning
time. A compile that fails is a row with its error, never a silent gap. Writes the table (Markdown)
and the raw records (``docs/results/breadth.json``).
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
import traceback
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # run as a script from anywhere

from benchmarks.handwritten import handwritten  # noqa: E402
from experiments import zoo  # noqa: E402
from partition import CaptureError, PartitionRequest, RequestError, capture  # noqa: E402
from partition import compile_model  # noqa: E402

NS = (2, 3, 4)


def model_files() -> list[Path]:
    return sorted((ROOT / "conf" / "model").glob("*.yaml")) + \
        sorted((ROOT / "conf" / "model" / "zoo").glob("*.yaml"))


def entries(names: list[str] | None):
    for path in model_files():
        cfg = zoo.load_yaml(path)
        if cfg.get("reference"):
            continue  # the trained reference models are not diffusers classes
        name = cfg["name"] if path.parent.name == "model" else f"zoo/{cfg['name']}"
        if names and name not in names:
            continue
        yield name, lambda cfg=cfg: _bundle(cfg), cfg.get("description", "")
    for name, (model, specs, desc) in handwritten().items():
        if names and name not in names:
            continue
        yield name, lambda m=model, s=specs: (m, s, zoo.example_inputs(list(s), 0), None), desc


def _bundle(cfg):
    b = zoo.build(cfg, "tiny", seed=0)
    return b.module, b.specs, b.inputs(0), b.contract


def compile_at(model, specs, inputs, contract, n: int, captured):
    """Verified plan at depth 4, or finer where the model has too few blocks there; on the
    model's one capture (``captured`` None: the module backend)."""
    for depth in (4, None):
        try:
            return compile_model(model, specs, inputs, PartitionRequest(n=n, depth=depth),
                                 contract=contract, name="m", captured=captured,
                                 backend="module" if captured is None else "graph"), depth
        except RequestError:
            if depth is None:
                raise
    raise AssertionError("unreachable")


def row(name: str, make, description: str) -> dict:
    torch.set_num_threads(1)
    rec = {"model": name, "description": description}
    try:
        model, specs, inputs, contract = make()
    except Exception as err:  # noqa: BLE001 - recorded in the table
        rec["error"] = f"build: {type(err).__name__}: {str(err).splitlines()[0]}"
        return rec
    rec["class"] = type(model).__name__
    rec["params"] = sum(p.numel() for p in model.parameters())
    t0 = time.perf_counter()
    try:
        captured = capture(model, specs, inputs, contract)
    except CaptureError:
        captured = None
    except Exception as err:  # noqa: BLE001 - recorded in the table
        rec["error"] = f"capture: {type(err).__name__}: {str(err).splitlines()[0]}"
        return rec
    rec["capture_s"] = round(time.perf_counter() - t0, 2)
    for n in NS:
        t0 = time.perf_counter()
        try:
            with torch.no_grad():
                c, depth = compile_at(model, specs, inputs, contract, n, captured)
        except Exception as err:  # noqa: BLE001 - recorded in the table
            rec[f"n{n}"] = {"error": f"{type(err).__name__}: {str(err).strip().splitlines()[0]}",
                            "trace": traceback.format_exc(limit=3)}
            continue
        p = c.plan
        rec["backend"] = p.backend
        rec[f"n{n}"] = {
            "seconds": round(time.perf_counter() - t0, 2), "depth": depth,
            "exact": p.verification.startswith("exact"), "verification": p.verification,
            "imbalance": p.imbalance, "bytes_per_step": p.bytes_per_step,
            "stage_params": [st.params + st.replicated_params for st in p.stages],
            "hoisted": len(p.hoisted), "hoisted_sent": sum(h.home >= 0 for h in p.hoisted),
            "functionalized": bool(getattr(getattr(c.graph, "captured", None),
                                           "functionalized", False)),
            "counted_on": getattr(getattr(c.graph, "costs", None), "counted_on", "eager"),
            "notes": list(p.notes)}
    return rec


def markdown(records: list[dict], command: str) -> str:
    lines = [
        "# Breadth: every denoiser, compiled and verified",
        "",
        f"Written by `{command}` (raw records: `docs/results/breadth.json`). Tiny configs",
        "with random weights (`conf/model/*.yaml`, `conf/model/zoo/*.yaml`) and three",
        "hand-written networks (`benchmarks/handwritten.py`); FLOP cost model, depth 4 (finer",
        "where a model has too few blocks), one thread. *exact*: the stages chained equal the",
        "eager model bit for bit on the example inputs (the compile's own verification);",
        "*imbalance*: slowest stage over the mean, each stage's per-step conditioning",
        "included; *MiB/step*: bytes sent per step (cross-stage values point-to-point, ε to",
        "every device); *params/stage*: thousands of parameters each stage holds;",
        "*once/run*: values hoisted out of the loop (sent from one home stage); *s*: capture",
        "(once per model) + planning and verification at N = 4.",
        "",
        "| model | class | backend | exact N=2,3,4 | imbalance N=2/3/4 | MiB/step N=4 | "
        "params/stage N=4 (k) | once/run | s |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    ok = 0
    for r in records:
        if "error" in r:
            lines.append(f"| {r['model']} | | | build failed: {r['error']} | | | | | |")
            continue
        cells = [r.get(f"n{n}", {}) for n in NS]
        exact = " ".join("✓" if c.get("exact") else ("✗" if "error" not in c else "error")
                         for c in cells)
        ok += all(c.get("exact") for c in cells)
        imb = "/".join(f"{c['imbalance']:.2f}" if "imbalance" in c else "–" for c in cells)
        last = cells[-1]
        if "error" in last:
            tail = f"{last['error'][:160]} | | | |"
        else:
            tail = (f"{last['bytes_per_step'] / 2**20:.3f} | "
                    f"{', '.join(str(round(x / 1e3)) for x in last['stage_params'])} | "
                    f"{last['hoisted']} ({last['hoisted_sent']}) | "
                    f"{r.get('capture_s', 0)} + {last['seconds']}")
        lines.append(f"| {r['model']} | {r.get('class', '')} | {r.get('backend', '')} | {exact} "
                     f"| {imb} | {tail} |")
    errors = [f"- **{r['model']}** N={n}: {r[f'n{n}']['error']}" for r in records for n in NS
              if "error" in r.get(f"n{n}", {})]
    notes = sorted({(r["model"], x) for r in records for n in NS
                    for x in r.get(f"n{n}", {}).get("notes", []) if "module backend" in x})
    lines += ["", f"**{ok} of {len(records)} models exact at N = 2, 3 and 4.**"]
    if errors:
        lines += ["", "## Failures", ""] + errors
    if notes:
        lines += ["", "## Module backend", ""] + [f"- {m}: {x[:300]}" for m, x in notes]
    return "\n".join(lines) + "\n"


def write_atomic(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(text)
    tmp.replace(path)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--models", nargs="*", help="only these (e.g. sd15 zoo/wan)")
    ap.add_argument("--out", default=str(ROOT / "docs" / "breadth.md"))
    ap.add_argument("--json", default=str(ROOT / "docs" / "results" / "breadth.json"))
    args = ap.parse_args()
    records = []
    for name, make, desc in entries(args.models):
        t0 = time.perf_counter()
        records.append(row(name, make, desc))
        r = records[-1]
        status = r.get("error") or " ".join(
            "ok" if r.get(f"n{n}", {}).get("exact") else r.get(f"n{n}", {}).get("error", "?")[:80]
            for n in NS)
        print(f"{name:34s} {r.get('backend', ''):6s} {time.perf_counter() - t0:6.1f} s  {status}",
              flush=True)
    command = "python benchmarks/breadth.py" + (f" --models {' '.join(args.models)}"
                                                if args.models else "")
    write_atomic(Path(args.json), json.dumps(records, indent=1, default=str) + "\n")
    write_atomic(Path(args.out), markdown(records, command))
    print(f"wrote {args.out} and {args.json}")


if __name__ == "__main__":
    main()
