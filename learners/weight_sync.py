"""Moving the learner's weights to the rollout engines, by one of two transports
(`learner.weight_transport`), both bucketed the same way: learner rank 0 cuts its full state dict
(in the engines' dtype) into size-bounded buckets, each ONE flat byte buffer plus a small table of
(name, dtype, shape, offset), so every dtype travels in the same buffers.

object_store (the default; runs everywhere, tested): the buckets are put into the Ray object
store. Numpy buffers travel zero-copy through it, so a bucket costs one copy in and one out. The
rollout side awaits the buckets one at a time:

    refs = put_weights(state_dict, bucket_bytes=64 << 20)        # on learner rank 0
    weights = BucketedWeights(refs)                               # picklable, holds only refs
    await engine.update_weights(await weights.fetch(), version)

collective: a torch.distributed process group of learner rank 0 (rank 0, the sender) and the
rollout workers (ranks 1..N, in worker order), built directly from a TCPStore that rank 0 hosts,
so neither DeepSpeed's default group in the learner nor vLLM's in the workers is touched. gloo
with CPU buffers, or NCCL with GPU buffers when the learner and the workers hold whole GPUs
(collective_backend), the same code. NCCL is NOT RUN HERE (no GPU on these machines); with
rollout.tensor_parallel_size > 1 the worker receives on its own GPU and vLLM's collective_rpc
hands the tensors to its TP processes, fine for small models only. The bucket table is planned
once, when the group is formed, and handed to every member with the group's address (a
WeightGroupSpec, through the driver), so a receiver allocates each bucket before it arrives:

    group = WeightGroup.host(state_dict, address=ip, world_size=1 + n, ...)   # learner rank 0
    # the driver hands group.spec to worker k, which runs WeightGroup(spec, rank=k).connect()
    group.connect(); group.send(state_dict)                       # rank 0, every sync
    named_tensors = member.receive()                              # ranks 1..N, every sync

Every wait of the group (forming it, each bucket) fails after the spec's timeout_s with a
WeightGroupError instead of hanging, and a member whose send or receive fails closes its end at
once, so that its peers fail fast too. actors.rollout_group.RolloutGroup.sync_weights forms,
re-forms (after a worker restart or a failure) and closes the group, and falls back to the object
store when it fails.
"""

from __future__ import annotations

import contextlib
import datetime
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


def pack_bucket_tensor(
    specs: list[TensorSpec], tensors: Mapping[str, Tensor], device: Any = "cpu"
) -> Tensor:
    """The flat uint8 buffer of one planned bucket as a tensor on `device` (the tensors are
    copied into it, from whatever device they are on)."""
    buffer = torch.zeros(bucket_size(specs), dtype=torch.uint8, device=device)
    for spec in specs:
        flat = tensors[spec.name].detach().contiguous().reshape(-1).view(torch.uint8)
        buffer[spec.offset : spec.offset + spec.nbytes].copy_(flat)
    return buffer


def pack_bucket(specs: list[TensorSpec], tensors: Mapping[str, Tensor]) -> np.ndarray:
    """The flat uint8 buffer of one planned bucket (tensors are copied to host memory)."""
    return pack_bucket_tensor(specs, tensors).numpy()


def unpack_bucket(
    specs: list[TensorSpec], buffer: np.ndarray | Tensor, *, copy: bool = True
) -> Iterator[tuple[str, Tensor]]:
    """(name, tensor) of one bucket. By default each tensor is a fresh copy: buffers that come
    out of the object store are read-only shared memory, and a consumer may keep what it is
    given. copy=False gives views of the buffer (read-only ones of the object store's memory),
    for a consumer that copies them into its own parameters at once (a vLLM engine's reload
    does): one copy of the model less. A tensor buffer (a collective's) stays on its device."""
    if isinstance(buffer, Tensor):
        data = buffer.clone() if copy else buffer
    elif copy:
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


# --------------------------------------------------------------------------- collective group


def collective_backend(gpus_per_learner: float, gpus_per_rollout_worker: float) -> str:
    """The weight group's backend: "nccl" (GPU buffers) when learner rank 0 and every rollout
    worker hold whole GPUs of their own, else "gloo" (host buffers). NCCL cannot connect two
    processes on one GPU, so actors that share GPUs (fractions) go through host memory, like
    CPU ones."""
    return "nccl" if gpus_per_learner >= 1 and gpus_per_rollout_worker >= 1 else "gloo"


