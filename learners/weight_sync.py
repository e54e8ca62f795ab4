"""Moving the learner's weights to the rollout engines.

CPU path (runs everywhere, tested): learner rank 0 cuts its full state dict into size-bounded
buckets, each ONE flat byte buffer plus a small table of (name, dtype, shape, offset), and puts
them into the Ray object store. Numpy buffers travel zero-copy through the object store, so a
bucket costs one copy in and one out. The rollout side iterates the buckets one at a time, so at
most one bucket is held at once besides the engine's own weights:

    refs = put_weights(state_dict, bucket_bytes=64 << 20)        # on learner rank 0
    weights = BucketedWeights(refs)                               # picklable, holds only refs
    await engine.update_weights(weights, version)                 # iterates (name, tensor)

GPU path (NOT RUN HERE: this machine has no GPU; see the bottom of this file): learner rank 0
and every vLLM worker join one NCCL group and rank 0 broadcasts the same flat buckets GPU to GPU,
so no weight byte goes through host memory or the object store.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import Tensor

DEFAULT_BUCKET_BYTES = 64 << 20  # 64 MiB: large enough to amortise per-object overhead
_ALIGN = 16  # offsets are multiples of this, so every tensor can be viewed in its own dtype


@dataclass(frozen=True)
class TensorSpec:
    """Where one tensor lives in its bucket's flat byte buffer."""

    name: str
    dtype: str  # torch dtype name without the "torch." prefix, e.g. "bfloat16"
    shape: tuple[int, ...]
    offset: int  # in bytes, a multiple of _ALIGN
    nbytes: int


def bucket_size(specs: list[TensorSpec]) -> int:
    """Bytes of the flat buffer of a bucket."""
    return max((s.offset + s.nbytes for s in specs), default=0)


Bucket = tuple[list[TensorSpec], np.ndarray]  # (specs, flat uint8 buffer)


