"""spear-ray: SPEAR (curriculum self-imitation learning for agentic LLMs) on Ray.

`import spear_ray` stays light: heavy libraries (ray, vllm, deepspeed, textworld) are imported
inside the modules and classes that need them.
"""

__version__ = "0.1.0"
