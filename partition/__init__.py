"""The partitioning compiler: capture any denoiser, cost it, cut it into balanced stages."""
from partition.api import (BACKENDS, CHOICES, REGISTRY, STRATEGIES, Compiled, check_choice,
                           compile_from_plan, compile_graph, compile_model, stages_from_plan)
from partition.backend import capture_or_fallback
from partition.capture import Captured, CaptureError, capture
from partition.cost import COST_MODELS, NodeCosts, profile
from partition.graph import TrunkGraph, build_graph
from partition.plan import Plan
from partition.report import format_plan, predict
from partition.spec import InputSpec
from partition.stages import Segment, StagedModel
from partition.strategies.base import Assignment, PartitionRequest, RequestError

__all__ = [
    "Assignment", "BACKENDS", "CHOICES", "COST_MODELS", "REGISTRY", "capture_or_fallback",
    "check_choice", "CaptureError", "Captured", "Compiled", "InputSpec",
    "NodeCosts", "PartitionRequest", "Plan", "RequestError", "STRATEGIES", "Segment", "StagedModel",
    "TrunkGraph", "build_graph", "capture", "compile_from_plan", "compile_graph", "compile_model",
    "format_plan", "predict", "profile", "stages_from_plan",
]
