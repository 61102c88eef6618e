"""The quality study on a trained reference model: the paper's Tables 1, 2 and 7 at small
scale, plus the similarity of stage inputs between steps (the paper's premise).

    python -m experiments.study +experiment=quality_table1                 # digits (default)
    python -m experiments.study +experiment=quality_table1 model=patches study.samples=240
    python -m experiments.study +experiment=quality_similarity

An experiment (``conf/experiment/quality_*.yaml``) names its points as a sweep
(``hydra.sweeper.params``, the cartesian product, as ``asyncdiff-run -m`` runs them) and/or a
list (``study.points``, each a list of overrides). Every point samples the same
``study.samples`` images (labels 0, 1, … cyclically; noise by chunk from ``seed + chunk``) with
the emulator, whose numerics equal the distributed runtime's (the tests hold them bit-exact),
and is compared with the sequential sampler at ``scheduler.steps`` on the same noise and
labels. Measures and their limits: [Note: quality metrics] in ``experiments/quality.py``.

Samples are cached per point and chunk under ``study.cache`` (a rerun, or a larger
``study.samples``, reuses them). Results go to ``study.out/<model>/<experiment>/``:
``results.json``, ``results.csv``, ``table.md`` and plots.
"""
from __future__ import annotations

import functools
import hashlib
import json
import logging
import os
import time
from pathlib import Path

import hydra
import torch
from hydra.core.hydra_config import HydraConfig
from hydra.core.override_parser.overrides_parser import OverridesParser
from omegaconf import DictConfig, OmegaConf
from threadpoolctl import threadpool_limits

from asyncdiff.denoiser import PipelineDenoiser, SequentialDenoiser
from asyncdiff.emulate import Emulator
from asyncdiff.inputs import model_env
from asyncdiff.guidance import GuidanceSplit
from experiments import atomic
from experiments import frontier as fr
from experiments import quality as Q
from experiments.build import compiled_model, guidance_of, model_config
from experiments.checks import check_config, resolved
from experiments.cli import checked, sweep_points
from experiments.common import CONF_DIR, ConfigError, exit_on_bad_input, plain
from experiments.speed import measured_ms_per_flop, point_schedule, point_speed
from experiments.plots import stage_similarity, study_quality
from experiments.reference import model as R
from experiments import zoo
from schedulers import make_scheduler, sample

log = logging.getLogger(__name__)

POINT_KEYS = ("parallel.n", "parallel.stride", "parallel.warmup", "parallel.time_shift",
              "parallel.stride_noise", "parallel.cooldown", "parallel.sync",
              "parallel.cfg_parallel", "parallel.cache_interval", "partition.strategy",
              "scheduler.steps")
STRATEGY = "balanced"  # the study's split (conf/study.yaml); a point may name another


def points_of(cfg: DictConfig, sweep_params) -> list[list[str]]:
    """The experiment's points: ``study.points``, then its sweep's cartesian product."""
    pts = [list(p) for p in cfg.study.points or []]
    pts += sweep_points([], sweep_params) if sweep_params else []
    if not pts:
        raise ConfigError("study: no points; give hydra.sweeper.params or study.points "
                          "(e.g. +experiment=quality_table1)")
    return pts


def point_config(cfg: DictConfig, overrides: list[str]) -> DictConfig:
    """``cfg`` with one point's overrides applied (only :data:`POINT_KEYS` may vary)."""
    out = OmegaConf.create(OmegaConf.to_container(cfg, resolve=True))
    for o in OverridesParser.create().parse_overrides(overrides):
        key = o.key_or_group
        if key not in POINT_KEYS:
            raise ConfigError(f"study point override {key!r}; allowed: {', '.join(POINT_KEYS)}")
        OmegaConf.update(out, key, o.value(), merge=False)
    check_config(plain(out), entry="plan")
    return out


