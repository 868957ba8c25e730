"""Weights by name: ``<source>:<spec>`` resolved to a file in a library's cache, pinned by a lock file.

A model's ``checkpoint`` is a path or a weight name, e.g. ``hf-hub:timm/resnet34.tv_in1k@<commit>``,
``timm:resnet34.tv_in1k``, ``torchvision:ResNet34_Weights.IMAGENET1K_V1`` or ``bcos-v2:resnet_34``
(``e2kd plugins --kind weights`` lists the sources). Files live where the libraries keep them — the
Hugging Face hub cache (``HF_HOME``/``HF_HUB_CACHE``), ``torch.hub``'s checkpoint folder
(``TORCH_HOME``) — so a file fetched once serves every tool. With ``HF_HUB_OFFLINE=1`` nothing is
downloaded and a missing file is one line naming the command that fetches it.

``e2kd weights fetch NAME...`` downloads and writes a lock file (``e2kd-weights.lock`` in the current
folder, or ``$E2KD_WEIGHTS_LOCK``): per name the resolved revision and the file's SHA-256. A later
resolution of a locked name asks for the locked revision and refuses a file whose SHA-256 differs.
"""

from __future__ import annotations

import json
import os
import re
import urllib.error
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

from .api import WeightFile, WeightSource
from .checkpoints import check_hub_hash
from .digests import cached_file_sha256
from .errors import ConfigError, ModelError, PluginError, WeightsNotCached
from .storage import atomic_write_json

#: ``<source>:<spec>``; a source name has 2+ characters (so ``C:\\...`` stays a path), and ``scheme://``
#: addresses are not names.
_NAME = re.compile(r"^(?P<source>[a-z][a-z0-9_-]+):(?!//)(?P<spec>\S+)$")
LOCK_FILE = "e2kd-weights.lock"
LOCK_VAR = "E2KD_WEIGHTS_LOCK"
_TRUE = ("1", "true", "yes", "on")


def is_weight_name(value: Any) -> bool:
    """Whether ``value`` is a string of the form ``<source>:<spec>`` (not a path)."""
    return isinstance(value, str) and _NAME.match(value) is not None


def offline() -> bool:
    """True when downloads are forbidden: ``HF_HUB_OFFLINE`` (or ``E2KD_OFFLINE``) set to 1/true/yes/on."""
    return any(os.environ.get(var, "").strip().lower() in _TRUE for var in ("HF_HUB_OFFLINE", "E2KD_OFFLINE"))


@dataclass(frozen=True)
class ResolvedWeights:
    """A weight name resolved to a local file, with what pins that file exactly."""

    name: str
    path: Path
    sha256: str
    revision: str | None = None
    origin: str | None = None

    def record(self) -> dict[str, Any]:
        """What a run's env.json and the lock file keep of it."""
        return {"name": self.name, "revision": self.revision, "sha256": self.sha256, "origin": self.origin}


def lock_path() -> Path:
    """The lock file in effect: ``$E2KD_WEIGHTS_LOCK``, else ``e2kd-weights.lock`` in the current folder."""
    return Path(os.environ.get(LOCK_VAR) or LOCK_FILE)


def read_lock(path: Path | None = None) -> dict[str, dict[str, Any]]:
    """The entries of a lock file, by name (none when the file does not exist)."""
    path = path or lock_path()
    if not path.is_file():
        return {}
    try:
        entries = json.loads(path.read_text())["weights"]
        if not isinstance(entries, dict):
            raise TypeError
        return entries
    except (ValueError, KeyError, TypeError):
        raise ConfigError(
            f"{path}: not an e2kd weights lock file (delete it and run `e2kd weights fetch NAME...` again)"
        ) from None


def write_lock(resolved: list[ResolvedWeights], path: Path | None = None) -> Path:
    """Add (or replace) the entries of ``resolved`` in the lock file, atomically."""
    path = path or lock_path()
    entries = read_lock(path)
    for weights in resolved:
        entries[weights.name] = {k: v for k, v in weights.record().items() if k != "name"}
    atomic_write_json(path, {"version": 1, "weights": dict(sorted(entries.items()))})
    return path


def resolve(name: str, *, download: bool | None = None, locked: bool = True) -> ResolvedWeights:
    """The local file of the weight name ``name``, found (or fetched, unless offline) by its source.

    ``download`` None: allowed unless :func:`offline`. ``locked``: honour the lock file — ask for its
    revision and refuse a file whose SHA-256 differs from the locked one (``e2kd weights fetch``
    passes False, as it rewrites the entry).
    """
    match = _NAME.match(name)
    if match is None:
        raise ModelError(f"{name!r} is not a weight name (<source>:<spec>, e.g. hf-hub:timm/resnet34.tv_in1k)")
    source = _source(match["source"], who=f"{name}: ")
    entry = read_lock().get(name) if locked else None
    download = not offline() if download is None else download
    try:
        found = source.locate(match["spec"], revision=(entry or {}).get("revision"), download=download)
    except WeightsNotCached as exc:
        how = "downloads are off (HF_HUB_OFFLINE=1)" if not download else "it could not be downloaded"
        raise WeightsNotCached(
            f"{name}: {exc}; {how} — run `e2kd weights fetch {name}` on a machine with internet "
            f"(sharing HF_HOME / TORCH_HOME with this one)"
        ) from None
    sha256 = cached_file_sha256(found.path)
    if entry is not None and entry.get("sha256") != sha256:
        raise ModelError(
            f"{name}: the cached file {found.path} has SHA-256 {sha256[:12]}…, the lock file {lock_path()} says "
            f"{str(entry.get('sha256'))[:12]}…; run `e2kd weights fetch {name}` to lock the file you have, "
            f"or restore the locked one"
        )
    return ResolvedWeights(name, found.path, sha256, found.revision, found.origin)


