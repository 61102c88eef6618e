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


# diffusers' stateful hooks by the name it registers them under: the feature the user turned
# on, its config class (``enable_cache(<config>(…))`` on a CacheMixin model) and the function
# that applies it to any module
_FEATURES: dict[str, tuple[str, str]] = {
    "faster_cache_denoiser": ("FasterCache", "apply_faster_cache"),
    "faster_cache_block": ("FasterCache", "apply_faster_cache"),
    "pyramid_attention_broadcast": ("PyramidAttentionBroadcast",
                                    "apply_pyramid_attention_broadcast"),
    "fbc_leader_block_hook": ("FirstBlockCache", "apply_first_block_cache"),
    "fbc_block_hook": ("FirstBlockCache", "apply_first_block_cache"),
    "mag_cache_leader_block_hook": ("MagCache", "apply_mag_cache"),
    "mag_cache_block_hook": ("MagCache", "apply_mag_cache"),
    "taylorseer_cache": ("TaylorSeerCache", "apply_taylorseer_cache"),
    "sea_cache_root": ("SeaCache", "apply_sea_cache"),
    "sea_cache_leader_block": ("SeaCache", "apply_sea_cache"),
    "sea_cache_block": ("SeaCache", "apply_sea_cache"),
    "sea_cache_post_norm": ("SeaCache", "apply_sea_cache"),
    "text_kv_cache_transformer": ("TextKVCache", "apply_text_kv_cache"),
    "text_kv_cache_block": ("TextKVCache", "apply_text_kv_cache"),
}


def refuse_stateful_hooks(pipe: Any, attr: str, module: nn.Module) -> None:
    """diffusers' caching hooks (FasterCache, PyramidAttentionBroadcast, FirstBlockCache, …)
    keep state between calls: a split into stages would share it wrongly. One line naming
    each as the user turned it on (``enable_cache(FirstBlockCacheConfig(…))``; a hook not
    known here by the name diffusers registered it under) and how to take it off; stateless
    hooks (layerwise casting) are captured."""
    found: dict[str, list[str]] = {}  # hook name -> where
    for name, m in module.named_modules():
        registry = getattr(m, "_diffusers_hook", None)
        for hook_name, hook in getattr(registry, "hooks", {}).items():
            if getattr(hook, "_is_stateful", False):
                found.setdefault(hook_name, []).append(name or "<root>")
    if not found:
        return
    enabled = type(getattr(module, "_cache_config", None)).__name__
    features, fixes = [], []
    for hook_name, where in found.items():
        if hook_name in _FEATURES:
            feature, apply = _FEATURES[hook_name]
            config = f"{feature}Config"
            how = f"enable_cache({config}(…))" if enabled == config else f"{apply}(…)"
            fix = f"pipe.{attr}.disable_cache()" if enabled == config else \
                f"HookRegistry.remove_hook({hook_name!r})"
            said = f"diffusers' {feature} on ({how})"
        else:
            shown = ", ".join(where[:2]) + (" …" if len(where) > 2 else "")
            said = f"the stateful diffusers hook {hook_name!r} (on {shown})"
            fix = f"HookRegistry.remove_hook({hook_name!r})"
        if said not in features:
            features.append(said)
        if fix not in fixes:
            fixes.append(fix)
    raise ValueError(
        f"{type(pipe).__name__}.{attr} has {' and '.join(features)}: it keeps values between "
        "calls, which a pipeline split into stages cannot share; allowed: no stateful hook; "
        f"turn it off first ({', '.join(fixes)}) and parallelize again")


# the instance forwards that libraries set on a module they hook (diffusers' HookRegistry,
# accelerate's add_hook_to_module): a partial of a function of these modules. They are the
# module's own: captured with it (a stateful one is refused above).
_LIBRARY_HOOKS = ("diffusers.hooks.", "accelerate.hooks")


def refuse_wrapped_forward(attr: str, module: nn.Module) -> None:
    """A ``forward`` the user set on the denoiser (a spy that records what it is fed and calls
    the original) cannot stay below the drop-in: it calls the network itself, and the proxy
    put in its place would leave it uncalled. One line naming it and how to take it off; set
    after ``parallelize`` it wraps the drop-in's forward and sees every call."""
    forward = module.__dict__.get("forward")
    if forward is None or _library_hook(forward) or _own_method(forward, module):
        return
    name = getattr(forward, "__qualname__", None) or type(forward).__name__
    raise ValueError(
        f"pipe.{attr}.forward is a wrapper set on the module ({name}): the drop-in replaces "
        "the forward, so the pipeline's calls would no longer reach it; allowed: no wrapper "
        f"when parallelize is called (del pipe.{attr}.forward, then parallelize); set it "
        "after parallelize and it wraps the drop-in's forward and sees every call")


def _library_hook(forward: Any) -> bool:
    func = getattr(forward, "func", None)  # functools.partial(new_forward, module)
    return str(getattr(func, "__module__", "")).startswith(_LIBRARY_HOOKS)


def _own_method(forward: Any, module: nn.Module) -> bool:
    """``module.forward = module.forward``: the class's own forward, bound to the module."""
    return getattr(forward, "__self__", None) is module and \
        getattr(forward, "__func__", None) is getattr(type(module), "forward", None)