def describe(p: DictConfig) -> dict:
    """A point as plain values; N = 1 is the sequential sampler, or CFG-parallel (the other
    keys normalised); a step cache keeps only its interval and split."""
    par, strategy = plain(p.parallel), plain(p.partition)["strategy"]  # enums as names
    steps = int(p.scheduler.steps)
    cfgp = {"cfg_parallel": True} if par.get("cfg_parallel") else {}
    if int(par["n"]) == 1:
        return {"n": 1, "stride": 1, "warmup": 0, "time_shift": False,
                "stride_noise": "fresh", "steps": steps, **cfgp}
    if par.get("cache_interval"):  # one device: the timeline has no N/S/W choices
        return {"n": int(par["n"]), "stride": 1, "warmup": 1, "time_shift": False,
                "stride_noise": "fresh", "steps": steps,
                "cache": int(par["cache_interval"]), "strategy": str(strategy)}
    d = {"n": int(par["n"]), "stride": int(par["stride"]), "warmup": int(par["warmup"]),
         "time_shift": bool(par["time_shift"]), "stride_noise": str(par["stride_noise"]),
         "steps": steps}
    # only when used: the cache keys of the other points stay
    if par.get("cooldown"):
        d["cooldown"] = int(par["cooldown"])
    if par.get("sync"):
        d["sync"] = sorted(int(k) for k in par["sync"])
    if str(strategy) != STRATEGY:
        d["strategy"] = str(strategy)
    return {**d, **cfgp}


def label(d: dict) -> str:
    if d["n"] == 1:
        return ("CFG-parallel" if d.get("cfg_parallel") else "sequential") + \
            f", {d['steps']} steps"
    if d.get("cache"):
        return f"step cache K={d['cache']} ({d['strategy']} N={d['n']}), {d['steps']} steps"
    s = ("hybrid CFG × " if d.get("cfg_parallel") else "") + \
        f"N={d['n']} S={d['stride']} W={d['warmup']}"
    s += ", time shift" if d["time_shift"] else ""
    s += f", {d['stride_noise']}" if d["stride_noise"] != "fresh" else ""
    s += f", C={d['cooldown']}" if d.get("cooldown") else ""
    s += f", sync {d['sync']}" if d.get("sync") else ""
    s += f", {d['strategy']}" if d.get("strategy") else ""
    return s + f", {d['steps']} steps"



# --------------------------------------------------------------------------- sampling


