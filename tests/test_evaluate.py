"""evaluate_model: which explainer and metric options it uses, its split errors, and evaluation
split over processes (each process's share, merged) equal to one process over every sample."""

import pytest
import torch

import e2kd
from e2kd.config import load_config_dict
from e2kd.data import dataset_of
from e2kd.errors import ConfigError
from e2kd.evaluate import eval_splits, evaluate_model
from e2kd.models import build_from
from e2kd.plan import plan_run
from e2kd.runtime import Runtime

from .conftest import TINY

METRICS = [
    "accuracy",
    {"name": "accuracy", "options": {"top_k": 2}},
    "agreement",
    "explanation_similarity",
    "group_accuracy",
]


@pytest.fixture
def setup():
    config = load_config_dict(
        {
            **TINY,
            "teacher": TINY["model"],
            "distill": {"explainer": {"name": "gradcam", "options": {"relu": False}}},
            "eval": {"metrics": METRICS},
        }
    )
    dataset = dataset_of(config)
    torch.manual_seed(0)
    return config, build_from(config.model, dataset), build_from(config.teacher, dataset), dataset


def test_the_explainer_and_metric_options_of_the_config_are_used(setup):
    config, model, teacher, dataset = setup
    assert (
        plan_run(config, "evaluate", dataset).eval_explainer.options.relu is False
    )  # distill.explainer, with its options
    other = config.model_copy(
        update={
            "eval": config.eval.model_copy(
                update={
                    "explainer": config.distill.explainer.model_copy(
                        update={"options": {"relu": True, "layer": "layers.0"}}
                    )
                }
            )
        }
    )
    assert plan_run(other, "evaluate", dataset).eval_explainer.options.layer == "layers.0"  # eval.explainer wins
    results = evaluate_model(
        plan_run(config, "evaluate", dataset),
        model,
        teacher,
        metrics=[m for m in config.eval.metrics if m.name == "accuracy"],
    )
    # the two accuracy entries share a name: each is reported, the second under its options
    split = results["splits"]["test_id"]
    assert set(split) == {"accuracy", "accuracy[top_k=2]"}
    with torch.no_grad():
        images = torch.stack([s["image"] for s in dataset.samples("test_id")])
        labels = torch.tensor([int(s["label"]) for s in dataset.samples("test_id")])
        top2 = model(images).topk(2, dim=1).indices
    assert split["accuracy[top_k=2]"] == pytest.approx((top2 == labels[:, None]).any(1).double().mean().item())
    assert split["accuracy"] == pytest.approx((top2[:, 0] == labels).double().mean().item())
    assert split["accuracy"] < split["accuracy[top_k=2]"]  # the example tells the two apart


def test_one_metric_under_two_similarities_keeps_both_and_their_directions(setup):
    from e2kd.config import PluginRef
    from e2kd.explaining import explained_forward
    from e2kd.report import table

    config, model, teacher, dataset = setup
    refs = [
        PluginRef(name="explanation_similarity", options={"similarity": "cosine"}),
        PluginRef(name="explanation_similarity", options={"similarity": "l2"}),
        PluginRef(name="kl_divergence"),
    ]
    results = evaluate_model(plan_run(config, "evaluate", dataset), model, teacher, metrics=refs)
    cos, l2 = "explanation_similarity[similarity=cosine]", "explanation_similarity[similarity=l2]"
    assert results["higher_is_better"] == {cos: True, l2: False, "kl_divergence": False}
    split = results["splits"]["test_ood"]
    images = torch.stack([s["image"] for s in dataset.samples("test_ood")])  # the eval view of shape images: as is
    explainer = plan_run(config, "evaluate", dataset).eval_explainer
    _, t_maps, targets = explained_forward(teacher, images, explainer)
    _, s_maps, _ = explained_forward(model, images, explainer, targets)
    a, b = s_maps[:, 0].flatten(1).double(), t_maps[:, 0].flatten(1).double()
    assert split[cos] == pytest.approx(torch.nn.functional.cosine_similarity(a, b).mean().item(), rel=1e-5)
    assert split[l2] != pytest.approx(split[cos])
    text = table({"run": results})
    assert f"test_ood/{l2} ↓" in text and f"test_ood/{cos} |" in text and "test_ood/kl_divergence ↓" in text
    assert text.rstrip().endswith("↓: lower is better")


