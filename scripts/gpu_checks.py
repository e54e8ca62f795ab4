"""The Python checks that scripts/gpu_check.sh runs; each prints one PASS/FAIL line with its
figures and exits 0 (pass) or 1 (fail).

    python scripts/gpu_checks.py vllm-greedy [--model builtin:smollm2-135m] [--device cuda]
    python scripts/gpu_checks.py gpus

`vllm-greedy`: vLLM (VLLMEngine) and transformers (HFEngine) on the same model and device,
float32, greedy, 4 prompts x 32 new tokens: the token ids must be equal. On this CPU machine the
same check runs with `--device cpu` (tests/unit/test_gpu_check.py), so only the CUDA kernels are
new on a GPU.
`gpus`: the number of CUDA devices torch sees (0 is a FAIL).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

PROMPTS = (
    "Write a haiku about rain.",
    "What is 17 times 23?",
    "Name three prime numbers.",
    "Describe a frozen lake in one sentence.",
)


def vllm_greedy(model: str, device: str, tokens: int) -> tuple[bool, str]:
    import torch

    from spear_ray.agent.chat import ChatFormat
    from spear_ray.engines.base import SamplingSpec
    from spear_ray.engines.hf_engine import HFEngine
    from spear_ray.engines.vllm_engine import VLLMEngine
    from spear_ray.models import resolve_model_path

    if device == "cuda" and not torch.cuda.is_available():
        return False, "torch sees no CUDA device"
    path = resolve_model_path(model)
    started = time.perf_counter()
    engine = VLLMEngine(
        path, dtype="float32", max_model_len=512, cpu_kv_cache_gib=0.25, gpu_memory_utilization=0.3
    )
    try:
        reference = HFEngine(path, dtype="float32", device=device)
        chat = ChatFormat(reference.tokenizer)
        spec = SamplingSpec(max_tokens=tokens, temperature=0.0)
        prompts = [chat.prompt_ids(p) for p in PROMPTS]

        async def generate():
            return await asyncio.gather(*(engine.generate(p, spec) for p in prompts))

        ours = asyncio.run(generate())
        theirs = [reference.generate_sync(p, spec) for p in prompts]
    finally:
        engine.shutdown()
    equal = sum(a.token_ids == b.token_ids for a, b in zip(ours, theirs, strict=True))
    figures = (
        f"{equal}/{len(prompts)} prompts give equal greedy tokens ({tokens} new tokens, "
        f"{model}, float32, {engine.device}); engine start {engine.startup_s:.1f} s, "
        f"total {time.perf_counter() - started:.1f} s"
    )
    return equal == len(prompts), figures


def gpus() -> tuple[bool, str]:
    import torch

    count = torch.cuda.device_count()
    names = [torch.cuda.get_device_name(i) for i in range(count)]
    return count > 0, f"{count} CUDA device(s): {', '.join(names) or 'none'}"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="check", required=True)
    greedy = sub.add_parser("vllm-greedy", help="vLLM's greedy tokens equal transformers'")
    greedy.add_argument("--model", default="builtin:smollm2-135m")
    greedy.add_argument("--device", default="cuda", choices=("cuda", "cpu"))
    greedy.add_argument("--tokens", type=int, default=32)
    sub.add_parser("gpus", help="CUDA devices torch sees")
    args = parser.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    try:
        if args.check == "vllm-greedy":
            ok, figures = vllm_greedy(args.model, args.device, args.tokens)
        else:
            ok, figures = gpus()
    except Exception as err:  # a check that crashes is a FAIL line, not a traceback
        ok, figures = False, f"{type(err).__name__}: {' '.join(str(err).split())}"
    print(f"{'PASS' if ok else 'FAIL'} {args.check}: {figures}", flush=True)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
