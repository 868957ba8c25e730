"""e2kd: explanation-enhanced knowledge distillation as a plugin-based toolkit."""

from . import errors
from .hookspecs import hookimpl
from .registry import (
    get_dataset,
    get_explainer,
    get_metric,
    get_model_builder,
    get_similarity,
    list_plugins,
    register_plugin,
    unregister_plugin,
)

__version__ = "0.1.0"

_NOTEBOOK_API = ("load_run", "explain", "compare", "show", "sample_images")


def __getattr__(name: str):
    """The notebook API (``e2kd.explain``, ``e2kd.show``, ...) is imported on first use."""
    if name in _NOTEBOOK_API:
        from . import notebook

        return getattr(notebook, name)
    raise AttributeError(f"module 'e2kd' has no attribute {name!r}")


__all__ = [
    "errors",
    "hookimpl",
    "get_dataset",
    "get_explainer",
    "get_similarity",
    "get_metric",
    "get_model_builder",
    "list_plugins",
    "register_plugin",
    "unregister_plugin",
    "__version__",
    *_NOTEBOOK_API,
]
