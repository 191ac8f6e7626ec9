"""The run configuration: one frozen record per command, layered defaults < method/recipe
< --config FILE < flags, every rule checked once, and the command lines made from it."""
import dataclasses
import json
import re

import pytest

from common.config import read_config_file
from common.errors import UsageError

TRAINING = ("decathlon.train", "decathlon.pretrain", "classification.train", "segmentation.train")
COMMANDS = TRAINING + ("decathlon.submit", "decathlon.score", "decathlon.demo", "classification.evaluate",
                       "segmentation.evaluate", "segmentation.demo")


def _module(name):
    import importlib
    return importlib.import_module(name)


def _cls(argv):
    from classification import train
    return train.parse_config(["--weights", "w.pth", *argv])


def test_configuration_is_frozen_and_typed():
    cfg = _cls([])
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.lr = 1.0
    assert cfg.lr_steps == (15,) and isinstance(cfg.crop_scale, tuple)
    assert (cfg.scheme, cfg.recipe, cfg.optimizer, cfg.lr, cfg.threshold) == ("binary", "default", "adam", 1e-4, 5e-3)


def test_layers_file_then_flags_and_a_named_method_or_recipe_sets_what_it_owns(tmp_path):
    base = _cls(["--recipe", "paper", "--lr", "3e-4", "--epochs", "7"])
    path = tmp_path / "config.json"
    path.write_text(json.dumps({**base.as_dict(), "resolved": {"arch": "x"}, "git_commit": "abc"}))
    again = _cls(["--config", str(path)])
    assert again == base  # a run's config.json reads back to the same configuration
    assert _cls(["--config", str(path), "--epochs", "9"]).replace(epochs=7) == base  # a flag overrides the file
    # the file's lr stays unless the command line names what owns it
    assert _cls(["--config", str(path), "--seed", "3"]).lr == 3e-4
    default = _cls(["--config", str(path), "--recipe", "default"])
    assert (default.recipe, default.mask_init, default.lr) == ("default", "spread", 1e-4)
    finetune = _cls(["--config", str(path), "--method", "finetune"])
    assert (finetune.optimizer, finetune.lr, finetune.threshold, finetune.scheme) == ("sgd", 1e-2, None, None)
    affine = _cls(["--config", str(path), "--scheme", "affine"])
    assert affine.extras_lr is not None and affine.lr == 3e-4  # the scheme owns only its extras


def test_yaml_files_and_bad_files_name_the_key_and_file(tmp_path):
    yaml_file = tmp_path / "mine.yaml"
    yaml_file.write_text("lr: 2.0e-4\nlr_steps: [3, 6]\ntrain_bn: true\n")
    cfg = _cls(["--config", str(yaml_file)])
    assert (cfg.lr, cfg.lr_steps, cfg.train_bn) == (2e-4, (3, 6), True)
    bad = tmp_path / "bad.json"
    for text, message in (('{"lrr": 1}', "unknown setting.*'lrr'"), ('{"epochs": "many"}', "epochs = 'many'"),
                          ('{"train_bn": "yes"}', "true or false"), ("[1, 2]", "expected a mapping"),
                          ("{not json", "not valid JSON"), ('{"scheme": "nope"}', "scheme")):
        bad.write_text(text)
        with pytest.raises(UsageError, match=message) as err:
            _cls(["--config", str(bad)])
        assert "bad.json" in str(err.value) or message == "scheme"
    with pytest.raises(UsageError, match="no such file"):
        read_config_file(tmp_path / "missing.json")


def test_every_rule_is_checked_once_with_a_clear_line():
    for argv, message in ((["--method", "finetune", "--threshold", "0.1"], "only apply to --method piggyback"),
                          (["--method", "finetune", "--train-bn"], "already train"),
                          (["--method", "feature", "--lr", "1e-3"], "--head-lr"),
                          (["--lr", "0"], "--lr must be positive"),
                          (["--mask-spread", "-1"], "must be >= 0"),
                          (["--scheme", "binary", "--extras-lr", "1e-3"], "trains no values"),
                          (["--size", "4"], "--size must be >= 8"),
                          (["--print-freq", "0"], "--print-freq must be >= 1")):
        with pytest.raises(UsageError, match=re.escape(message)):
            _cls(argv)


@pytest.mark.parametrize("name", TRAINING)
def test_every_training_command_takes_config_scheme_and_threads(name):
    text = _module(name).get_args_parser().format_help()
    for flag in ("--config", "--threads", "--workers"):
        assert flag in text, (name, flag)
    if name != "decathlon.pretrain":
        from common.schemes import SCHEMES
        assert "--scheme" in text and all(s in text for s in SCHEMES)
    assert "what auto means here" in text and "--ternary" not in text


# A measured figure: a speed-up, a percentage, a rate or a time, or a named accelerator.
_FIGURE = re.compile(r"\d(\.\d+)?x\b|\d+(\.\d+)? ?%|images/s|\d+ ?(us|ms)\b|\bH100\b|\bH200\b")


@pytest.mark.parametrize("name", COMMANDS)
def test_no_help_quotes_a_measured_figure(name):
    text = _module(name).get_args_parser().format_help()
    found = [m.group(0) for m in _FIGURE.finditer(text.replace("%(", ""))]
    assert not found, (name, found)


def test_resume_fields_are_declared_with_the_fields():
    from classification.config import ClassificationConfig
    free = set(ClassificationConfig.resume_free())
    assert {"workers", "threads", "print_freq", "device", "out", "data_root", "compile", "epochs"} <= free
    assert not {"lr", "seed", "scheme", "batch_size", "threshold"} & free