def plan_buckets(
    named_tensors: Iterable[tuple[str, Tensor]], bucket_bytes: int = DEFAULT_BUCKET_BYTES
) -> list[list[TensorSpec]]:
    """Group tensors, in order, into buckets of at most `bucket_bytes` (a tensor larger than
    that gets a bucket of its own). Only sizes are read; no data is copied."""
    if bucket_bytes < 1:
        raise ValueError(f"bucket_bytes must be >= 1, got {bucket_bytes}")
    buckets: list[list[TensorSpec]] = []
    used = 0
    for name, tensor in named_tensors:
        nbytes = tensor.numel() * tensor.element_size()
        if not buckets or (used + nbytes > bucket_bytes and buckets[-1]):
            buckets.append([])
            used = 0
        dtype = str(tensor.dtype).removeprefix("torch.")
        buckets[-1].append(TensorSpec(name, dtype, tuple(tensor.shape), used, nbytes))
        used += -(-nbytes // _ALIGN) * _ALIGN
    return buckets


def pack_bucket(specs: list[TensorSpec], tensors: Mapping[str, Tensor]) -> np.ndarray:
    """The flat uint8 buffer of one planned bucket (tensors are copied to host memory)."""
    buffer = torch.zeros(bucket_size(specs), dtype=torch.uint8)
    for spec in specs:
        flat = tensors[spec.name].detach().contiguous().reshape(-1).view(torch.uint8)
        buffer[spec.offset : spec.offset + spec.nbytes].copy_(flat)
    return buffer.numpy()


def unpack_bucket(specs: list[TensorSpec], buffer: np.ndarray) -> Iterator[tuple[str, Tensor]]:
    """(name, tensor) of one bucket. Each tensor is a fresh copy: buffers that come out of the
    object store are read-only shared memory, and engines may keep what they are given."""
    data = torch.from_numpy(np.array(buffer, copy=True))  # one writable copy per bucket
    for spec in specs:
        dtype = getattr(torch, spec.dtype)
        if spec.nbytes == 0:
            yield spec.name, torch.empty(spec.shape, dtype=dtype)
            continue
        raw = data[spec.offset : spec.offset + spec.nbytes]
        yield spec.name, raw.view(dtype).reshape(spec.shape)


def iter_buckets(
    state_dict: Mapping[str, Tensor], bucket_bytes: int = DEFAULT_BUCKET_BYTES
) -> Iterator[Bucket]:
    """The state dict as a stream of (specs, flat buffer) buckets."""
    for specs in plan_buckets(state_dict.items(), bucket_bytes):
        yield specs, pack_bucket(specs, state_dict)


# --------------------------------------------------------------------------- CPU: object store


def put_weights(
    state_dict: Mapping[str, Tensor], *, bucket_bytes: int = DEFAULT_BUCKET_BYTES
) -> list[Any]:
    """ray.put every bucket of the state dict; the ObjectRefs, in order.

    Called on learner rank 0, so the objects are owned by (and live on the node of) the learner;
    they are freed when the last holder of the refs drops them.
    """
    import ray

    return [ray.put(bucket) for bucket in iter_buckets(state_dict, bucket_bytes)]


class BucketedWeights:
    """An iterable of (name, tensor) over bucket ObjectRefs, fetched one bucket at a time.

    Picklable (it holds only the refs), so it can be handed to a rollout worker's
    `update_weights(named_tensors=..., version=...)` as is; iterating it again re-reads the
    buckets (each engine worker may iterate once).
    """

    def __init__(self, refs: list[Any]):
        self.refs = list(refs)

    def __iter__(self) -> Iterator[tuple[str, Tensor]]:
        import ray

        for ref in self.refs:
            specs, buffer = ray.get(ref)
            yield from unpack_bucket(specs, buffer)
            del buffer  # release the shared-memory view before fetching the next bucket

    def __len__(self) -> int:
        return len(self.refs)

    def __repr__(self) -> str:
        return f"BucketedWeights({len(self.refs)} buckets)"


# --------------------------------------------------------------------------- GPU: NCCL
#
# NOT RUN HERE: there is no GPU on the machines this project is developed on. This follows the
# pattern of vLLM's RLHF example (examples/offline_inference/rlhf*.py) and OpenRLHF/verl: learner
# rank 0 (rank 0 of the group) and the N vLLM workers (ranks 1..N) open a stateless NCCL group
# next to their own process groups; per update, the metadata goes by Ray and the bytes by NCCL.
#
#   learner rank 0:  sync = NcclWeightSender(master_addr, port, world_size=1 + N)
#                    for specs in sync.broadcast(state_dict): <send specs to workers by Ray>
#   vLLM workers:    weights = nccl_receive(communicator, specs)   # -> model.load_weights(...)
#
# The caller must interleave them: each bucket's specs reach the workers (a Ray call that makes
# them start `nccl_receive`) before or while rank 0 broadcasts that bucket.


class NcclWeightSender:
    """Learner rank 0's end of the NCCL weight broadcast (GPU only; not run here)."""

    def __init__(self, master_addr: str, master_port: int, world_size: int):
        from vllm.distributed.device_communicators.pynccl import PyNcclCommunicator
        from vllm.distributed.utils import StatelessProcessGroup

        group = StatelessProcessGroup.create(
            host=master_addr, port=master_port, rank=0, world_size=world_size
        )
        self.device = torch.device("cuda", torch.cuda.current_device())
        self.communicator = PyNcclCommunicator(group, device=self.device)

    def broadcast(
        self, state_dict: Mapping[str, Tensor], bucket_bytes: int = DEFAULT_BUCKET_BYTES
    ) -> Iterator[list[TensorSpec]]:
        """Yield each bucket's specs, then broadcast its bytes (GPU to GPU)."""
        for specs in plan_buckets(state_dict.items(), bucket_bytes):
            yield specs
            buffer = torch.empty(bucket_size(specs), dtype=torch.uint8, device=self.device)
            for spec in specs:
                flat = state_dict[spec.name].detach().to(self.device).contiguous()
                buffer[spec.offset : spec.offset + spec.nbytes].copy_(
                    flat.view(-1).view(torch.uint8)
                )
            self.communicator.broadcast(buffer, src=0, stream=torch.cuda.current_stream())
            torch.cuda.current_stream().synchronize()


def nccl_receive(communicator: Any, specs: list[TensorSpec]) -> list[tuple[str, Tensor]]:
    """A vLLM worker's end: receive one bucket into GPU memory and split it (not run here).

    `communicator` is the PyNcclCommunicator the worker built with the same StatelessProcessGroup
    address at rank 1..N. The returned tensors view one buffer; pass them straight to
    `model_runner.model.load_weights(...)`.
    """
    buffer = torch.empty(bucket_size(specs), dtype=torch.uint8, device=communicator.device)
    communicator.broadcast(buffer, src=0, stream=torch.cuda.current_stream())
    torch.cuda.current_stream().synchronize()
    return [
        (
            s.name,
            buffer[s.offset : s.offset + s.nbytes].view(getattr(torch, s.dtype)).reshape(s.shape),
        )
        for s in specs
    ]


__all__ = [
    "DEFAULT_BUCKET_BYTES",
    "BucketedWeights",
    "NcclWeightSender",
    "TensorSpec",
    "bucket_size",
    "iter_buckets",
    "nccl_receive",
    "pack_bucket",
    "plan_buckets",
    "put_weights",
    "unpack_bucket",
]
