"""Train a reference model (experiments/reference/: [Note: digits reference model],
[Note: patches reference model]). ``--config-name`` picks ``conf/train/<name>.yaml``.

    python -m experiments.train                        # digits: train or resume, export, measure
    python -m experiments.train --config-name patches      # the natural-image patches model
    python -m experiments.train train.iters=2000           # go on (the cosine is re-stretched)
    python -m experiments.train resume=false               # start over
    python -m experiments.train eval_only=true             # re-measure the shipped weights

The shipped weights were trained on 2 shared cores with
``OMP_WAIT_POLICY=PASSIVE nice -n 19 python -m experiments.train [--config-name patches]
pause_file=/tmp/asyncdiff-bench.lock`` (passive OpenMP threads: on an oversubscribed machine,
spinning threads burn several times the CPU time for the same work).

Reads top to bottom: config -> data -> classifier -> denoiser training loop (checkpoint every
few minutes; rerunning resumes) -> fp16 safetensors at the paths the model YAML names ->
reload them through the model YAML and measure -> results JSON next to the weights.
"""
from __future__ import annotations

import copy
import json
import os
import platform
import time

import diffusers
import hydra
import torch
from diffusers import DDPMScheduler
from diffusers.training_utils import EMAModel
from omegaconf import DictConfig, OmegaConf
from torch import nn
from tqdm import tqdm

from experiments import zoo
from experiments import atomic
from experiments.reference import model as R
from experiments.reference.training import (diffusion_loss, fit_classifier, load_checkpoint,
                                save_checkpoint, warmup_cosine)
from schedulers import make_scheduler

# What a resumed run must share with its checkpoint (the rest may change: iters, eval, ...).
_RESUME_KEYS = ("model", "seed", "classifier")
_RESUME_TRAIN_KEYS = ("batch", "lr", "warmup", "lr_floor", "weight_decay", "p_uncond", "ema")


def check_resumable(ckpt: dict, c: dict) -> None:
    old = ckpt["config"]
    diff = [k for k in _RESUME_KEYS if old[k] != c[k]]
    diff += [f"train.{k}" for k in _RESUME_TRAIN_KEYS if old["train"][k] != c["train"][k]]
    if diff:
        raise SystemExit(f"checkpoint {c['checkpoint']['path']} was made with other "
                         f"{', '.join(diff)}; pass resume=false to start over")


def averaged(model: nn.Module, ema: EMAModel) -> nn.Module:
    """A copy of ``model`` holding the exponential moving average of its weights."""
    out = copy.deepcopy(model).eval().requires_grad_(False)
    ema.copy_to(out.parameters())
    return out


def quick_check(ema: nn.Module, classifier: nn.Module, schedule: dict, q: dict, guidance: float,
                image_shape) -> float:
    """Fraction of a few EMA samples the classifier recognises (progress, not the result)."""
    tokens = ema["tokens"]
    labels = torch.arange(q["samples"]) % tokens.null_class
    images = R.generate(ema["unet"], tokens, make_scheduler("ddim", **schedule), labels,
                        steps=q["steps"], guidance=guidance, seed=1, image_shape=image_shape)
    return float((R.classify(classifier, images) == labels).float().mean())


def file_sizes(model_cfg: dict) -> dict[str, int]:
    paths = [model_cfg["builder"]["weights"], model_cfg["reference"]["class_tokens"],
             model_cfg["reference"]["classifier"]]
    return {p: R.resolve(p).stat().st_size for p in paths}