class WeightGroupError(RuntimeError):
    """The collective weight group failed: a member died, did not join or answer within the
    group's timeout, is not in the group it was asked to sync (restarted since), or the weights
    no longer match the bucket table the group was formed with."""


@dataclass(frozen=True)
class WeightGroupSpec:
    """What every member needs to join one weight group; picklable, handed out by the driver."""

    address: str  # learner rank 0's node, where its TCPStore listens
    port: int
    world_size: int  # 1 (learner rank 0) + the rollout workers in the group
    generation: int  # the driver numbers its groups; a member refuses a sync of another one
    backend: str  # "gloo" (CPU buffers) or "nccl" (GPU buffers; NOT RUN HERE)
    timeout_s: float  # of every wait: forming the group, each bucket
    bucket_bytes: int
    buckets: tuple[tuple[TensorSpec, ...], ...]  # the bucket table, in send order

    @property
    def nbytes(self) -> int:
        return sum(bucket_size(list(specs)) for specs in self.buckets)


class WeightGroup:
    """One member's end of a weight group: rank 0 (learner rank 0) sends, ranks 1..N receive.

    The process group is built directly from the store (torch.distributed.ProcessGroupGloo /
    ProcessGroupNCCL), not through init_process_group, so it is no process's default group and
    leaves DeepSpeed's and vLLM's groups alone. Not thread-safe: one send or receive at a time.
    """

    def __init__(self, spec: WeightGroupSpec, rank: int, store: Any = None):
        if not 0 <= rank < spec.world_size:
            raise ValueError(f"rank {rank} outside the weight group's size {spec.world_size}")
        self.spec = spec
        self.rank = rank
        self._store = store  # rank 0's is the TCPStore it hosts; the others connect in connect()
        self._pg: Any = None
        if spec.backend == "nccl":  # NOT RUN HERE (no GPU on these machines)
            self.device = torch.device("cuda", torch.cuda.current_device())
        else:
            self.device = torch.device("cpu")

    @classmethod
    def host(
        cls,
        state_dict: Mapping[str, Tensor],
        *,
        address: str,
        world_size: int,
        generation: int,
        backend: str,
        timeout_s: float,
        bucket_bytes: int = DEFAULT_BUCKET_BYTES,
    ) -> WeightGroup:
        """Rank 0's end: the group's TCPStore, listening on a port of this node that the OS picks
        (no race for a "free" port), and the bucket table of `state_dict`. Hand `.spec` to the
        other members; then every member calls connect()."""
        from torch.distributed import TCPStore

        if backend not in ("gloo", "nccl"):
            raise ValueError(f"backend must be 'gloo' or 'nccl', got {backend!r}")
        try:
            store = TCPStore(
                address,
                0,
                world_size,
                is_master=True,
                timeout=datetime.timedelta(seconds=timeout_s),
                wait_for_workers=False,
            )
        except Exception as err:
            raise WeightGroupError(f"could not start the weight group's store: {err}") from err
        plan = plan_buckets(state_dict.items(), bucket_bytes)
        spec = WeightGroupSpec(
            address=address,
            port=int(store.port),
            world_size=world_size,
            generation=generation,
            backend=backend,
            timeout_s=timeout_s,
            bucket_bytes=bucket_bytes,
            buckets=tuple(tuple(specs) for specs in plan),
        )
        return cls(spec, 0, store)

    def connect(self) -> WeightGroup:
        """Join the process group; returns when every member has (blocking: run it off an event
        loop). A WeightGroupError if they have not all come within the timeout. (NCCL connects
        lazily, so there a missing member shows only at the first broadcast. NOT RUN HERE.)"""
        import torch.distributed as dist

        spec, timeout = self.spec, datetime.timedelta(seconds=self.spec.timeout_s)
        try:
            if self._store is None:
                self._store = dist.TCPStore(
                    spec.address, spec.port, spec.world_size, is_master=False, timeout=timeout
                )
            # one key space per group: a re-formed group never reads its predecessor's keys
            store = dist.PrefixStore(f"spear-weights/{spec.generation}", self._store)
            if spec.backend == "nccl":  # NOT RUN HERE
                options = dist.ProcessGroupNCCL.Options()
                options._timeout = timeout
                self._pg = dist.ProcessGroupNCCL(store, self.rank, spec.world_size, options)
            else:
                self._pg = dist.ProcessGroupGloo(store, self.rank, spec.world_size, timeout)
        except Exception as err:
            self.close()
            raise WeightGroupError(
                f"weight group {spec.generation} ({spec.backend}, {spec.world_size} members at "
                f"{spec.address}:{spec.port}) did not form within {spec.timeout_s:g} s as rank "
                f"{self.rank}: {_first_line(err)}"
            ) from err
        return self

    def send(self, state_dict: Mapping[str, Tensor]) -> int:
        """Rank 0: broadcast `state_dict` bucket by bucket (packing the next bucket while the
        previous one is on the wire); the bytes sent. The tensors must be the ones the bucket
        table was planned from (same names, shapes and dtypes, in order)."""
        if self.rank != 0:
            raise RuntimeError("WeightGroup.send: only rank 0 sends")
        try:
            plan = plan_buckets(state_dict.items(), self.spec.bucket_bytes)
            if [tuple(specs) for specs in plan] != list(self.spec.buckets):
                raise WeightGroupError(
                    "the weights no longer match the bucket table this weight group was formed "
                    "with (names, shapes or dtypes changed): re-form the group"
                )
            in_flight = None
            for specs in self.spec.buckets:
                buffer = pack_bucket_tensor(list(specs), state_dict, device=self.device)
                work = self._broadcast(buffer)
                if in_flight is not None:
                    self._wait(*in_flight)
                in_flight = (work, buffer)  # the buffer must live until its broadcast is done
            if in_flight is not None:
                self._wait(*in_flight)
        except BaseException:
            self.close()  # the receivers' waits fail at once instead of after the timeout
            raise
        return self.spec.nbytes

    def receive(self) -> list[tuple[str, Tensor]]:
        """Ranks 1..N: every (name, tensor) of one broadcast, in the sender's order; views of
        this call's own buffers (on the group's device), for a consumer that copies them into
        its parameters (a vLLM engine's reload does). Blocking: run it off an event loop."""
        if self.rank == 0:
            raise RuntimeError("WeightGroup.receive: rank 0 sends")
        try:
            buffers = [
                torch.empty(bucket_size(list(specs)), dtype=torch.uint8, device=self.device)
                for specs in self.spec.buckets
            ]
            works = [self._broadcast(buffer) for buffer in buffers]  # all posted at once
            for work, buffer in zip(works, buffers, strict=True):
                self._wait(work, buffer)
        except BaseException:
            self.close()  # a failed member leaves; the driver re-forms the group
            raise
        return [
            item
            for specs, buffer in zip(self.spec.buckets, buffers, strict=True)
            for item in unpack_bucket(list(specs), buffer, copy=False)
        ]

    def _broadcast(self, buffer: Tensor) -> Any:
        import torch.distributed as dist

        if self._pg is None:
            raise WeightGroupError(
                f"weight group {self.spec.generation}: rank {self.rank} is not connected"
            )
        options = dist.BroadcastOptions()
        options.rootRank = 0
        options.rootTensor = 0
        return self._pg.broadcast([buffer], options)

    def _wait(self, work: Any, buffer: Tensor) -> None:
        try:
            work.wait()
            if buffer.is_cuda:  # NOT RUN HERE: NCCL's wait only orders the current stream
                torch.cuda.current_stream(buffer.device).synchronize()
        except Exception as err:
            raise WeightGroupError(
                f"weight group {self.spec.generation}: rank {self.rank}'s broadcast of "
                f"{buffer.numel()} bytes failed: {_first_line(err)}"
            ) from err

    @property
    def connected(self) -> bool:
        return self._pg is not None

    def close(self) -> None:
        """Leave the group (its peers' waits fail at once); rank 0 also stops the store.
        Idempotent."""
        pg, self._pg = self._pg, None
        if pg is not None:
            # best effort: dropping the last reference closes it too
            with contextlib.suppress(Exception):
                pg.shutdown()
        self._store = None


def _first_line(err: BaseException) -> str:
    text = str(err).strip() or type(err).__name__
    return text.splitlines()[0][:300]


__all__ = [
    "DEFAULT_BUCKET_BYTES",
    "BucketedWeights",
    "TensorSpec",
    "WeightGroup",
    "WeightGroupError",
    "WeightGroupSpec",
    "bucket_size",
    "collective_backend",
    "iter_buckets",
    "pack_bucket",
    "pack_bucket_tensor",
    "plan_buckets",
    "put_weights",
    "unpack_bucket",
]
