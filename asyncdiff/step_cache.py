"""The step cache (DeepCache-style, one device): its timeline, its check, and the split it
runs on. The rule is stated with the others in [Note: staleness] (``asyncdiff/timeline.py``):
sequential rounds at every step k ≡ 0 (mod K), publishing every value; at every other step
only stage N−1 runs, on the values of the last sequential round. With a shell/core split
(``partition/strategies/shell.py``) stage N−1 holds the network's outer blocks, so they run
every step and the inner ones every K-th.
"""
from __future__ import annotations

from asyncdiff.timeline import Action, Round, Timeline, check_int, sequential_round

STRATEGY = "shell_core"  # the split it runs on: the last stage holds the outer blocks


def check_split(strategy: str, interval: int) -> None:
    """The step cache reuses the inner stages' values and reruns the last stage: that is the
    network's outer blocks only on a shell/core split."""
    if interval and strategy != STRATEGY:
        raise ValueError(f"strategy={strategy!r} with cache_interval={interval}; allowed: "
                         f"{STRATEGY!r} (the step cache reruns the last stage every step: the "
                         "network's outer blocks on a shell/core split)")


def build_cache_timeline(n: int, interval: int, steps: int) -> Timeline:
    """Step caching on one device ([Note: staleness], "Step cache"): a sequential round at
    every step k ≡ 0 (mod ``interval``), a cached round (stage N−1 alone, on the values of
    the last sequential round) at every other step. ``interval`` = 1 is the sequential
    sampler. Bad arguments raise ValueError naming the key and the allowed values."""
    n = check_int("n", n, 2, None, " (the step cache reuses the values of stages 0 … N−2)")
    steps = check_int("steps", steps, 1)
    interval = check_int("cache_interval", interval, 1, steps)
    rounds: list[Round] = []
    full = -1
    for k in range(steps):
        if k % interval == 0:
            rnd = sequential_round(k, n, kind="warmup" if k == 0 else "sync")
            full = k
            rounds.append(Round(index=k, kind=rnd.kind, steps=rnd.steps, actions=tuple(
                Action(**{**a.__dict__, "device": 0}) for a in rnd.actions)))
        else:
            rounds.append(Round(index=k, kind="cached", steps=(k,), actions=(Action(
                round=k, device=0, stage=n - 1, copy=0, t_step=k, latent_step=k,
                inputs_round=full, eps_steps=(k,), publishes=False),)))
    timeline = Timeline(n=n, stride=1, warmup=1, steps=steps, time_shift=False,
                        stride_noise="fresh", devices=1, rounds=tuple(rounds),
                        sync=tuple(range(interval, steps, interval)), cache=interval)
    validate(timeline)
    return timeline


def validate(tl: Timeline) -> None:
    """A step-cache timeline: one device; sequential rounds at k ≡ 0 (mod K), each stage once
    in order on fresh values; cached rounds run stage N−1 alone, fed τ_k on x_k, on the
    values of the last sequential round, publishing nothing."""
    def fail(r: int, msg: str) -> None:
        raise ValueError(f"step-cache timeline round {r}: {msg}")

    if tl.devices != 1 or tl.n < 2 or tl.cache < 1:
        raise ValueError(f"step-cache timeline: {tl.devices} devices, N={tl.n}, K={tl.cache}; "
                         "allowed: 1 device, N >= 2, K >= 1")
    if [k for r in tl.rounds for k in r.steps] != list(range(tl.steps)):
        raise ValueError(f"step-cache timeline: rounds must cover 0 … {tl.steps - 1}, one each")
    full = None
    for i, rnd in enumerate(tl.rounds):
        if len(rnd.steps) != 1:
            fail(i, f"covers steps {rnd.steps}; a step-cache round covers one step")
        k = rnd.steps[0]
        if rnd.index != i or any(a.device != 0 or a.round != i or a.latent_step != k
                                 or a.t_step != k or a.eps_steps != (() if a.stage < tl.n - 1
                                                                     else (k,))
                                 for a in rnd.actions):
            fail(i, "every action on device 0, of its own round, fed τ_k on x_k, ε_k from "
                    f"stage {tl.n - 1}")
        if k % tl.cache == 0:
            runs = [(a.stage, a.inputs_round, a.publishes) for a in rnd.actions]
            if rnd.kind != ("warmup" if k == 0 else "sync") or \
                    runs != [(s, i, True) for s in range(tl.n)]:
                fail(i, f"step {k} ≡ 0 (mod {tl.cache}) runs stages 0 … N−1 in order, fresh")
            full = i
        elif rnd.kind != "cached" or [(a.stage, a.inputs_round, a.publishes) for a in
                                      rnd.actions] != [(tl.n - 1, full, False)]:
            fail(i, f"cached step {k} runs stage {tl.n - 1} alone on the values of round "
                    f"{full} (the last sequential round)")
