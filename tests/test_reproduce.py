"""``e2kd reproduce``: verdicts are computed from the paired numbers, and the quick run runs every claim."""

import json

import pytest

from e2kd import reproduce
from e2kd.cli import main
from e2kd.reproduce import Measure, report, verdict

from .test_early_errors import _fails_with


@pytest.mark.parametrize("differences, expected", [
    ([0.1, 0.2, -0.05], "holds here"),          # mean 0.083 > standard error 0.073, two of three seeds agree
    ([0.041, -0.032, 0.007], "does not hold here"),  # mean 0.005 < standard error 0.021: noise
    ([0.3, -0.1, -0.1], "does not hold here"),  # mean > 0 but one seed of three
    ([-0.1, -0.2, 0.05], "does not hold here"),
    ([0.0, 0.0, 0.0], "does not hold here"),    # no difference is no effect
    ([0.01], "holds here"),
])
def test_verdict_rule(differences, expected):
    assert verdict(differences) == expected


def test_measure_reads_values_keys_and_the_mean_of_a_curve():
    results = {"splits": {"test": {"accuracy": 0.5, "group_accuracy": {"out_of_distribution": 0.25},
                                   "shift_equivariance": {"shift_0": 1.0, "shift_1": 0.2, "shift_2": 0.4}}}}
    assert Measure("a", "test", "accuracy").read(results) == 0.5
    assert Measure("b", "test", "group_accuracy", "out_of_distribution").read(results) == 0.25
    assert Measure("c", "test", "shift_equivariance", "mean_shift").read(results) == pytest.approx(0.3)


def test_verdicts_follow_the_numbers_not_the_hope(tmp_path, monkeypatch):
    """The same claim judged on two sets of made-up student results: the verdict flips with them."""
    claim = next(c for c in reproduce.CLAIMS if c.key == "few_data")
    monkeypatch.setattr(reproduce, "train_teacher", lambda config: {})
    for e2kd_better, expected in ((True, "holds here"), (False, "does not hold here")):
        def fake_distill(config, e2kd_better=e2kd_better):
            lam = config.distill.lam
            good = (lam > 0) == e2kd_better
            value = 0.6 if good else 0.5
            return {"splits": {"val": {"accuracy": value + 0.01 * config.seed, "agreement": value}}}

        monkeypatch.setattr(reproduce, "distill", fake_distill)
        (tmp_path / "data").mkdir(exist_ok=True)  # data "already written"
        result = reproduce.run_claim(claim, tmp_path, [0, 1, 2], 0.1, log=lambda _: None)
        for row in result["rows"]:
            assert row["verdict"] == expected
            assert row["differences"] == pytest.approx([b - a for a, b in zip(row["KD"], row["e2KD"])])
    text = report([result], [0, 1, 2], quick=True, seconds=1.0)
    assert "| accuracy |" in text and "-10.0, -10.0, -10.0" in text and "**does not hold here**" in text


def test_reproduce_errors_are_one_line(tmp_path, capsys):
    _fails_with(capsys, ["reproduce", "--quick", "--claims", "few_data,nope", "--out", str(tmp_path)],
                "--claims: unknown claim 'nope' (known: few_data, spurious, voc, cnn_to_vit, frozen, bias100, bias100_bcos)")
    _fails_with(capsys, ["reproduce", "--quick", "--seeds", ",", "--out", str(tmp_path)], "--seeds")


@pytest.mark.slow
def test_quick_reproduce_runs_every_claim_and_computes_its_verdicts(tmp_path, capsys):
    assert main(["reproduce", "--quick", "--out", str(tmp_path)]) == 0
    results = json.loads((tmp_path / "reproduce.json").read_text())
    assert [c["key"] for c in results["claims"]] == ["few_data", "spurious", "voc", "cnn_to_vit", "frozen", "bias100",
                                                         "bias100_bcos"]
    text = (tmp_path / "reproduce.md").read_text()
    assert (tmp_path / "reproduce.png").stat().st_size > 0 and (tmp_path / "shift.png").stat().st_size > 0
    vit = results["claims"][3]
    assert set(vit["curves"]) == {"teacher", "KD", "e2KD"} and len(vit["curves"]["e2KD"]) == 3
    for claim in results["claims"]:
        for row in claim["rows"]:
            base, other = row["baseline"], row["variant"]
            assert len(row[base]) == len(row[other]) == 3
            assert row["differences"] == pytest.approx([b - a for a, b in zip(row[base], row[other])])
            assert row["verdict"] == verdict(row["differences"])
            assert f"| {row['measure']} |" in text
    # the frozen claim reuses the few-data claim's teacher and KD students
    few, frozen = results["claims"][0], results["claims"][4]
    assert few["rows"][0]["KD"] == frozen["rows"][0]["KD"]
    assert [r["variant"] for r in results["claims"][5]["rows"]] == list(reproduce.BIAS100_VARIANTS)
