"""Weight buckets (learners/weight_sync.py, no Ray), the lr schedule and the DeepSpeed config of
a learner rank, and the metric reduction table (no DeepSpeed, no Ray actors)."""

from __future__ import annotations

import math

import pytest
import torch

from learners.learner_rank import METRIC_REDUCTIONS, deepspeed_config, learning_rate
from learners.weight_sync import (
    bucket_size,
    iter_buckets,
    pack_bucket,
    plan_buckets,
    unpack_bucket,
)
from spear_ray.config.schema import LearnerConfig


def state_dict() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return {
        "embed.weight": torch.randn(50, 8, generator=g),
        "norm.weight": torch.randn(7, generator=g).to(torch.bfloat16),  # odd bytes: alignment
        "layer.0.w": torch.randn(8, 8, generator=g),
        "layer.0.b": torch.randn(3, generator=g, dtype=torch.float64),
        "scalar": torch.tensor(1.5),
        "count": torch.tensor([1, 2, 3], dtype=torch.int64),
        "flags": torch.tensor([True, False]),
        "empty": torch.zeros(0, 4),
        "big": torch.randn(100, 10, generator=g),  # larger than a bucket: alone in its own
    }


@pytest.mark.parametrize("bucket_bytes", [1, 300, 1000, 1 << 20])
def test_buckets_reassemble_to_the_exact_state_dict(bucket_bytes):
    sd = state_dict()
    buckets = list(iter_buckets(sd, bucket_bytes))
    out = {name: t for specs, buf in buckets for name, t in unpack_bucket(specs, buf)}
    assert list(out) == list(sd)  # order kept
    for name, tensor in sd.items():
        assert out[name].dtype == tensor.dtype and out[name].shape == tensor.shape
        assert torch.equal(out[name], tensor), name
    for specs, buf in buckets:
        assert buf.dtype.name == "uint8" and buf.size == bucket_size(specs)
        if len(specs) > 1:  # only a lone tensor may exceed the bound
            assert sum(s.nbytes for s in specs) <= bucket_bytes
        assert all(s.offset % 16 == 0 for s in specs)


def test_plan_reads_sizes_only_and_starts_a_bucket_when_full():
    sd = {f"w{i}": torch.zeros(25) for i in range(8)}  # 100 bytes each
    plan = plan_buckets(sd.items(), bucket_bytes=250)
    assert [len(b) for b in plan] == [2, 2, 2, 2]  # 2 x 112 aligned bytes fit, a third not
    assert pack_bucket(plan[0], sd).size == bucket_size(plan[0])


def test_unpacked_tensors_are_writable_copies():
    sd = {"w": torch.arange(6.0)}
    ((specs, buf),) = list(iter_buckets(sd))
    buf.setflags(write=False)  # as it comes out of the object store
    ((_, tensor),) = list(unpack_bucket(specs, buf))
    tensor += 1  # must not raise, must not touch the buffer
    assert torch.equal(tensor, torch.arange(6.0) + 1)


def test_learning_rate_schedules():
    kw = {"peak": 1.0, "warmup_steps": 4, "total_steps": 14}
    warm = [learning_rate(t, schedule="constant", **kw) for t in range(6)]
    assert warm == [0.25, 0.5, 0.75, 1.0, 1.0, 1.0]
    assert learning_rate(4, schedule="cosine", **kw) == 1.0
    assert learning_rate(9, schedule="cosine", **kw) == pytest.approx(0.5)
    assert learning_rate(14, schedule="cosine", **kw) == pytest.approx(0.0, abs=1e-12)
    assert learning_rate(99, schedule="cosine", **kw) == pytest.approx(0.0, abs=1e-12)
    assert learning_rate(9, schedule="linear", **kw) == pytest.approx(0.5)
    assert learning_rate(0, schedule="constant", peak=2.0, warmup_steps=0, total_steps=1) == 2.0
    with pytest.raises(ValueError, match="schedule"):
        learning_rate(5, schedule="step", **kw)


def test_deepspeed_config_follows_the_learner_config():
    learner = LearnerConfig(zero_stage=3, grad_clip=0.5)
    cpu = deepspeed_config(learner, world_size=2, precision="float32")
    assert cpu["zero_optimization"]["stage"] == 3
    assert cpu["gradient_clipping"] == 0.5
    assert cpu["train_batch_size"] == 2 and cpu["gradient_accumulation_steps"] == 1
    assert "bf16" not in cpu and "fp16" not in cpu
    gpu = deepspeed_config(learner, world_size=8, precision="bfloat16")
    assert gpu["bf16"]["enabled"] is True


def test_metric_reductions_are_declared_and_reduce():
    from learners.learner_group import reduce_metrics

    assert set(METRIC_REDUCTIONS.values()) <= {"sum", "max", "mean"}
    ranks = [
        {name: 1.0 for name in METRIC_REDUCTIONS},
        {name: 3.0 for name in METRIC_REDUCTIONS},
    ]
    out = reduce_metrics(ranks)
    assert out["loss"] == 4.0 and out["grad_norm"] == 3.0 and out["tokens"] == 4.0
    with pytest.raises(KeyError, match="no declared reduction"):
        reduce_metrics([{"surprise": 1.0}])
    assert math.isnan(reduce_metrics([{"loss": float("nan")}, {"loss": 1.0}])["loss"])


def test_views_for_a_consumer_that_copies_share_the_read_only_buffer():
    sd = {"a": torch.randn(3, 4), "b": torch.arange(6, dtype=torch.bfloat16)}
    (specs,) = plan_buckets(sd.items())
    buf = pack_bucket(specs, sd)
    buf.setflags(write=False)  # as it comes out of the object store
    views = dict(unpack_bucket(specs, buf, copy=False))
    assert all(torch.equal(views[k], sd[k]) for k in sd)
    assert views["a"].data_ptr() == torch.from_numpy(buf).data_ptr()  # no copy
