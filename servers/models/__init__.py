"""Models the reference servers host; built here, never downloaded at run time (DESIGN.md)."""

from servers.models.builtin import MLP, Identity, builtin_models

__all__ = ["MLP", "Identity", "builtin_models"]
