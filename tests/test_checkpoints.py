"""Teachers people already have: weights files detected by content, nested, prefixed, hash-named."""

import hashlib
import pickle
import struct

import pytest
import torch
import yaml
from safetensors.torch import save_file

import e2kd
from e2kd.checkpoints import load_weights, read_state_dict
from e2kd.cli import main
from e2kd.errors import ModelError
from e2kd.testing import TinyCNN

from .conftest import TINY


def _model(seed=0):
    torch.manual_seed(seed)
    return TinyCNN(width=4, bn=True)


def _assert_same_weights(a, b):
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def test_plain_state_dict_loads(tmp_path):
    source, target = _model(0), _model(1)
    torch.save(source.state_dict(), tmp_path / "weights.pth")
    load_weights(target, tmp_path / "weights.pth")
    _assert_same_weights(source, target)


@pytest.mark.parametrize("name", ["model.safetensors", "weights.bin"])
def test_safetensors_is_detected_by_content(tmp_path, name):
    source, target = _model(0), _model(1)
    save_file({k: v.contiguous() for k, v in source.state_dict().items()}, str(tmp_path / name))
    load_weights(target, tmp_path / name)
    _assert_same_weights(source, target)


@pytest.mark.parametrize(
    "wrap",
    [
        lambda s: {"state_dict": {f"model.{k}": v for k, v in s.items()}, "epoch": 3, "global_step": 10},  # Lightning
        lambda s: {"model": {f"module.{k}": v for k, v in s.items()}, "optimizer": {"lr": 0.1}},  # DDP + e2kd
        lambda s: {"model_state_dict": {f"_orig_mod.{k}": v for k, v in s.items()}},  # torch.compile
        lambda s: {f"module.model.{k}": v for k, v in s.items()},  # DDP around Lightning
    ],
    ids=["lightning", "ddp", "compiled", "two_prefixes"],
)
def test_nested_and_prefixed_training_checkpoints_load(tmp_path, wrap):
    source, target = _model(0), _model(1)
    torch.save(wrap(source.state_dict()), tmp_path / "last.ckpt")
    load_weights(target, tmp_path / "last.ckpt")
    _assert_same_weights(source, target)


def test_a_prefix_the_model_itself_uses_is_kept():
    from e2kd.checkpoints import fit_keys

    state = {"model.0.weight": torch.zeros(1)}
    assert fit_keys(state, {"model.0.weight"}) == state
    assert set(fit_keys(state, {"0.weight"})) == {"0.weight"}


def test_hub_style_name_has_its_hash_checked(tmp_path):
    source = _model(0)
    raw = tmp_path / "raw.pth"
    torch.save(source.state_dict(), raw)
    digest = hashlib.sha256(raw.read_bytes()).hexdigest()
    good = tmp_path / f"tinycnn-{digest[:10]}.pth"
    good.write_bytes(raw.read_bytes())
    target = _model(1)
    load_weights(target, good)
    _assert_same_weights(source, target)
    wrong_hash = ("f" if digest[0] != "f" else "e") + digest[1:8]
    bad = tmp_path / f"tinycnn-{wrong_hash}.pth"
    bad.write_bytes(raw.read_bytes()[:-10] + b"0" * 10)  # a damaged download
    with pytest.raises(
        ModelError,
        match=rf"tinycnn-{wrong_hash}\.pth: its name says SHA-256 {wrong_hash}…, the file's is "
        rf"[0-9a-f]{{8}}…; the download is incomplete or corrupt",
    ):
        load_weights(_model(1), bad)


def test_a_date_suffix_is_not_taken_for_a_hash(tmp_path):
    source, target = _model(0), _model(1)
    torch.save(source.state_dict(), tmp_path / "teacher-20240101.pt")
    load_weights(target, tmp_path / "teacher-20240101.pt")
    _assert_same_weights(source, target)


class _Sentinel:
    """Unpickling this would write a file: the loader must refuse before constructing it."""

    def __init__(self, path):
        self.path = path

    def __reduce__(self):
        return (open, (str(self.path), "w"))


