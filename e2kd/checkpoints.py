"""Model weights from the files people hold, read without unpickling arbitrary objects.

The format is detected by content, not by name:

- **safetensors** (timm and the Hugging Face hub cache store ``model.safetensors``): an 8-byte
  little-endian header length, then a JSON header;
- **torch.save** files (zip or legacy), read with ``weights_only=True``: a plain state dict
  (``.pt`` / ``.pth``, torchvision's and B-cos-v2's release files), or a training checkpoint that
  nests it under ``state_dict`` (Lightning), ``model`` (e2kd, DeiT), ``model_state_dict`` or
  ``module``.

Key prefixes that wrappers add — ``module.`` (DistributedDataParallel), ``model.`` (Lightning),
``_orig_mod.`` (``torch.compile``) — are removed when the model's own keys lack them. A file named
like a torch.hub download, ``<name>-<hash>.pth`` with a hexadecimal hash of 8 or more characters
(at least one of them a letter, so dates are not taken for hashes), has that hash checked against
the start of the file's SHA-256. Every problem is one :class:`~e2kd.errors.ModelError` line that
names the file.
"""

from __future__ import annotations

import pickle
import re
import struct
import warnings
from pathlib import Path

import torch
from torch import nn

from .digests import file_sha256
from .errors import ModelError

#: Keys under which training checkpoints nest the weights, tried in this order.
NESTING_KEYS = ("state_dict", "model", "model_state_dict", "module")
#: Prefixes that wrappers put before every key.
WRAPPER_PREFIXES = ("module.", "model.", "_orig_mod.")
_HUB_HASH = re.compile(r"-([0-9a-f]{8,})\.[A-Za-z]+$")
_SHOWN = 3  # names listed per kind of mismatch


def read_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """The tensors of a weights file, un-nested (see the module docstring)."""
    path = Path(path)
    if not path.is_file():
        raise ModelError(f"checkpoint {path}: file not found (train it first or fix the path)")
    check_hub_hash(path)
    state = _read_safetensors(path) if is_safetensors(path) else _read_torch(path)
    return _unnest(state, path)


def is_safetensors(path: Path) -> bool:
    """Whether the file starts like a safetensors file (header length, then a JSON object)."""
    with path.open("rb") as f:
        head = f.read(9)
    if len(head) < 9:
        return False
    (length,) = struct.unpack("<Q", head[:8])
    return head[8:9] == b"{" and 0 < length <= path.stat().st_size - 8


def check_hub_hash(path: Path) -> None:
    """For ``<name>-<hash>.<ext>`` files, the hash must start the file's SHA-256 (torch.hub's rule)."""
    match = _HUB_HASH.search(path.name)
    if match is None or not re.search("[a-f]", match.group(1)):
        return
    expected = match.group(1)
    actual = file_sha256(path)
    if not actual.startswith(expected):
        raise ModelError(
            f"checkpoint {path}: its name says SHA-256 {expected}…, the file's is {actual[: len(expected)]}…; "
            f"the download is incomplete or corrupt (fetch it again, or rename the file if the suffix is "
            f"not a hash)"
        )


def _read_safetensors(path: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    try:
        return load_file(str(path), device="cpu")
    except Exception as exc:
        raise ModelError(f"checkpoint {path}: a damaged safetensors file ({type(exc).__name__}: {exc})") from None


def _read_torch(path: Path) -> object:
    try:
        with warnings.catch_warnings():  # torch's "Detected pickle protocol N ... file an issue" on plain pickles
            warnings.filterwarnings("ignore", message="Detected pickle protocol")
            return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        if "GLOBAL" in str(exc):  # the weights-only unpickler met a class or function to import
            raise ModelError(
                f"checkpoint {path}: holds pickled Python objects besides tensors (e.g. a whole model saved "
                f"with torch.save(model)); e2kd does not unpickle those: save model.state_dict() "
                f"instead"
            ) from None
        raise ModelError(
            f"checkpoint {path}: neither a safetensors nor a torch.save file (it does not unpickle as tensors)"
        ) from None
    except Exception as exc:
        raise ModelError(
            f"checkpoint {path}: neither a safetensors nor a torch.save file ({type(exc).__name__}: {str(exc)[:200]})"
        ) from None


def _is_state_dict(value: object) -> bool:
    return (
        isinstance(value, dict)
        and bool(value)
        and all(isinstance(k, str) and torch.is_tensor(v) for k, v in value.items())
    )


def _unnest(state: object, path: Path) -> dict[str, torch.Tensor]:
    if _is_state_dict(state):
        return state
    if isinstance(state, dict):
        for key in NESTING_KEYS:
            if _is_state_dict(state.get(key)):
                return state[key]
        keys = ", ".join(map(repr, list(state)[:8]))
        raise ModelError(
            f"checkpoint {path}: holds no state dict (top-level keys {keys}; weights are looked for at the "
            f"top level and under {', '.join(NESTING_KEYS)})"
        )
    raise ModelError(f"checkpoint {path}: holds a {type(state).__name__}, not a state dict")


def fit_keys(state: dict[str, torch.Tensor], expected: set[str]) -> dict[str, torch.Tensor]:
    """``state`` with wrapper prefixes removed, as long as that makes more keys match ``expected``."""
    changed = True
    while changed:
        changed = False
        for prefix in WRAPPER_PREFIXES:
            if all(k.startswith(prefix) for k in state) and not any(k.startswith(prefix) for k in expected):
                state = {k[len(prefix) :]: v for k, v in state.items()}
                changed = True
    return state


def load_weights(model: nn.Module, path: str | Path) -> None:
    """Load a weights file into ``model`` strictly: every key present, none extra, every shape equal."""
    path = Path(path)
    own = model.state_dict()
    state = fit_keys(read_state_dict(path), set(own))
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    wrong = [
        f"{k} {tuple(state[k].shape)} vs {tuple(v.shape)}"
        for k, v in own.items()
        if k in state and state[k].shape != v.shape
    ]
    if missing or unexpected or wrong:
        parts = [
            f"{label} {_first(names)}"
            for label, names in (("missing", missing), ("unexpected", unexpected), ("shape (file vs model):", wrong))
            if names
        ]
        raise ModelError(
            f"checkpoint {path}: does not fit {type(model).__name__} (expects {len(own)} tensors): {'; '.join(parts)}"
        )
    model.load_state_dict(state)


def _first(names: list[str]) -> str:
    more = f" (+{len(names) - _SHOWN} more)" if len(names) > _SHOWN else ""
    return ", ".join(names[:_SHOWN]) + more
