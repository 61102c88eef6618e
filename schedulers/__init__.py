"""Sampling loop, noise schedulers and the denoiser protocol; nothing here knows about devices."""
from schedulers.factory import SCHEDULERS, make_scheduler
from schedulers.protocol import Denoiser, StepCallback, StepInfo
from schedulers.sampling import sample

__all__ = ["SCHEDULERS", "Denoiser", "StepCallback", "StepInfo", "make_scheduler", "sample"]
