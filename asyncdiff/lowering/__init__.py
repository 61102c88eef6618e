"""Communication lowered from the timeline: every rank's ordered compute steps and message
groups ([Note: lowering] in ``programs.py``), printable, and replayed under NCCL's rules
(``simulate.py``) before any executor posts them."""
from asyncdiff.lowering.actions import Comm, Compute, Group, Item, Payload
from asyncdiff.lowering.programs import Lowered, RankProgram, lower, place, stage_devices
from asyncdiff.lowering.simulate import Replay, ScheduleError, check, checked_program, replay

__all__ = ["Comm", "Compute", "Group", "Item", "Payload", "Lowered", "RankProgram", "lower", "place", "stage_devices",
           "Replay", "ScheduleError", "check", "checked_program", "replay"]
