"""The plugin's own tests: register it ad hoc (no install needed) and check values by hand."""

import pytest
import torch

import e2kd
import e2kd_attention_transfer as plugin


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
    assert sim(a, b).item() == pytest.approx(-((0.6 - 0.8) ** 2 * 2) ** 0.5)


def test_attention_map_by_hand(registered):
    conv = torch.nn.Conv2d(3, 5, 3, padding=1)
    model = torch.nn.Sequential(conv, torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(), torch.nn.Linear(5, 2))
    x = torch.randn(2, 3, 6, 6)
    maps = e2kd.get_explainer("attention_map", layer="0", p=2).explain(model, x, 0)
    expected = conv(x).pow(2).mean(1, keepdim=True)  # same size as the input: upsampling is the identity
    torch.testing.assert_close(maps, expected.detach())