class Sampler:
    """Samples chunks of a study's images for any point, with one capture of the model at
    the chunk's batch (plans per N are cached)."""

    def __init__(self, cfg: DictConfig):
        self.cfg, self.model_cfg = cfg, plain(cfg.model)
        self.tokens = R.reference_tokens(self.model_cfg)
        self.classes = self.tokens.null_class
        self.schedule = R.scheduler_kwargs(self.model_cfg, cfg.scheduler.name)
        self.guidance = guidance_of(cfg)
        self.chunk = int(cfg.study.chunk)
        self.device = torch.device(cfg.study.device)
        self._compiled: dict[tuple, object] = {}
        self.shape = None

    @functools.cached_property
    def weights_hash(self) -> str:
        """sha256 of the model's parameters and buffers as built (the shipped weights)."""
        h = hashlib.sha256()
        module = zoo.build(model_config(self.cfg), seed=int(self.cfg.seed)).module
        for k, t in sorted(module.state_dict().items()):
            h.update(k.encode())
            h.update(t.detach().cpu().reshape(-1).contiguous().view(torch.uint8).numpy().tobytes())
        return h.hexdigest()[:16]

    def compiled(self, n: int, strategy: str = STRATEGY, half: bool = False):
        """The plan at N for the chunk's CFG batch [uncond, cond] (2 × chunk rows), or with
        ``half`` for one guidance half (chunk rows: CFG-parallel runs each half alone)."""
        key = (n, strategy, half)
        if key not in self._compiled:
            c = OmegaConf.create(OmegaConf.to_container(self.cfg, resolve=True))
            OmegaConf.update(c, "parallel.n", n, merge=False)
            OmegaConf.update(c, "partition.strategy", strategy, merge=False)
            OmegaConf.update(c, "parallel.cfg_parallel", half, merge=False)
            OmegaConf.update(c, "batch", self.chunk, merge=False)
            bundle, self._compiled[key] = compiled_model(c)
            self._compiled[key].staged.to(self.device)
            self.shape = next(s.shape for s in bundle.specs if s.role == "latent")[1:]
        return self._compiled[key]

    @functools.cached_property
    def ms_per_flop(self) -> float:
        """This machine's rate for the whole model at the chunk's batch (chunk 0's inputs),
        measured once and kept in the sample cache: a rerun gives the same table."""
        import diffusers
        key = json.dumps({"weights": self.weights_hash, "chunk": self.chunk,
                          "device": self.device.type, "threads": torch.get_num_threads(),
                          "torch": torch.__version__, "diffusers": diffusers.__version__},
                         sort_keys=True)
        path = Path(self.cfg.study.cache) / self.model_cfg["name"] / \
            f"rate-{hashlib.sha256(key.encode()).hexdigest()[:16]}.json"
        if path.is_file():
            return float(json.loads(path.read_text())["ms_per_flop"])
        compiled = self.compiled(1)
        cond, uncond = R.conditioning(self.tokens, self.labels(0))
        x = self.noise(0).to(self.device)
        both = {k: torch.cat([uncond[k], cond[k]]).to(self.device) for k in cond}
        rate = measured_ms_per_flop(compiled.staged, compiled.plan, torch.cat([x, x]), 500.0,
                                    both)
        atomic.write_json(path, {"ms_per_flop": rate, "key": json.loads(key)})
        return rate

    def plan_of(self, d: dict):
        """The compiled model point ``d`` runs (its plan is in the point's cache key)."""
        return self.compiled(max(d["n"], 1), d.get("strategy", STRATEGY),
                             bool(d.get("cfg_parallel")))

    def labels(self, chunk: int) -> torch.Tensor:
        return torch.arange(chunk * self.chunk, (chunk + 1) * self.chunk) % self.classes

    def noise(self, chunk: int) -> torch.Tensor:
        g = torch.Generator().manual_seed(int(self.cfg.seed) + chunk)
        return torch.randn((self.chunk, *self.shape), generator=g)

    def denoiser(self, d: dict, recorder=None, half: bool = False):
        """Point ``d``'s denoiser: the sequential model, a pipeline or a step cache on the
        emulator; with CFG-parallel one of those per guidance half (asyncdiff/guidance.py),
        each on the plan for one half."""
        if d.get("cfg_parallel") and not half:
            if recorder is not None:
                raise ValueError("a recorder records the sequential sampler's batched calls; "
                                 "allowed: a point without cfg_parallel")
            return GuidanceSplit([self.denoiser(d, half=True) for _ in range(2)])
        compiled = self.plan_of(d)
        if d["n"] == 1:
            return recorder or SequentialDenoiser(compiled.staged)
        scheduler = make_scheduler(self.cfg.scheduler.name, **self.schedule)
        scheduler.set_timesteps(d["steps"])
        tl = point_schedule(d).timeline(d["steps"])
        return PipelineDenoiser(Emulator(compiled.staged, compiled.plan, tl,
                                         scheduler.timesteps))

    def run(self, d: dict, chunk: int, recorder=None) -> torch.Tensor:
        if self.shape is None:
            self.plan_of(d)
        scheduler = make_scheduler(self.cfg.scheduler.name, **self.schedule)
        denoiser = self.denoiser(d, recorder)
        cond, uncond = (to(c, self.device) for c in R.conditioning(self.tokens, self.labels(chunk)))
        return sample(denoiser, scheduler, self.noise(chunk).to(self.device), cond,
                      steps=d["steps"], guidance_scale=self.guidance, uncond=uncond).cpu()


def to(tensors: dict[str, torch.Tensor], device: torch.device) -> dict[str, torch.Tensor]:
    return {k: v.detach().to(device) for k, v in tensors.items()}