@hydra.main(config_path="../conf/train", config_name="digits", version_base="1.3")
def main(cfg: DictConfig) -> None:
    c = OmegaConf.to_container(cfg, resolve=True)
    torch.set_num_threads(c["threads"])
    model_cfg = zoo.load_yaml(c["model"])
    ref_paths, schedule = model_cfg["reference"], model_cfg["schedule"]
    evc = c["eval"]

    if c["eval_only"]:
        result = R.evaluate(R.load(c["model"]), samples=evc["samples"], steps=evc["steps"],
                            guidance=evc["guidance"], scheduler=evc["scheduler"])
        print(json.dumps(result, indent=1))
        return

    # ---- data: the training split only; the held-out split is for measuring
    data_cfg = ref_paths["dataset"]
    data_cfg = {"name": data_cfg} if isinstance(data_cfg, str) else dict(data_cfg)
    data = R.dataset(**data_cfg)
    x_test, y_test = data.heldout()
    ckpt_path = c["checkpoint"]["path"]
    ckpt = load_checkpoint(ckpt_path) if c["resume"] else None
    if ckpt is not None:
        check_resumable(ckpt, c)
        print(f"resuming from {ckpt_path} at iteration {ckpt['step']}")

    # ---- the classifier (seconds): the metric for the samples
    classifier = data.make_classifier()
    if ckpt is not None:
        classifier.load_state_dict(ckpt["classifier"])
        classifier_s = ckpt["classifier_s"]
    else:
        torch.manual_seed(c["seed"])
        t0 = time.perf_counter()
        cc = c["classifier"]
        fit_classifier(classifier, *data.train_set(), epochs=cc["epochs"], batch=cc["batch"],
                       lr=cc["lr"], shift=cc["shift"], seed=c["seed"])
        classifier_s = time.perf_counter() - t0
    classifier.eval()
    acc = float((R.classify(classifier, x_test) == y_test).float().mean())
    print(f"classifier: held-out accuracy {acc:.4f} on {len(y_test)} images "
          f"({classifier_s:.0f} s)")

    # ---- the denoiser: UNet + class tokens, trained together
    unet_cfg = model_cfg["tiny"]["config"]
    unet = R.build_unet(model_cfg["builder"]["cls"], unet_cfg, seed=c["seed"])
    torch.manual_seed(c["seed"])
    model = nn.ModuleDict({"unet": unet.train(),
                           "tokens": R.class_tokens_for(model_cfg, data.num_classes)})
    t = c["train"]
    ema = EMAModel(model.parameters(), decay=t["ema"])
    opt = torch.optim.AdamW(model.parameters(), lr=t["lr"], weight_decay=t["weight_decay"])
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: warmup_cosine(s, t["iters"], t["warmup"], t["lr_floor"]))
    noise_scheduler = DDPMScheduler(**schedule)
    g = torch.Generator().manual_seed(c["seed"])
    step, wall_s, cpu_s, curve, checks = 0, 0.0, 0.0, [], []
    if ckpt is not None:
        model.load_state_dict(ckpt["model"])
        ema.load_state_dict(ckpt["ema"])
        opt.load_state_dict(ckpt["optimizer"])
        sched.load_state_dict(ckpt["lr_scheduler"])
        g.set_state(ckpt["generator"])
        step, wall_s, cpu_s = ckpt["step"], ckpt["wall_s"], ckpt["cpu_s"]
        curve, checks = ckpt["curve"], ckpt.get("checks", [])
    print(f"UNet {sum(p.numel() for p in unet.parameters()):,} parameters, "
          f"{t['iters']} iterations of batch {t['batch']}, {c['threads']} threads")

    def checkpoint() -> None:
        save_checkpoint(ckpt_path, {
            "config": c, "step": step, "model": model.state_dict(), "ema": ema.state_dict(),
            "optimizer": opt.state_dict(), "lr_scheduler": sched.state_dict(),
            "generator": g.get_state(), "classifier": classifier.state_dict(),
            "classifier_s": classifier_s, "wall_s": wall_s, "cpu_s": cpu_s, "curve": curve,
            "checks": checks})

    bar = tqdm(total=t["iters"], initial=step, disable=not c["progress"], mininterval=20,
               desc="train", dynamic_ncols=False, ncols=100)
    last_save, running = time.perf_counter(), None
    while step < t["iters"]:
        while c["pause_file"] and os.path.exists(c["pause_file"]):
            time.sleep(30)
        w0, c0 = time.perf_counter(), time.process_time()
        x0, labels = data.batch(t["batch"], g)
        loss = diffusion_loss(model["unet"], model["tokens"], x0, labels, noise_scheduler, g,
                              t["p_uncond"], model["tokens"].null_class)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        nn.utils.clip_grad_norm_(model.parameters(), t["grad_clip"])
        opt.step()
        sched.step()
        ema.step(model.parameters())
        step += 1
        wall_s += time.perf_counter() - w0
        cpu_s += time.process_time() - c0
        running = loss.item() if running is None else 0.98 * running + 0.02 * loss.item()
        bar.update(1)
        bar.set_postfix(loss=f"{running:.4f}", refresh=False)
        if step % 50 == 0:
            curve.append([step, round(running, 5)])
        if step % t["eval_every"] == 0 or step == t["iters"]:
            rate = quick_check(averaged(model, ema), classifier,
                               R.scheduler_kwargs(model_cfg, "ddim"),
                               t["eval_quick"], evc["guidance"],
                               data.image_shape)
            checks.append([step, rate, round(wall_s, 1)])
            bar.write(f"iter {step}: loss {running:.4f}, {t['eval_quick']['samples']} EMA "
                      f"samples recognised {rate:.0%}, {wall_s / 60:.1f} min training")
        if time.perf_counter() - last_save > c["checkpoint"]["every_s"] or step == t["iters"]:
            checkpoint()
            last_save = time.perf_counter()
    bar.close()

    # ---- ship: the EMA weights in fp16, where the model YAML says
    meta = {"config": unet_cfg, "schedule": schedule, "iterations": step}
    shipped = averaged(model, ema)
    R.save_weights(shipped["unet"], model_cfg["builder"]["weights"], meta)
    R.save_weights(shipped["tokens"], ref_paths["class_tokens"],
                   {"null_class": model["tokens"].null_class, "iterations": step})
    R.save_weights(classifier, ref_paths["classifier"], {"heldout_accuracy": acc})

    # ---- measure what was shipped (loaded back through the model YAML)
    result = R.evaluate(R.load(c["model"]), samples=evc["samples"], steps=evc["steps"],
                        guidance=evc["guidance"], scheduler=evc["scheduler"])
    print(json.dumps(result, indent=1))
    record = {
        "model": f"conf/model/{c['model']}.yaml",
        "parameters": {"unet": sum(p.numel() for p in unet.parameters()),
                       "class_tokens": model["tokens"].table.numel(),
                       "classifier": sum(p.numel() for p in classifier.parameters())},
        "config": c,
        "training": {"iterations": step, "wall_s": round(wall_s, 1), "cpu_s": round(cpu_s, 1),
                     "threads": c["threads"], "classifier_s": round(classifier_s, 1),
                     "final_loss": curve[-1][1] if curve else None, "loss_curve": curve,
                     "quick_checks": {"columns": ["iteration", "recognised", "wall_s"],
                                      "rows": checks}},
        "machine": {"cpus": os.cpu_count(), "loadavg_at_end": list(os.getloadavg()),
                    "note": "wall_s is on shared cores; cpu_s sums all threads"},
        "results": result,
        "files": file_sizes(model_cfg),
        "versions": {"torch": torch.__version__, "diffusers": diffusers.__version__,
                     "data": data_cfg, "python": platform.python_version()},
    }
    path = R.resolve(ref_paths["results"])
    atomic.write_json(path, record)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
