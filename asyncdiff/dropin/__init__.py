"""The diffusers drop-in's parts: the call, the per-shape sessions, the parked weights.

The entry point is :func:`asyncdiff.parallelize` (``asyncdiff/parallelize.py``).
"""
