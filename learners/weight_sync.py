"""Moving the learner's weights to the rollout engines.

CPU path (runs everywhere, tested): learner rank 0 cuts its full state dict into size-bounded
buckets, each ONE flat byte buffer plus a small table of (name, dtype, shape, offset), and puts
them into the Ray object store. Numpy buffers travel zero-copy through the object store, so a
bucket costs one copy in and one out. The rollout side iterates the buckets one at a time, so at
most one bucket is held at once besides the engine's own weights:

    refs = put_weights(state_dict, bucket_bytes=64 << 20)        # on learner rank 0
    weights = BucketedWeights(refs)                               # picklable, holds only refs
    await engine.update_weights(weights, version)                 # iterates (name, tensor)

The same path serves GPU clusters (the bytes go through host memory and the object store). A
direct NCCL broadcast from learner rank 0 to the vLLM workers is not implemented: the GPU issue
decides it, with a machine to measure it on.
"""

from __future__ import annotations

import warnings
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


def unpack_bucket(
    specs: list[TensorSpec], buffer: np.ndarray, *, copy: bool = True
) -> Iterator[tuple[str, Tensor]]:
    """(name, tensor) of one bucket. By default each tensor is a fresh copy: buffers that come
    out of the object store are read-only shared memory, and a consumer may keep what it is
    given. copy=False gives read-only views of the buffer, for a consumer that copies them into
    its own parameters at once (a vLLM engine's reload does): one copy of the model less."""
    if copy:
        data = torch.from_numpy(np.array(buffer, copy=True))  # one writable copy per bucket
    else:
        with warnings.catch_warnings():  # read-only memory: the consumer only reads it
            warnings.simplefilter("ignore", UserWarning)
            data = torch.from_numpy(buffer)
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

    async def fetch(self) -> list[tuple[str, Tensor]]:
        """All (name, tensor) pairs, each bucket awaited: inside an async actor the event loop
        keeps serving other calls meanwhile (a blocking ray.get would stop it). The tensors are
        read-only views of the object store's memory: copy what you keep."""
        tensors: list[tuple[str, Tensor]] = []
        for ref in self.refs:
            specs, buffer = await ref
            # views, not copies: the rollout worker's engine copies them into its parameters
            tensors.extend(unpack_bucket(specs, buffer, copy=False))
        return tensors

    def __len__(self) -> int:
        return len(self.refs)

    def __repr__(self) -> str:
        return f"BucketedWeights({len(self.refs)} buckets)"


__all__ = [
    "DEFAULT_BUCKET_BYTES",
    "BucketedWeights",
    "TensorSpec",
    "bucket_size",
    "iter_buckets",
    "pack_bucket",
    "plan_buckets",
    "put_weights",
    "unpack_bucket",
]