def test_pickled_objects_are_refused_without_being_run(tmp_path):
    marker = tmp_path / "was_unpickled"
    with (tmp_path / "evil.pt").open("wb") as f:
        pickle.Pickler(f, protocol=2).dump({"fc.weight": torch.zeros(1), "payload": _Sentinel(marker)})
    torch.save(_model(0), tmp_path / "whole_model.pt")  # torch.save(model): pickled classes
    for name in ("evil.pt", "whole_model.pt"):
        with pytest.raises(
            ModelError, match=rf"{name}: .*e2kd does not unpickle those: save model.state_dict\(\) instead"
        ):
            load_weights(_model(1), tmp_path / name)
    assert not marker.exists()


def test_a_plain_pickle_of_another_protocol_is_refused_without_torchs_warning(tmp_path):
    import warnings

    with (tmp_path / "plain.pkl").open("wb") as f:
        pickle.Pickler(f, protocol=4).dump({"fc.weight": [1.0, 2.0], "payload": _Sentinel(tmp_path / "ran")})
    with warnings.catch_warnings(record=True) as shown:
        warnings.simplefilter("always")  # torch warns "Detected pickle protocol 4 ... please file an issue"
        with pytest.raises(
            ModelError,
            match=r"plain.pkl: neither a safetensors nor a torch.save file \(it does not unpickle as tensors\)",
        ):
            load_weights(_model(1), tmp_path / "plain.pkl")
    assert [str(w.message) for w in shown] == []
    assert not (tmp_path / "ran").exists()


