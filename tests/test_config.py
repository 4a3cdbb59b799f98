from __future__ import annotations

import json

import pytest
import torch

from vgg.errors import UsageError
from vgg.training.config import RECIPES, TrainConfig, resolve
from vgg.training.loop import make_optimizer


def test_defaults_recipe_file_then_flags(tmp_path):
    file = tmp_path / "run.toml"
    file.write_text("epochs = 7\nlr = 0.5\n[augment]\nrotation = 15.0\n")
    config = resolve("tutorial", file, lr=0.1, augment={"zoom": 0.2, "shift": None})
    assert config.optimizer == "adam"  # recipe
    assert config.epochs == 7  # file
    assert config.lr == 0.1  # flag beats file
    assert config.augment.rotation == 15.0 and config.augment.zoom == 0.2
    assert config.augment.shift == RECIPES["tutorial"]["augment"]["shift"]  # None means "not given"


def test_batch_norm_from_scratch_defaults_to_a_higher_rate_unless_lr_is_set(tmp_path):
    assert resolve(arch="vgg16").lr == TrainConfig(arch="vgg16").validate().lr == 2e-4
    assert resolve(arch="vgg16_bn").lr == TrainConfig(arch="vgg11_bn").validate().lr == 1e-3
    assert resolve(arch="vgg16_bn", lr=5e-4).lr == 5e-4  # a flag wins
    assert resolve(arch="vgg16_bn", weights="imagenet").lr == 2e-4  # fine-tuning keeps the gentle rate
    file = tmp_path / "run.toml"
    file.write_text("lr = 3e-4\n")
    assert resolve(file=file, arch="vgg16_bn").lr == 3e-4  # and so does a file's rate
    # An unvalidated config (the Python API before train()) gets the same rate from make_optimizer.
    optimizer = make_optimizer(torch.nn.Linear(2, 2), TrainConfig(arch="vgg13_bn"))
    assert {group["lr"] for group in optimizer.param_groups} == {1e-3}


def test_unknown_keys_suggest_the_right_one(tmp_path):
    file = tmp_path / "run.json"
    file.write_text(json.dumps({"epoch": 3}))
    with pytest.raises(UsageError, match=r"Unknown key 'epoch' in .*run.json\. Did you mean 'epochs'\?"):
        resolve(file=file)
    file.write_text(json.dumps({"augment": {"rotate": 3}}))
    with pytest.raises(UsageError, match=r"Unknown key 'rotate' in .*augment\. Did you mean 'rotation'\?"):
        resolve(file=file)


def test_keras_monitor_name_is_an_error_not_a_silent_default():
    with pytest.raises(UsageError, match=r"monitor must be one of .* Received: monitor='val_acc'\. Did you mean"):
        resolve(monitor="val_acc")


def test_bad_values_are_named():
    with pytest.raises(
        UsageError, match=r"optimizer must be one of \{sgd, adam, adamw\}. Received: optimizer='rmsprop'"
    ):
        TrainConfig(optimizer="rmsprop").validate()
    with pytest.raises(UsageError, match="epochs must be between 1 and 1000000. Received: epochs=0"):
        resolve(epochs=0)
    with pytest.raises(UsageError, match="recipe must be one of"):
        resolve("keras")


def test_data_options_are_validated():
    with pytest.raises(UsageError, match=r"class_weight must be one of \{none, auto\}\. Received: class_weight='yes'"):
        resolve(class_weight="yes")
    with pytest.raises(UsageError, match=r"sampler must be one of \{shuffle, balanced\}\. Received: sampler='bal'"):
        resolve(sampler="bal")
    with pytest.raises(UsageError, match=r"split and val both say which images validate\. .* pass one of them"):
        resolve(split="split.csv", val="val/")
    with pytest.raises(UsageError, match=r"augment must be one of \{none, basic, randaugment, trivialaugment\}"):
        resolve(augment={"policy": "autoaugment"})
    with pytest.raises(UsageError, match=r"mixup must be 0 \(off\) or a positive alpha\. Received: mixup=-1"):
        resolve(augment={"mixup": -1.0})
    with pytest.raises(UsageError, match=r"erasing must be a probability in \[0, 1\]\. Received: erasing=2"):
        resolve(augment={"erasing": 2.0})
    config = resolve(class_weight="auto", sampler="balanced", augment={"policy": "trivialaugment", "cutmix": 1.0})
    assert (config.class_weight, config.sampler, config.augment.policy, config.augment.cutmix) == (
        "auto", "balanced", "trivialaugment", 1.0,
    )  # fmt: skip


@pytest.mark.parametrize("name", ["mixup", "cutmix", "erasing", "rotation"])
def test_an_augmentation_setting_of_the_wrong_type_is_named_not_a_type_error(tmp_path, name):
    file = tmp_path / "config.json"  # as a hand-edited (or damaged) run's config.json may hold
    file.write_text(json.dumps({"augment": {name: {"a": 1}}}))
    with pytest.raises(UsageError, match=rf"^{name} must be a number\. Received: {name}=\{{'a': 1\}}\.$"):
        resolve(file=file)