def test_an_unknown_split_is_named_with_the_known_ones(setup):
    config, _, _, dataset = setup
    wrong = config.model_copy(update={"eval": config.eval.model_copy(update={"splits": ["test_id", "tset"]})})
    with pytest.raises(ConfigError) as error:
        eval_splits(wrong, dataset)
    assert str(error.value) == (f"eval.splits: 'synthetic' has no split 'tset' (known: {', '.join(dataset.splits())})")
    assert eval_splits(config, dataset) == list(dataset.eval_splits())


def test_two_processes_each_evaluating_half_merge_to_one_process(setup, monkeypatch):
    """Rank r evaluates samples r, r + 2, ...; the metric states are gathered and merged. Run in
    one process: all_gather_object is replaced by the other rank's recorded state."""
    config, model, teacher, dataset = setup
    single = evaluate_model(plan_run(config, "evaluate", dataset), model, teacher)
    sent = {}  # (rank, split number) -> what that rank sent

    def gather(out, obj, rank, calls):
        calls.append(obj)
        sent[rank, len(calls)] = obj
        for r in range(2):
            out[r] = sent.get((r, len(calls)), obj)

    results = {}
    for rank in (0, 1, 0):  # the second pass of rank 0 sees rank 1's states
        calls = []
        monkeypatch.setattr(
            torch.distributed,
            "all_gather_object",
            lambda out, obj, rank=rank, calls=calls: gather(out, obj, rank, calls),
        )
        results[rank] = evaluate_model(
            plan_run(config, "evaluate", dataset),
            model,
            teacher,
            runtime=Runtime(torch.device("cpu"), rank=rank, world_size=2),
        )
    for split, values in single["splits"].items():
        for name, value in values.items():
            if isinstance(value, dict):
                assert results[0]["splits"][split][name] == pytest.approx(value), (split, name)
            else:
                assert results[0]["splits"][split][name] == pytest.approx(value, rel=1e-9), (split, name)
    n = len(dataset.samples("test_id"))
    assert sent[1, 1][0]["agreement"]["_count"] == n // 2  # each rank scored its own share
    assert sent[0, 1][0]["agreement"]["_count"] == n - n // 2