def test_a_truncated_torch_file_is_one_line_naming_the_error(tmp_path):
    torch.save(_model(0).state_dict(), tmp_path / "whole.pt")
    data = (tmp_path / "whole.pt").read_bytes()
    (tmp_path / "cut.pt").write_bytes(data[: len(data) // 2])
    with pytest.raises(ModelError) as info:
        load_weights(_model(1), tmp_path / "cut.pt")
    message = str(info.value)
    assert message.startswith(f"checkpoint {tmp_path / 'cut.pt'}: neither a safetensors nor a torch.save file (")
    assert "\n" not in message and message.split("(", 1)[1].split(":", 1)[0] in (
        "RuntimeError",
        "UnpicklingError",
        "EOFError",
    )


def test_nested_wrapper_prefixes_are_removed_in_any_order():
    from e2kd.checkpoints import fit_keys

    weight = torch.zeros(1)
    assert fit_keys({"_orig_mod.module.fc.weight": weight}, {"fc.weight"}) == {"fc.weight": weight}
    assert fit_keys({"module.model._orig_mod.fc.weight": weight}, {"fc.weight"}) == {"fc.weight": weight}


def test_safetensors_is_recognised_by_its_header_alone(tmp_path):
    """8 bytes little-endian header length, then '{'; the length must fit in the file."""
    import struct

    from e2kd.checkpoints import is_safetensors

    def file(data: bytes):
        path = tmp_path / f"f{len(list(tmp_path.iterdir()))}"
        path.write_bytes(data)
        return path

    header = b'{"a": 1}'
    assert is_safetensors(file(struct.pack("<Q", len(header)) + header))  # length = size - 8 exactly
    assert is_safetensors(file(struct.pack("<Q", len(header)) + header + b"data"))
    assert not is_safetensors(file(struct.pack("<Q", len(header) + 1) + header))  # longer than the file
    assert not is_safetensors(file(struct.pack("<Q", len(header)) + b"[" + header[1:]))  # no '{'
    assert not is_safetensors(file(struct.pack("<Q", 0) + b"{"))  # an empty header
    assert not is_safetensors(file(b"{" * 8))  # shorter than 9 bytes
    assert not is_safetensors(file(b""))


def test_a_mismatch_names_missing_unexpected_and_shapes(tmp_path):
    state = _model(0).state_dict()
    state.pop("fc.bias")
    state["head.weight"] = torch.zeros(2)
    state["feat.0.weight"] = torch.zeros(4, 4, 1, 1)
    torch.save(state, tmp_path / "other.pt")
    with pytest.raises(ModelError) as info:
        load_weights(_model(1), tmp_path / "other.pt")
    message = str(info.value)
    assert "\n" not in message and "does not fit TinyCNN (expects" in message
    assert "missing fc.bias" in message and "unexpected head.weight" in message
    assert "feat.0.weight (4, 4, 1, 1) vs (4, 4, 3, 3)" in message
    assert "more)" not in message  # one missing, one unexpected, one shape: all listed
    assert "missing fc.bias; unexpected head.weight; shape (file vs model): feat.0.weight" in message
    state = _model(0).state_dict()
    three = sorted(k for k in state if k.endswith(".weight"))[:3]
    for key in three:
        state.pop(key)
    torch.save(state, tmp_path / "three.pt")
    with pytest.raises(ModelError) as info:
        load_weights(_model(1), tmp_path / "three.pt")
    assert str(info.value).endswith(": missing stem.0.weight, feat.0.weight, fc.weight")  # three: no "(+0 more)"


_SAFETENSORS_HEAD = struct.pack("<Q", 40) + b'{"w": {"dtype": "F32", "shape": [4], '  # cut off


@pytest.mark.parametrize(
    "content, message",
    [
        (b"not a checkpoint at all", "neither a safetensors nor a torch.save file"),
        (
            {"epoch": 3, "optimizer": {"lr": torch.tensor(0.1)}},
            "holds no state dict (top-level keys 'epoch', 'optimizer'; weights are looked for at the top level and under "
            "state_dict, model, model_state_dict, module)",
        ),
        ([torch.zeros(2)], "holds a list, not a state dict"),
        ({}, "holds no state dict (top-level keys ;"),
        (_SAFETENSORS_HEAD + b"\0" * 12, "a damaged safetensors file"),
        ("missing", "file not found (train it first or fix the path)"),
    ],
)
def test_unreadable_files_get_one_line(tmp_path, content, message):
    path = tmp_path / "x.pt"
    if isinstance(content, bytes):
        path.write_bytes(content)
    elif content != "missing":
        torch.save(content, path)
    with pytest.raises(ModelError) as error:
        read_state_dict(path)
    assert str(error.value).startswith(f"checkpoint {path}: {message}") and "\n" not in str(error.value)


def test_a_long_mismatch_lists_three_names_and_counts_the_rest(tmp_path):
    state = {f"extra{i}": torch.zeros(1) for i in range(5)}
    torch.save({**_model(0).state_dict(), **state}, tmp_path / "more.pt")
    with pytest.raises(ModelError, match=r"unexpected extra0, extra1, extra2 \(\+2 more\)$"):
        load_weights(_model(1), tmp_path / "more.pt")


def test_a_lightning_checkpoint_is_a_teacher_for_distill(tmp_path):
    """End to end: train a teacher, re-save it as a Lightning checkpoint, distil from that file."""
    teacher_cfg = tmp_path / "t.yaml"
    teacher_cfg.write_text(yaml.safe_dump({**TINY, "out_dir": str(tmp_path / "t")}))
    assert main(["train-teacher", str(teacher_cfg)]) == 0
    state = torch.load(tmp_path / "t" / "model.pt", weights_only=True)
    torch.save({"state_dict": {f"model.{k}": v for k, v in state.items()}, "epoch": 1}, tmp_path / "teacher.ckpt")
    student_cfg = tmp_path / "s.yaml"
    student_cfg.write_text(
        yaml.safe_dump(
            {
                **TINY,
                "out_dir": str(tmp_path / "s"),
                "model": {"name": "small_resnet", "options": {"widths": [4, 4]}},
                "teacher": {**TINY["model"], "checkpoint": str(tmp_path / "teacher.ckpt")},
                "train": {**TINY["train"], "epochs": 1},
            }
        )
    )
    assert main(["distill", str(student_cfg)]) == 0
    teacher = e2kd.get_model_builder(TINY["model"]["name"], **TINY["model"]["options"]).build(3)
    load_weights(teacher, tmp_path / "teacher.ckpt")
    assert all(torch.equal(teacher.state_dict()[k], state[k]) for k in state)
