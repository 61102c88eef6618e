"""Asynchronous model-parallel diffusion (AsyncDiff): runtime and the diffusers drop-in."""
from asyncdiff.parallelize import Handle, parallelize

__all__ = ["Handle", "parallelize"]