@pytest.mark.parametrize("per_class_masks", [True, False])
def test_every_batch_field_reaches_the_metrics(per_class_masks):
    """One batch with labels, groups, the dataset's in-distribution marks and masks: every metric
    equals its value computed here from the explainer, the models and the formulas. The batch is
    built so that each field matters: the marks disagree with the group == label default, the
    model is right exactly on the marked samples, and the labels hold both classes."""
    import e2kd
    from e2kd.evaluate import evaluate
    from e2kd.testing import TinyCNN
    from e2kd_plugins.metrics.shift import overlap_cosine, shift_diagonal

    from .reference import epg_loop

    torch.manual_seed(0)
    model, teacher = TinyCNN(num_classes=2).double().eval(), TinyCNN(num_classes=2, width=6).double()
    x = torch.rand(4, 3, 8, 8, dtype=torch.float64)
    with torch.no_grad():
        pred, t_pred = model(x).argmax(1), teacher(x).argmax(1)
    labels = torch.tensor([0, 1, 1, 0])
    if (pred == labels).all() or (pred != labels).all():
        labels[:2] = 1 - labels[:2]  # both classes stay, the model is right on some samples only
    marks = pred == labels  # the dataset marks the samples the model gets right as in distribution ...
    groups = torch.where(marks, 1 - labels, labels)  # ... where group == label would say the opposite
    masks = torch.zeros(4, 2, 8, 8, dtype=torch.float64)
    masks[:, 0, :2, :2] = 1  # class 0: the top-left corner; class 1: the bottom-right 6 x 6
    masks[:, 1, 2:, 2:] = 1
    if not per_class_masks:
        masks = masks[:, :1]  # one object mask for every class
    explainer = e2kd.get_explainer("gradient")  # signed input gradients: every class's map has a positive part
    metrics = {
        name: e2kd.get_metric(name, **options)
        for name, options in (
            ("group_accuracy", {}),
            ("epg", {}),
            ("shift_equivariance", {"max_shift": 2}),
            ("explanation_similarity", {}),
            ("agreement", {}),
        )
    }
    from e2kd.api import Metric

    class Pairs(Metric):  # what a third-party metric sees of the (image, label class) rows
        name, description, requires = "pairs", "test", frozenset({"label_explanations"})

        def update(self, batch):
            self._seen = batch.label_pairs.tolist()

        def compute(self):
            return self._seen

    metrics["pairs"] = Pairs()
    batch = {"image": x, "label": labels, "group": groups, "in_distribution": marks, "mask": masks}
    values, skipped = evaluate(model, [batch], metrics, teacher=teacher, explainer=explainer)
    assert skipped == {}
    assert values["pairs"] == [[i, int(c)] for i, c in enumerate(labels)]  # (image index, class) per row
    assert values["group_accuracy"]["in_distribution"] == 1.0 and values["group_accuracy"]["out_of_distribution"] == 0.0
    label_maps = explainer.explain(model, x, labels)
    chosen = masks[torch.arange(4), labels if per_class_masks else 0][:, None]
    expected = epg_loop(label_maps, chosen).mean().item()
    assert values["epg"] == pytest.approx(expected, rel=1e-9)
    other = masks[torch.arange(4), 0 if per_class_masks else 0][:, None]  # every class's map against mask 0
    assert per_class_masks is False or abs(epg_loop(label_maps, other).mean().item() - expected) > 1e-3
    maps = explainer.explain(model, x, pred)
    for t in (1, 2):
        shifted = explainer.explain(model, shift_diagonal(x, t), pred)
        assert values["shift_equivariance"][f"shift_{t}"] == pytest.approx(
            overlap_cosine(shifted, maps, t).mean().item()
        )
    e_s, e_t = explainer.explain(model, x, t_pred), explainer.explain(teacher, x, t_pred)
    assert values["explanation_similarity"] == pytest.approx(
        torch.nn.functional.cosine_similarity(e_s.flatten(1), e_t.flatten(1)).mean().item()
    )
    assert values["agreement"] == pytest.approx((pred == t_pred).double().mean().item())


def test_the_model_in_the_loop_and_flattened_metrics():
    """EvalBatch's forward/explain run the evaluated model (or another module given as model=) like
    the batch: no gradients for forward, under the run's precision, logits and maps in float32."""
    import e2kd
    from e2kd.evaluate import _model_in_loop, flatten_metrics
    from e2kd.testing import TinyCNN

    model, x = TinyCNN().double().eval(), torch.rand(2, 3, 8, 8, dtype=torch.float64)
    other_model = TinyCNN(width=5).double().eval()
    gradcam = e2kd.get_explainer("gradcam")
    calls = _model_in_loop(model, gradcam, Runtime(torch.device("cpu")))
    other = (model(x).argmax(1) + 1) % 3  # not the top-1: the given target is explained
    torch.testing.assert_close(calls["explain"](x, other), gradcam.explain(model, x, other))
    torch.testing.assert_close(calls["explain"](x, other, model=other_model), gradcam.explain(other_model, x, other))
    logits = calls["forward"](x)
    assert not logits.requires_grad and torch.equal(logits, model(x).detach())
    assert torch.equal(calls["forward"](x, model=other_model), other_model(x).detach())
    assert calls["model"] is model
    half = _model_in_loop(model.float(), gradcam, Runtime(torch.device("cpu"), precision="bf16"))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        expected = model(x.float()).float()
    low = half["forward"](x.float())
    assert low.dtype == torch.float32 and torch.equal(low, expected)
    assert half["explain"](x.float(), other).dtype == torch.float32
    assert flatten_metrics({"a": 1.0, "g": {"worst": 0.5, "y0": {"g1": 0.25}}}) == {
        "a": 1.0,
        "g.worst": 0.5,
        "g.y0.g1": 0.25,
    }


