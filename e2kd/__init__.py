"""e2kd: explanation-enhanced knowledge distillation as a plugin-based toolkit."""

from . import errors
from .hookspecs import hookimpl
from .registry import (
    get_explainer,
    get_metric,
    get_model_builder,
    get_similarity,
    list_plugins,
    register_plugin,
    unregister_plugin,
)

__version__ = "0.1.0"

__all__ = [
    "hookimpl",
    "get_explainer",
    "get_similarity",
    "get_metric",
    "get_model_builder",
    "list_plugins",
    "register_plugin",
    "unregister_plugin",
    "__version__",
]
