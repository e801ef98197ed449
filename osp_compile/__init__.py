"""osp-compile: turn a dense video DiT into the OSP-Next model as torch.fx passes.

Public API: `convert`, `OSPConfig`, and the torch.compile backend ``"osp"``.
"""
from . import ops  # noqa: F401  (registers the osp:: operators)
from .config import OSPConfig
from .convert import OSPModule, convert
from .errors import OSPAnalysisError, OSPConfigError, OSPError, OSPUnsupportedError

__version__ = "0.1.0"
__all__ = ["convert", "OSPConfig", "OSPModule", "OSPError", "OSPConfigError", "OSPAnalysisError", "OSPUnsupportedError"]
