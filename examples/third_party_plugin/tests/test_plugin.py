"""The plugin's own tests: register it ad hoc (no install needed) and check values by hand."""

import e2kd_attention_transfer as plugin
import pytest
import torch

import e2kd
from e2kd.testing import EXPLAINER_CASES, check_dataset, check_similarity


@pytest.fixture
def registered():
    if any(i.name == "neg_l2" for i in e2kd.list_plugins("similarity")):
        yield  # already installed: e2kd discovered it through its entry point
        return
    e2kd.register_plugin(plugin, name="attention_transfer_test")
    yield
    e2kd.unregister_plugin("attention_transfer_test")


def test_neg_l2_by_hand(registered):
    sim = e2kd.get_similarity("neg_l2")
    a, b = torch.tensor([[3.0, 4.0]]), torch.tensor([[4.0, 3.0]])
    assert sim(a, b).item() == pytest.approx(-(((0.6 - 0.8) ** 2 * 2) ** 0.5))


def test_attention_map_by_hand(registered):
    conv = torch.nn.Conv2d(3, 5, 3, padding=1)
    model = torch.nn.Sequential(conv, torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(), torch.nn.Linear(5, 2))
    x = torch.randn(2, 3, 6, 6)
    maps = e2kd.get_explainer("attention_map", layer="0", p=2).explain(model, x, 0)
    expected = conv(x).pow(2).mean(1, keepdim=True)  # same size as the input: upsampling is the identity
    torch.testing.assert_close(maps, expected.detach())


def test_csv_images_dataset_reads_labels_in_class_order(registered, tmp_path):
    import numpy as np

    from e2kd.data import split_view
    from e2kd.data.miniature import random_image

    (tmp_path / "classes.txt").write_text("cat\ndog\n")
    rng = np.random.default_rng(0)
    for split, labels in (("train", ["dog", "cat", "dog"]), ("test", ["cat"])):
        lines = ["path,label"]
        for i, label in enumerate(labels):
            random_image(rng, 30, 20).save(tmp_path / f"{split}{i}.jpg")
            lines.append(f"{split}{i}.jpg,{label}")
        (tmp_path / f"{split}.csv").write_text("\n".join(lines) + "\n")
    data = e2kd.get_dataset("csv_images", root=str(tmp_path), image_size=16)
    check_dataset(data)  # e2kd's dataset contract
    assert data.class_names() == ["cat", "dog"] and data.eval_splits() == ("test",)
    train = split_view(data, "train", "eval")
    assert [int(train[i]["label"]) for i in range(3)] == [1, 0, 1]
    assert train[0]["image"].shape == (3, 16, 16)


@pytest.mark.parametrize("case", EXPLAINER_CASES)
@pytest.mark.parametrize("name", ["attention_map", "layercam"])
def test_explainer_contract(registered, name, case):
    """e2kd's contract kit, one test per case (shape, several classes on one capture, frozen
    teacher, hooks released, finite-difference gradient and frozen replay)."""
    EXPLAINER_CASES[case](e2kd.get_explainer(name))


def test_layercam_by_hand(registered):
    """LayerCAM of a conv -> GAP -> linear model: d z_c / d A_k = W_ck / HW at every position."""
    conv = torch.nn.Conv2d(3, 5, 3, padding=1)
    fc = torch.nn.Linear(5, 2)
    model = torch.nn.Sequential(conv, torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(), fc)
    x = torch.randn(2, 3, 6, 6)
    maps = e2kd.get_explainer("layercam", layer="0").explain(model, x, 1)
    acts = conv(x).detach()
    weights = torch.relu(fc.weight[1].detach() / 36).view(1, 5, 1, 1)
    torch.testing.assert_close(maps, torch.relu((weights * acts).sum(1, keepdim=True)))


def test_neg_l2_contract(registered):
    check_similarity(e2kd.get_similarity("neg_l2"))


def test_the_kit_catches_a_frozen_teacher_mistake(registered):
    """Without making the captured activation a leaf that requires grad, a frozen teacher
    (parameters not requiring grad) cannot be explained: the kit's frozen_teacher case says so."""
    import contextlib

    from e2kd_attention_transfer.layercam import LayerCAM, _LayerCAMCapture

    from e2kd.models import resolve_layer

    class Careless(LayerCAM):
        @contextlib.contextmanager
        def capture(self, model, inputs, *, trainable=True):
            cap = _LayerCAMCapture(inputs)
            cap.outputs = []  # recorded as is: a frozen teacher's activation then requires no grad
            handle = resolve_layer(model, self.options.layer).register_forward_hook(
                lambda m, a, out: cap.outputs.append(out)
            )
            try:
                yield cap
            finally:
                handle.remove()

    with pytest.raises(RuntimeError, match="does not require grad"):
        EXPLAINER_CASES["frozen_teacher"](Careless())