def test_metric_keys_write_out_the_options_of_a_name_given_twice():
    from e2kd.config import PluginRef
    from e2kd.evaluate import metric_keys

    refs = [
        PluginRef(name="m", options={"b": {"y": 1, "x": True}, "a": "s"}),
        PluginRef(name="m", options={"a": 2}),
        PluginRef(name="m"),
        PluginRef(name="once", options={"k": 3}),
    ]
    assert metric_keys(refs) == ['m[a=s,b={"x": true, "y": 1}]', "m[a=2]", "m", "once"]


def test_an_as_name_keys_a_metrics_results_and_a_clash_is_one_line():
    """eval.metrics entries may name their results key (``as``); it survives the run's config.yaml,
    and two entries with one key are refused when the config loads, naming the fix."""
    import yaml

    from e2kd.config import dump_config, metric_keys

    config = load_config_dict(
        {
            "eval": {
                "metrics": [
                    {"name": "explanation_similarity", "as": "sim_l2", "options": {"similarity": "l2"}},
                    "explanation_similarity",
                    {"name": "deletion", "as": "deletion_1px", "options": {"patch_size": 1}},
                    "deletion",
                ]
            }
        }
    )
    assert metric_keys(config.eval.metrics) == ["sim_l2", "explanation_similarity", "deletion_1px", "deletion"]
    stored = yaml.safe_load(dump_config(config))["eval"]["metrics"]
    assert stored[0] == {"name": "explanation_similarity", "options": {"similarity": "l2"}, "as": "sim_l2"}
    assert stored[1] == {"name": "explanation_similarity", "options": {}}  # no `as: null` (run identities unchanged)
    assert load_config_dict({"eval": {"metrics": stored}}).eval.metrics == config.eval.metrics
    with pytest.raises(
        ConfigError, match="two entries store their results as 'accuracy'; give one of them `as: <key>`"
    ):
        load_config_dict({"eval": {"metrics": ["accuracy", {"name": "agreement", "as": "accuracy"}]}})


def test_the_explanation_similarity_takes_its_direction_from_its_similarity():
    from e2kd_plugins.metrics.explanation import ExplanationSimilarity

    assert ExplanationSimilarity.capabilities()["higher_is_better"] == "as its similarity"  # what e2kd plugins shows
    listed = {i.name: i.capabilities for i in e2kd.list_plugins("metric")}
    assert listed["explanation_similarity"]["higher_is_better"] == "as its similarity"


def test_evaluation_runs_at_the_runtimes_precision(setup):
    """The evaluation's forwards and maps under a bf16 runtime are the ones bf16 autocast gives."""
    from e2kd.config import PluginRef
    from e2kd.explaining import explained_forward

    config, model, teacher, dataset = setup
    refs = [PluginRef(name="explanation_similarity")]
    plan = plan_run(config, "evaluate", dataset)
    low = evaluate_model(plan, model, teacher, metrics=refs, runtime=Runtime(torch.device("cpu"), "bf16"))
    full = evaluate_model(plan, model, teacher, metrics=refs)
    images = torch.stack([s["image"] for s in dataset.samples("test_ood")])
    with torch.autocast("cpu", dtype=torch.bfloat16):
        _, t_maps, targets = explained_forward(teacher, images, plan.eval_explainer)
        _, s_maps, _ = explained_forward(model, images, plan.eval_explainer, targets)
    a, b = s_maps[:, 0].float().flatten(1).double(), t_maps[:, 0].float().flatten(1).double()
    want = torch.nn.functional.cosine_similarity(a, b).mean().item()
    got = low["splits"]["test_ood"]["explanation_similarity"]
    assert got == pytest.approx(want, rel=1e-6) and got != full["splits"]["test_ood"]["explanation_similarity"]
