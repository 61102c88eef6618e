"""Asynchronous model-parallel diffusion (AsyncDiff): runtime and the diffusers drop-in."""
from asyncdiff.dropin.lazy import load_pipeline
from asyncdiff.parallelize import Handle, parallelize

__all__ = ["Handle", "load_pipeline", "parallelize"]
