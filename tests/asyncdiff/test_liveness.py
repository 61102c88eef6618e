"""Liveness: a rank that stops answering is named (not a store key, not a collective), a
live one waiting on it is left alone."""
from __future__ import annotations

import datetime
import time

import pytest
import torch.distributed as dist

from asyncdiff.distributed import liveness
from asyncdiff.distributed.watch import Watch
from asyncdiff.lowering import Comm, Group, Payload


def _payload(numel: int) -> Payload:
    return Payload("values", "float32", numel, names=("v",))


def _three_ranks_rank_2_silent() -> list[liveness.Liveness]:
    """Three ranks' liveness in one store (one process): rank 2 stops beating (stopped or
    dead), ranks 0 and 1 beat on."""
    store = dist.TCPStore("127.0.0.1", 0, 1, True, wait_for_workers=False,
                          timeout=datetime.timedelta(seconds=30))
    ranks = [liveness.Liveness(store, r, 3, 30.0) for r in range(3)]
    ranks[2].close()
    time.sleep(liveness.SILENT_S + 1)
    return ranks


def test_a_rank_that_stops_while_the_group_is_made_is_named():
    """Making a process group waits on the store for every peer's address; a rank that
    passed it and stopped before a slower one read its keys leaves that one a store
    timeout naming a key. The silent rank is named instead; without one the error stands."""
    ranks = _three_ranks_rank_2_silent()
    store_error = dist.DistStoreError("wait timeout after 10000ms, keys: /default_pg/0//cpu//0/2")
    try:
        with pytest.raises(liveness.StartupError,
                           match=r"^rank 2 stopped answering while the ranks made the process "
                                 r"group .*: wait timeout after 10000ms"):
            with ranks[0].connecting("the process group"):
                raise store_error
        ranks[2] = liveness.Liveness(ranks[0].store, 2, 3, 30.0)  # beating again
        with pytest.raises(dist.DistStoreError):
            with ranks[0].connecting("the process group"):
                raise store_error
    finally:
        for r in ranks:
            r.close()


@pytest.mark.slow
def test_the_nccl_watch_names_a_silent_peer_and_spares_a_live_one():
    """Under NCCL a group's wait does not block the host: the watch polls each group's
    completion and, past the step limit, names the peers whose heartbeat is still."""
    ranks = _three_ranks_rank_2_silent()
    liveness._current = ranks[0]
    try:
        said: list[str] = []
        watch = Watch(0, 0.5, on_expire=said.append, poll_s=0.05)
        group = Group(4, "publish", (Comm("recv", 1, _payload(8)), Comm("recv", 2, _payload(8))))
        watch.add(lambda: True, Group(3, "publish", ()))   # done: never reported
        watch.add(lambda: False, group)                    # never done
        deadline = time.monotonic() + 20
        while not said and time.monotonic() < deadline:
            time.sleep(0.1)
        assert said == ["rank 0: round 4 publish: no answer from rank 2 within 0.5 s "
                        "(parallel.step_timeout_s)"]
    finally:
        liveness._current = None
        for r in ranks:
            r.close()
