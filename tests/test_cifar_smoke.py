"""The CIFAR-10 / ResNet-18 settings (SalUn, ℓ1-sparse) run end to end on TFDS mock data."""

import json

import pytest

from experiments import cifar_unlearning, runner


@pytest.mark.slow  # ~35 s CPU (ResNet-18 compiles for training and two methods)
def test_cifar_resnet18_smoke_on_mocked_tfds(tmp_path):
    tfds = pytest.importorskip("tensorflow_datasets")
    with tfds.testing.mock_data(num_examples=64, policy=tfds.testing.MockPolicy.USE_CODE):
        path = runner.run_experiment(cifar_unlearning, config="smoke", out=tmp_path)
    res = json.loads(path.read_text())
    assert res["config"]["model"] == "resnet18" and res["config"]["dataset"] == "cifar10"
    summary = res["results"]["summary"]
    assert set(summary) == {"retrain", "finetune", "salun"}
    assert res["results"]["forget_count"] == round(0.1 * 64)
    for name, row in summary.items():
        assert "failed" not in row, (name, row)
        assert 0.0 <= row["test_acc"]["mean"] <= 1.0
    # the configs for users with data name the papers' settings
    full = cifar_unlearning.CONFIGS["random10"]
    assert full["epochs"] == 182 and full["lr"] == 0.1 and full["forget"] == ("random", 0.1)
    assert cifar_unlearning.CONFIGS["class"]["forget"] == ("class", 0)
