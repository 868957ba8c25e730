"""Meta-tests: every hook is documented and implemented by a built-in plugin."""

import importlib.metadata as metadata
import inspect

from e2kd import hookspecs
from e2kd.registry import KINDS

HOOKS = [name for name, fn in inspect.getmembers(hookspecs, inspect.isfunction) if name.startswith("register_")]


def test_every_hook_is_documented():
    assert set(HOOKS) == {hook for hook, _ in KINDS.values()}
    for name in HOOKS:
        doc = inspect.getdoc(getattr(hookspecs, name))
        assert doc and ":param register:" in doc and "Called" in doc, name


def test_every_hook_has_a_builtin_implementation():
    modules = [ep.load() for ep in metadata.entry_points(group="e2kd") if ep.value.startswith("e2kd_plugins.")]
    implemented = {name for m in modules for name in HOOKS if hasattr(m, name)}
    assert implemented == set(HOOKS)


def test_core_imports_no_builtin_plugin():
    import pathlib

    core = pathlib.Path(hookspecs.__file__).parent
    for path in core.rglob("*.py"):
        assert "e2kd_plugins" not in path.read_text(), path
