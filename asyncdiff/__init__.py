"""Asynchronous model-parallel diffusion (AsyncDiff): runtime and the diffusers drop-in."""
from asyncdiff.dropin.lazy import load_pipeline
from asyncdiff.parallelize import Handle, parallelize
from asyncdiff.schedule import Schedule

__all__ = ["Handle", "Schedule", "load_pipeline", "parallelize"]