def use_device(name: str) -> None:
    """Check ``study.device`` and make CUDA deterministic: no TF32 (the model is fp32 on CPU
    too), no autotuned or nondeterministic kernels, so a W = T point still equals sequential."""
    if name not in ("cpu", "cuda"):
        raise ConfigError(f"study.device={name!r}; allowed: cpu, cuda")
    if name == "cuda":
        if not torch.cuda.is_available():
            raise ConfigError("study.device=cuda: no CUDA device here; allowed: cpu")
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.backends.cuda.matmul.allow_tf32 = False
        torch.backends.cudnn.allow_tf32 = False
        torch.backends.cudnn.benchmark = False
        torch.backends.cudnn.deterministic = True
        torch.use_deterministic_algorithms(True)


def cache_key(sampler: Sampler, d: dict) -> dict:
    """Everything that changes a point's samples: the point, the model's weights (their hash),
    the split (the plan's hash covers strategy, boundaries, depth, slack, cost model and the
    captured graph), the sampler and its schedule options, the device and the library
    versions. A retrained model or another split never reuses old samples."""
    import diffusers

    plan = sampler.plan_of(d).plan
    return {**d, "model": sampler.model_cfg["name"], "weights": sampler.weights_hash,
            "split": plan.plan_hash, "seed": int(sampler.cfg.seed), "chunk": sampler.chunk,
            "guidance": sampler.guidance, "scheduler": sampler.cfg.scheduler.name,
            "schedule": sampler.schedule, "device": sampler.device.type,
            "torch": torch.__version__, "diffusers": diffusers.__version__}


def cache_tag(sampler: Sampler, d: dict) -> str:
    """The name point ``d``'s samples are cached under: ``<cache>/<model>/<tag>-<chunk>.pt``."""
    key = json.dumps(cache_key(sampler, d), sort_keys=True, default=str)
    return hashlib.sha256(key.encode()).hexdigest()[:16]


def cached_samples(sampler: Sampler, d: dict, chunks: int, cache: Path) -> torch.Tensor:
    """All chunks of point ``d``: from the cache, or sampled and then cached."""
    tag = cache_tag(sampler, d)
    out = []
    for c in range(chunks):
        path = cache / f"{tag}-{c}.pt"
        if path.is_file():
            out.append(torch.load(path))
            continue
        t0 = time.perf_counter()
        x = sampler.run(d, c)
        atomic.save_torch(x, path)  # per-process temporary: concurrent studies share the cache
        log.info("%s: chunk %d/%d in %.0f s", label(d), c + 1, chunks, time.perf_counter() - t0)
        out.append(x)
    return torch.cat(out)


# --------------------------------------------------------------------------- similarity


class RecordingDenoiser:
    """The sequential sampler's denoiser that also keeps, per step, every value crossing a
    cut of ``plan`` (what stage n ≥ 1 reads: stale in the pipeline) and the latent."""

    def __init__(self, staged, plan, keep: int):
        self.staged, self.plan, self.keep = staged, plan, keep
        self.cross = [v.name for v in plan.values]
        self.steps: list[dict[str, torch.Tensor]] = []

    def __call__(self, x, t, step, cond):
        with torch.no_grad():
            env = self.staged.prepare(model_env(self.staged.specs, self.staged.placeholders, x,
                                                t, cond))
            for seg in self.staged.segments:
                env.update(seg(env))
            # the last ``keep`` rows: the conditional half of the CFG batch [uncond, cond]
            rec = {name: env[name][-self.keep:].to("cpu", copy=True) for name in self.cross}
            rec["<latent>"] = x[-self.keep:].to("cpu", copy=True)
            self.steps.append(rec)
            return env[self.staged.output]


