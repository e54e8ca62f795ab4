"""The collective weight group (learners.weight_sync.WeightGroup) over gloo, its members as threads
of this process (no Ray): bit-exact buckets, and failures that are clear errors after the group's
timeout instead of hangs. The Ray actors and vLLM engines are in
tests/ray/test_collective_weight_sync.py."""

from __future__ import annotations

import threading
import time

import pytest
import torch

from learners.weight_sync import WeightGroup, WeightGroupError

TIMEOUT_S = 2.0


def state_dict() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return {
        "embed.weight": torch.randn(50, 8, generator=g),
        "norm.weight": torch.randn(7, generator=g).to(torch.bfloat16),  # odd bytes: alignment
        "layer.0.w": torch.randn(8, 8, generator=g).to(torch.float16),
        "count": torch.tensor([1, 2, 3], dtype=torch.int64),
        "empty": torch.zeros(0, 4),
        "big": torch.randn(100, 10, generator=g),  # larger than a bucket: alone in its own
    }


def _in_threads(*calls) -> list:
    """Run the calls at once, one thread each; their results (or exceptions) in order."""
    results: list = [None] * len(calls)

    def run(k: int) -> None:
        try:
            results[k] = calls[k]()
        except BaseException as err:  # returned, for the test to look at
            results[k] = err

    threads = [threading.Thread(target=run, args=(k,)) for k in range(len(calls))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)
    assert not any(thread.is_alive() for thread in threads), "a member hung"
    return results


def _group(state, receivers: int, generation: int = 1) -> tuple[WeightGroup, list[WeightGroup]]:
    host = WeightGroup.host(
        state,
        address="127.0.0.1",
        world_size=receivers + 1,
        generation=generation,
        backend="gloo",
        timeout_s=TIMEOUT_S,
        bucket_bytes=512,
    )
    members = [WeightGroup(host.spec, rank) for rank in range(1, receivers + 1)]
    return host, members


def test_a_broadcast_reaches_every_member_bit_for_bit_in_order():
    state = state_dict()
    host, members = _group(state, receivers=2)
    assert len(host.spec.buckets) > 2  # several buckets, the big tensor alone in one
    try:
        assert _in_threads(host.connect, *(m.connect for m in members)) == [host, *members]
        for _ in range(2):  # a formed group serves sync after sync
            sent, *received = _in_threads(lambda: host.send(state), *(m.receive for m in members))
            assert sent == host.spec.nbytes
            for got in received:
                assert [name for name, _ in got] == list(state)
                for name, tensor in got:
                    assert tensor.dtype == state[name].dtype and torch.equal(tensor, state[name])
    finally:
        for member in [host, *members]:
            member.close()


def test_a_member_that_never_joins_fails_the_others_after_the_timeout():
    host, (member, _absent) = _group(state_dict(), receivers=2)
    t0 = time.monotonic()
    errors = _in_threads(host.connect, member.connect)
    assert time.monotonic() - t0 < 30
    for err in errors:
        assert isinstance(err, WeightGroupError)
        assert "weight group 1 (gloo, 3 members" in str(err) and "did not form within 2 s" in str(
            err
        )
    assert not host.connected and not member.connected


def test_a_member_that_stops_receiving_fails_the_sender_after_the_timeout():
    state = state_dict()
    host, (member,) = _group(state, receivers=1)
    _in_threads(host.connect, member.connect)
    t0 = time.monotonic()
    with pytest.raises(WeightGroupError, match=r"rank 0's broadcast of \d+ bytes failed"):
        host.send(state)  # nobody receives
    assert time.monotonic() - t0 < 30
    assert not host.connected  # closed: a member still waiting fails at once, not at its timeout
    t0 = time.monotonic()
    with pytest.raises(WeightGroupError, match="rank 1's broadcast"):
        member.receive()
    assert time.monotonic() - t0 < TIMEOUT_S + 5
    member.close()


def test_weights_that_no_longer_match_the_bucket_table_are_refused_before_sending():
    state = state_dict()
    host, (member,) = _group(state, receivers=1)
    try:
        _in_threads(host.connect, member.connect)
        changed = {**state, "layer.0.w": torch.zeros(8, 9, dtype=torch.float16)}
        with pytest.raises(WeightGroupError, match="no longer match the bucket table"):
            host.send(changed)
        assert not host.connected  # closed: the members' waits fail at once
        with pytest.raises(WeightGroupError, match="rank 1's broadcast"):
            member.receive()
    finally:
        host.close()
        member.close()


def test_nccl_only_where_every_member_holds_whole_gpus_of_its_own():
    from learners.weight_sync import collective_backend

    assert collective_backend(0, 0) == "gloo"  # CPU
    assert collective_backend(1, 1) == "nccl"
    assert collective_backend(2, 4) == "nccl"
    # NCCL cannot connect two processes on one GPU: shared GPUs go through host memory
    assert collective_backend(0.5, 0.5) == "gloo"
    assert collective_backend(1, 0.5) == "gloo"
    assert collective_backend(1, 0) == "gloo"  # CPU workers
