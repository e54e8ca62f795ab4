"""Sandboxed execution of model-written Python: a fork-server per node inside bubblewrap.

`SandboxClient(SandboxConfig()).run_python(code) -> ExecResult`; see client.py and server.py.
"""

from spear_ray.sandbox.client import SandboxClient, SandboxUnavailableError
from spear_ray.sandbox.config import SandboxConfig
from spear_ray.sandbox.result import ExecResult

__all__ = ["ExecResult", "SandboxClient", "SandboxConfig", "SandboxUnavailableError"]