def similarity(sampler: Sampler, n: int, steps: int) -> dict:
    """Cosine similarity and relative change of each stage's input between consecutive steps
    of the sequential sampler (one chunk; the CFG batch's cond half), for the plan at ``n``."""
    compiled = sampler.compiled(n)
    half = sampler.chunk  # CFG batch [uncond, cond]: the last ``chunk`` rows are cond
    rec = RecordingDenoiser(compiled.staged, compiled.plan, half)
    sampler.run({"n": 1, "steps": steps}, 0, recorder=rec)
    plan = compiled.plan
    inputs = {0: ["<latent>"]}
    for st in plan.stages[1:]:
        inputs[st.index] = list(st.inputs)
    per_stage = {}
    for s, names in inputs.items():
        def vec(k):
            return torch.cat([rec.steps[k][nm].flatten(1).double() for nm in names], 1)
        cos, rel = [], []
        for k in range(1, steps):
            a, b = vec(k - 1), vec(k)
            cos.append(float(Q.cosine_per_sample(b, a).mean()))
            rel.append(float(((b - a).norm(dim=1) / b.norm(dim=1)).mean()))
        per_stage[s] = {"inputs": names, "cosine": cos, "relative_change": rel}
    return {"n": n, "steps": steps, "samples": half, "stages": per_stage}


# --------------------------------------------------------------------------- the study


def evaluate_point(images, ref, labels, real_feats, feats, ref_feats, d, sampler,
                   cfg) -> dict:
    """One table row: predicted speedups and the busiest device's MACs per image
    (``experiments/speed.py``); consistency with the sequential samples, FD, accuracy."""
    st = cfg.study
    row = {"point": label(d), **d, "samples": len(images)}
    half = bool(d.get("cfg_parallel"))
    row.update(point_speed(d, sampler.plan_of(d).plan, sampler.compiled(1, half=half).plan,
                           sampler.compiled(1).plan, int(cfg.scheduler.steps), int(st.chunk),
                           sampler.ms_per_flop))
    row["ms_per_flop"] = sampler.ms_per_flop
    psnr = Q.psnr_per_sample(images, ref)
    rel = Q.relative_l2_per_sample(images, ref)
    row["psnr_db"] = Q.bootstrap_ci(psnr.numpy(), resamples=st.bootstrap)
    row["psnr_capped_fraction"] = float((psnr >= Q.PSNR_CAP).double().mean())
    row["relative_l2"] = Q.bootstrap_ci(rel.numpy(), resamples=st.bootstrap)
    hit = (R.classify(cfg_classifier(cfg), images) == labels).double()
    row["accuracy"] = Q.bootstrap_ci(hit.numpy(), resamples=st.bootstrap)
    nfd = len(real_feats)
    row["fd"] = Q.frechet_distance(feats[:nfd], real_feats)
    row["fd_delta"] = Q.frechet_delta_ci(feats[:nfd], ref_feats[:nfd], real_feats,
                                         resamples=st.fd_bootstrap)
    row["fd_samples"] = nfd
    return row


_CLASSIFIERS: dict[str, torch.nn.Module] = {}


def cfg_classifier(cfg: DictConfig) -> torch.nn.Module:
    name = cfg.model.name
    if name not in _CLASSIFIERS:
        _CLASSIFIERS[name] = R.reference_classifier(plain(cfg.model))
    return _CLASSIFIERS[name]


def write_outputs(rows: list[dict], floor, sim: dict | None, out: Path, title: str,
                  device: str = "cpu") -> None:
    out.mkdir(parents=True, exist_ok=True)
    meta = {"device": device, "torch": torch.__version__, "threads": torch.get_num_threads()}
    atomic.write_json(out / "results.json", {"rows": rows, "fd_real_floor": floor,
                                             "similarity": sim, **meta})
    if rows:
        flat = [{k: (v[0] if isinstance(v, (list, tuple)) and len(v) == 3 else v)
                 for k, v in r.items()} for r in rows]
        fields = list(dict.fromkeys(k for r in flat for k in r))
        atomic.write_csv(out / "results.csv", flat, fields)
        atomic.write_text(out / "table.md", markdown_table(rows, floor, title) + "\n")
        study_quality(rows, floor, out / "quality.png", title)
    if sim:
        stage_similarity(sim, out / "similarity.png", title)


