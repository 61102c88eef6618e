"""What a module holds besides its weights, as the drop-in must see it: the plain state a
capture bakes in (a change means capturing again), and diffusers hooks that keep state
between calls (refused: stages cannot share it)."""
from __future__ import annotations

import types
from typing import Any

import torch
from torch import nn


def state_key(module: nn.Module) -> str:
    """What a capture bakes in besides the weights: every submodule's plain attributes and
    those of the objects it holds (attention processors: an IP-Adapter's ``scale``), and which
    submodules there are. A change (``set_ip_adapter_scale``, ``train()``, a LoRA's layers
    added) means the capture no longer describes the module."""
    items = []
    for name, m in module.named_modules():
        for key, value in vars(m).items():
            if key.startswith("_") or isinstance(value, (nn.Module, torch.Tensor)):
                continue
            items.append((name, key, _plain(value)))
    return repr(items)


_ROUTINES = (types.FunctionType, types.MethodType, types.BuiltinFunctionType, type)


def _plain(value: Any, depth: int = 0) -> Any:
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if isinstance(value, (list, tuple)) and depth < 2:
        return tuple(_plain(v, depth + 1) for v in value)
    if hasattr(value, "__dict__") and depth == 0 and not isinstance(value, _ROUTINES):
        return (type(value).__name__, tuple(sorted(
            (k, _plain(v, 1)) for k, v in vars(value).items()
            if not k.startswith("_") and not isinstance(v, (nn.Module, torch.Tensor)))))
    return type(value).__name__


def refuse_stateful_hooks(pipe: Any, attr: str, module: nn.Module) -> None:
    """diffusers' caching hooks (FasterCache, PyramidAttentionBroadcast, FirstBlockCache, …)
    keep state between calls: a split into stages would share it wrongly. One line naming
    them and how to take them off; stateless hooks (layerwise casting) are captured."""
    stateful = []
    for name, m in module.named_modules():
        registry = getattr(m, "_diffusers_hook", None)
        for hook_name, hook in getattr(registry, "hooks", {}).items():
            if getattr(hook, "_is_stateful", False):
                stateful.append(f"{hook_name} on {name or '<root>'}")
    if stateful:
        shown = sorted(set(stateful))
        raise ValueError(
            f"{type(pipe).__name__}.{attr} has stateful diffusers hooks "
            f"({', '.join(shown[:4])}{' …' if len(shown) > 4 else ''}): they cache values "
            "between calls, which a pipeline split into stages cannot share; disable them "
            f"first (pipe.{attr}.disable_cache(), or HookRegistry.remove_hook) and "
            "parallelize again")
