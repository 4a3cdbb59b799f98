from __future__ import annotations

from vgg.cli import main
from vgg.report import layer_table


def test_summary_counts_frozen_features_as_non_trainable(capsys):
    _, total, trainable = layer_table("vgg16", 2, 224, freeze="features")
    # vgg16's 13 convolutions hold 14,714,688 parameters (torchvision's count); the rest is the classifier
    assert total == 134_268_738 and total - trainable == 14_714_688
    assert main(["summary", "--arch", "vgg16", "--classes", "2", "--freeze", "features"]) == 0
    out = capsys.readouterr().out
    assert "Trainable params: 119,554,050" in out and "Non-trainable params: 14,714,688" in out
    assert main(["summary", "--arch", "vgg16", "--classes", "2"]) == 0
    assert "Non-trainable params: 0" in capsys.readouterr().out