def markdown_table(rows: list[dict], floor, title: str) -> str:
    head = ("| point | devices | predicted speedup | GMACs/device/image | PSNR dB [95% CI] | "
            "rel. L2 [95% CI] | FD | ΔFD vs sequential [95% CI] | accuracy [95% CI] |")
    lines = [f"**{title}** — {rows[0]['samples']} samples per row; FD on "
             f"{rows[0]['fd_samples']} samples, real-vs-real floor at the same n: {floor:.2f}",
             "", head, "|" + "---|" * 9]
    for r in rows:
        macs = f"{r['macs_per_device_g']:.3f}"
        lines.append(f"| {r['point']} | {r['devices']} | {r['predicted_speedup']:.2f}x | {macs} | "
                     f"{Q.fmt_ci(r['psnr_db'], 1)} | {Q.fmt_ci(r['relative_l2'], 4)} | "
                     f"{r['fd']:.2f} | {Q.fmt_ci(r['fd_delta'], 2)} | "
                     f"{Q.fmt_ci(r['accuracy'], 3)} |")
    return "\n".join(lines)


@hydra.main(config_path=CONF_DIR, config_name="study", version_base="1.3")
@exit_on_bad_input
def hydra_main(cfg: DictConfig) -> None:
    cfg = resolved(cfg, "plan")
    st = cfg.study
    torch.set_num_threads(int(st.threads))
    threadpool_limits(int(st.threads))  # numpy's BLAS too (FD): studies run side by side
    use_device(str(st.device))
    model_cfg = plain(cfg.model)
    if not R.is_reference(model_cfg):
        raise ConfigError(f"model={cfg.model.name}: the study needs a trained reference model; "
                         "allowed: digits, patches")
    samples, chunk = int(st.samples), int(st.chunk)
    if samples % chunk:
        raise ConfigError(f"study.samples={samples}: must be a multiple of study.chunk={chunk}")
    chunks = samples // chunk
    params = HydraConfig.get().sweeper.get("params") if HydraConfig.initialized() else None
    name = st.name or "study"
    out = Path(st.out) / cfg.model.name / name
    cache = Path(st.cache) / cfg.model.name
    sampler = Sampler(cfg)
    title = f"{cfg.model.name}: {name}"
    sim = None
    if st.similarity:
        sim = similarity(sampler, int(st.similarity), int(cfg.scheduler.steps))
    rows = []
    floor = None
    points = points_of(cfg, params) if (params or st.points) else []
    if points:
        ref_d = describe(point_config(cfg, ["parallel.n=1"]))
        ref = cached_samples(sampler, ref_d, chunks, cache)
        labels = torch.cat([sampler.labels(c) for c in range(chunks)])
        reference = R.load(model_cfg)
        nfd = min(int(st.fd_samples), samples)
        real_feats = reference.features(reference.data.real(nfd, 0)).numpy()
        floor = Q.frechet_distance(reference.features(reference.data.real(nfd, 1)).numpy(),
                                   real_feats)
        ref_feats = reference.features(ref).numpy()
        for overrides in points:
            p = point_config(cfg, overrides)
            d = describe(p)
            images = ref if d == ref_d else cached_samples(sampler, d, chunks, cache)
            row = evaluate_point(images, ref, labels, real_feats,
                                 reference.features(images).numpy(), ref_feats, d, sampler, cfg)
            row["cache_tag"] = cache_tag(sampler, d)  # its samples: <cache>/<tag>-<chunk>.pt
            rows.append(row)
            log.info("%s: PSNR %s dB, FD %.2f (vs sequential %s), accuracy %s", row["point"],
                     Q.fmt_ci(row["psnr_db"], 1), row["fd"], Q.fmt_ci(row["fd_delta"], 2),
                     Q.fmt_ci(row["accuracy"], 3))
    write_outputs(rows, floor, sim, out, title, sampler.device.type)
    if rows and st.frontier:
        fr.write(rows, list(st.frontier), out, title)
        print((out / "frontier.md").read_text())
    elif rows:
        print(markdown_table(rows, floor, title))
    log.info("wrote %s", out)


main = checked(hydra_main, "study")

if __name__ == "__main__":
    main()
