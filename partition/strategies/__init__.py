"""Partitioning strategies. Each is one file producing an :class:`Assignment` (STYLE 3)."""
from partition.strategies.base import Assignment, Partitioner, PartitionRequest

__all__ = ["Assignment", "Partitioner", "PartitionRequest"]