def known_names(sources: list[str]) -> list[str]:
    """The weight names the given sources know by heart (``<source>:<spec>``; open-ended sources list none)."""
    return [f"{source}:{spec}" for source in sources for spec in _source(source).names()]


def _source(name: str, who: str = "") -> WeightSource:
    """The registered weight source ``name``; a one-line error listing the known ones otherwise."""
    from .registry import create, list_plugins

    try:
        return create("weights", name)
    except PluginError:
        known = ", ".join(sorted(i.name for i in list_plugins("weights")))
        raise ModelError(
            f"{who}unknown weight source {name!r} (known: {known}; `e2kd plugins --kind weights`)"
        ) from None


def checkpoint_file(checkpoint: str | Path) -> Path:
    """The local file of a checkpoint given as a path or as a weight name."""
    return resolve(checkpoint).path if is_weight_name(checkpoint) else Path(checkpoint)


def fetch(names: list[str], *, lock: Path | None = None) -> list[ResolvedWeights]:
    """Download (or find, offline) every name at its source's current revision; write their lock entries."""
    resolved = [resolve(name, locked=False) for name in names]
    write_lock(resolved, lock)
    return resolved


def compare(first: str | Path, second: str | Path) -> dict[str, Any]:
    """Whether two weight files (paths or names) hold the same tensors: keys only in one of them, keys
    whose shapes differ, and the largest absolute difference over the tensors both hold."""
    from .checkpoints import read_state_dict

    a, b = (read_state_dict(checkpoint_file(x)) for x in (first, second))
    shared = sorted(set(a) & set(b))
    same_shape = [k for k in shared if a[k].shape == b[k].shape]
    differences = {k: (a[k].double() - b[k].double()).abs().max().item() if a[k].numel() else 0.0 for k in same_shape}
    return {
        "only_first": sorted(set(a) - set(b)),
        "only_second": sorted(set(b) - set(a)),
        "shape_differs": [k for k in shared if a[k].shape != b[k].shape],
        "max_abs_difference": max(differences.values(), default=0.0),
        "differing": sorted(k for k, d in differences.items() if d > 0),
        "tensors": len(shared),
    }


# -- the libraries' caches, for sources to use -----------------------------------------------------


def hf_hub_cache() -> Path:
    """The Hugging Face hub cache folder, by the library's own rule, read now (not at import)."""
    if os.environ.get("HF_HUB_CACHE"):
        return Path(os.environ["HF_HUB_CACHE"]).expanduser()
    home = os.environ.get("HF_HOME") or Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "huggingface"
    return Path(home).expanduser() / "hub"


#: Weight files a hub repository may hold, in the order they are tried.
HUB_WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin")


def hf_hub_file(
    repo_id: str, *, revision: str | None, download: bool, filenames: tuple[str, ...] = HUB_WEIGHT_FILES
) -> WeightFile:
    """The first of ``filenames`` in the hub repository ``repo_id`` at ``revision`` (None: main),
    from the hub cache or downloaded into it (with huggingface_hub's progress bar)."""
    from huggingface_hub import hf_hub_download
    from huggingface_hub.errors import (
        EntryNotFoundError,
        HFValidationError,
        LocalEntryNotFoundError,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    cache = hf_hub_cache()
    for filename in filenames:
        try:
            path = Path(
                hf_hub_download(repo_id, filename, revision=revision, cache_dir=cache, local_files_only=not download)
            )
        except LocalEntryNotFoundError:
            continue  # not cached (or no network): try the next file name
        except RepositoryNotFoundError:
            raise ModelError(
                f"hf-hub:{repo_id}: no such repository on the hub (or it is private: `hf auth login`)"
            ) from None
        except RevisionNotFoundError:
            raise ModelError(f"hf-hub:{repo_id}: the hub has no revision {revision!r}") from None
        except EntryNotFoundError:
            continue  # the repository has no file of this name
        except HFValidationError as exc:
            raise ModelError(f"hf-hub:{repo_id}: not a hub repository id ({exc})") from None
        return WeightFile(path, revision=path.parent.name, origin=f"https://huggingface.co/{repo_id}")
    at = f"@{revision}" if revision else ""
    raise WeightsNotCached(f"{repo_id}{at} ({' or '.join(filenames)}) is not in the Hugging Face cache {cache}")


def torch_hub_file(url: str, *, download: bool) -> WeightFile:
    """The file of ``url`` in ``torch.hub``'s checkpoint folder (where torchvision and the bcos package
    keep theirs), downloaded there if missing; a ``<name>-<hash>`` file's hash is checked."""
    import torch.hub

    path = Path(torch.hub.get_dir()) / "checkpoints" / Path(urlparse(url).path).name
    if path.is_file() and download:
        try:
            check_hub_hash(path)
        except ModelError:
            path.unlink()  # a damaged file where a download is allowed: fetch it again
    if not path.is_file():
        if not download:
            raise WeightsNotCached(f"{path.name} is not in torch.hub's cache {path.parent}")
        path.parent.mkdir(parents=True, exist_ok=True)
        try:
            torch.hub.download_url_to_file(url, str(path), progress=True)
        except (urllib.error.URLError, OSError) as exc:
            raise WeightsNotCached(f"{url} could not be fetched ({exc})") from None
    check_hub_hash(path)
    return WeightFile(path, revision=None, origin=url)
