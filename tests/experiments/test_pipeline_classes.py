"""Every pipeline class of ``conf/pipeline`` through the asynchronous path of
``asyncdiff-run pipeline=…``: a tiny complete checkpoint of each (``experiments/checkpoints.py``)
is run by the function every rank of the run executes (:func:`rank_task`: the checkpoint
loaded lazily, each rank reading only its own stage, the distributed drop-in with W < T);
its decoded images equal, bit for bit, those of the same pipeline loaded whole in this
process and run by the emulator (invariant: distributed == emulator), and the two plans are
the same plan. One spawn of two ranks runs all eight classes.
"""
from __future__ import annotations

import numpy as np
import pytest
import torch

from exp_helpers import compose_cfg

from experiments import checkpoints

VIDEO = {"svd", "animatediff"}


def _every_class(rank: int, world: int, cfgs: dict) -> tuple[bytes | None, dict]:
    """One rank: every class in turn, as the run's ranks do (module level: spawned)."""
    from asyncdiff.distributed.launch import from_bytes, to_bytes
    from experiments.pipeline_run import rank_task

    images, plans = {}, {}
    for name, cfg in cfgs.items():
        payload, extra = rank_task(rank, world, cfg)
        if rank == 0:
            images[name], plans[name] = from_bytes(payload), extra["plans"]
    return (to_bytes(images) if rank == 0 else None), plans


class _Configs(dict):
    """Each class's run config, its tiny checkpoint written when first asked for."""

    def __init__(self, root):
        super().__init__()
        self.root = root

    def __missing__(self, name):
        from experiments.checks import resolved
        from experiments.schema import register

        register()
        px = checkpoints.PIXELS
        image = self.root / "cond.png"
        if not image.exists():
            from PIL import Image
            Image.fromarray(np.random.default_rng(0).integers(0, 256, (px, px, 3),
                                                              dtype=np.uint8)).save(image)
        path = checkpoints.save(name, self.root)
        extra = [f"pipeline.image={image}"] if name == "svd" else []
        extra += ["pipeline.frames=2"] if name in VIDEO else []
        cfg = compose_cfg(f"pipeline={name}", f"pipeline.path={path}", f"pipeline.height={px}",
                          f"pipeline.width={px}", "pipeline.warm_call=false",
                          "scheduler.steps=3", "parallel.n=2", "parallel.warmup=1",
                          "parallel.threads=1", "wandb.mode=disabled", *extra)
        self[name] = resolved(cfg, "run")
        return self[name]


@pytest.fixture(scope="module")
def cfgs(tmp_path_factory):
    return _Configs(tmp_path_factory.mktemp("ckpt"))


@pytest.mark.slow
def test_every_class_lazily_loaded_and_distributed_equals_the_emulator(cfgs):
    _lazily_loaded_and_distributed({n: cfgs[n] for n in checkpoints.CHECKPOINTS})


@pytest.mark.slow
def test_sd15_lazily_loaded_gives_the_whole_plan_and_the_emulators_images(cfgs):
    """One class, the same checks (about 35 s: two ranks that load, plan and generate, then
    the sequential and emulated generations here)."""
    _lazily_loaded_and_distributed({"sd15": cfgs["sd15"]})


def _lazily_loaded_and_distributed(cfgs: dict) -> None:
    from asyncdiff import parallelize
    from asyncdiff.distributed.launch import Task, from_bytes, run_ranks
    from experiments.generate import generate, load, request
    from experiments.pipeline_run import dropin_options
    from partition import Plan
    from partition.threads import intra_op_threads

    done = run_ranks(Task(_every_class, cfgs, "gloo", 120.0), 2, 600.0)
    distributed, plans = from_bytes(done[0].payload), done[0].extra
    for name, cfg in cfgs.items():
        req = request(cfg)
        with intra_op_threads(1):
            plain = load(req)
            sequential = generate(plain, req)[0]
            handle = parallelize(plain, mode="emulate", **dropin_options(cfg))
            emulated = generate(plain, req)[0]
        got = distributed[name]
        assert got.shape == emulated.shape and torch.isfinite(got).all(), name
        assert torch.equal(got, emulated), \
            f"{name}: max |distributed - emulated| = {(got - emulated).abs().max():.3g}"
        assert not torch.equal(got, sequential), f"{name}: W=1 ran no stale step"
        lazy = [Plan.from_json(p) for p in plans[name]]
        whole = [s.plan for s in handle.sessions.values()]
        assert len(lazy) == len(whole), name
        for a, b in zip(lazy, whole):
            da, db = a.to_dict(measured=False), b.to_dict(measured=False)
            assert a.plan_hash == b.plan_hash, \
                f"{name}: plans differ in {sorted(k for k in da if da[k] != db.get(k))}"
            assert "loaded lazily" in a.verification and b.verification.startswith("exact")


@pytest.mark.parametrize("options, message", [
    ({"mode": "emulate"}, "mode='emulate'; allowed: distributed"),
    ({"cost_model": "time"}, "cost_model='time'; allowed: flops"),
    ({"backend": "module"}, "backend='module'; allowed: auto, graph"),
])
def test_a_lazily_loaded_denoiser_refuses_what_would_read_its_weights(cfgs, options, message):
    """Nothing may run the hollow weights before the stages are loaded: one line naming the
    key and the allowed values, at the first call, before any capture."""
    from asyncdiff import load_pipeline, parallelize
    from asyncdiff.dropin.lazy import CHECKPOINT_ATTR

    pipe = load_pipeline(cfgs["sd15"]["pipeline"]["path"])
    assert all(p.is_meta for p in pipe.unet.parameters())
    assert hasattr(pipe.unet, CHECKPOINT_ATTR)
    opts = {"mode": "emulate", "n": 2, **options}
    parallelize(pipe, **opts)  # emulate needs no process group; the options are checked here
    with pytest.raises(ValueError, match=message.replace("(", r"\(")):
        pipe(prompt="x", num_inference_steps=2, height=checkpoints.PIXELS,
             width=checkpoints.PIXELS, output_type="pt")
