"""Recipe configs and the CLI: options derived from the dataclass, presets < config file < flags, the resolved
config printed and saved, bad options refused before any training in one line naming the option."""
import json
import os

import pytest

pytest.importorskip("sklearn")
from fastkd.recipes import cli, config, l2d  # noqa: E402
from fastkd.recipes.config import ConfigError  # noqa: E402

SMOKE = ["l2d", "--preset", "smoke", "--train-samples", "32", "--test-samples", "16", "--batch-size", "16",
         "--methods", "vanilla"]


def test_every_field_is_an_option_and_nested_fields_are_flattened():
    parser = cli.build_parser()
    l2d_parser = parser._subparsers._group_actions[0].choices["l2d"]
    flags = {option for action in l2d_parser._actions for option in action.option_strings}
    for name, _, _ in config._leaves(l2d.L2DConfig):
        assert config.flag(name) in flags
    assert {"--canvas-size", "--lambda-mld", "--no-resume", "--grad-clip", "--preset", "--config"} <= flags


def test_priority_preset_then_file_then_flags(tmp_path):
    (tmp_path / "run.yaml").write_text("lambda-mld: 5\ncanvas:\n  size: 40\nmethods: [vanilla, l2d]\n")
    (tmp_path / "run.toml").write_text('lambda_mld = 5.0\nmethods = ["vanilla", "l2d"]\n[canvas]\nsize = 40\n')
    (tmp_path / "run.json").write_text('{"lambda_mld": 5, "canvas": {"size": 40}, "methods": "vanilla,l2d"}')
    for name in ("run.yaml", "run.toml", "run.json"):
        cfg = config.resolve(l2d.L2DConfig, l2d.PRESETS["smoke"], config.read_file(str(tmp_path / name)),
                             {"lambda_cd": "7"})
        assert cfg.lambda_mld == 5.0 and cfg.canvas.size == 40 and cfg.canvas.max_digits == 3  # file over preset
        assert cfg.lambda_cd == 7.0 and cfg.teacher_backbone == "cnn-4-8" and cfg.methods == ("vanilla", "l2d")
    assert config.resolve(l2d.L2DConfig, {"grad_clip": 0.5}, {"grad_clip": "none"}).grad_clip is None


@pytest.mark.parametrize("layer, message", [
    ({"lamda_mld": 1}, "unknown option --lamda-mld; did you mean --lambda-mld"),
    ({"batch_size": "many"}, "--batch-size: expected int, got 'many'"),
    ({"resume": "perhaps"}, "--resume: expected true or false"),
])
def test_unknown_or_mistyped_options_are_named(layer, message):
    with pytest.raises(ConfigError, match=message.replace("(", r"\(")):
        config.resolve(l2d.L2DConfig, layer)


def test_unreadable_config_files_are_named(tmp_path):
    (tmp_path / "bad.yaml").write_text("lambda_mld: [1\n")
    for path, message in ((tmp_path / "bad.yaml", "cannot parse"), (tmp_path / "absent.toml", "no such file"),
                          (tmp_path / "x.ini", "neither")):
        if path.suffix == ".ini":
            path.write_text("")
        with pytest.raises(ConfigError, match=message):
            config.read_file(str(path))


# each case the issue measured: a run that trained for nothing, reported garbage or crashed late
@pytest.mark.parametrize("flags, message", [
    (["--batch-size", "64"], "--batch-size 64 x --accumulate-steps 1 exceeds the 32 training samples"),
    (["--train-samples", "0"], "--train-samples must be >= 1, got 0"),
    (["--test-samples", "0"], "--test-samples must be >= 1, got 0"),
    (["--batch-size", "0"], "--batch-size must be >= 1, got 0"),
    (["--student-epochs", "0"], "--student-epochs must be >= 1, got 0"),
    (["--lambda-mld", "nan"], "--lambda-mld must be a finite number, got nan"),
    (["--lr", "inf"], "--lr must be a finite number, got inf"),
    (["--lr", "-1"], "--lr must be > 0, got -1.0"),
    (["--heads", "3"], "--heads 3 must divide --embed-dim 16"),
    (["--dataset", "voc2007"], "--dataset voc2007 needs --data-root"),
    (["--methods", "vanilla,kd"], "--methods: unknown ['kd']"),
    (["--teacher-backbone", "resnet9"], "--teacher-backbone: backbone must be one of"),
    (["--amp", "fp8"], "--amp: unknown 'fp8'"),
])
def test_bad_options_are_refused_before_training_in_one_line(flags, message, tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_:
        cli.main(SMOKE + ["--out-dir", str(tmp_path / "run")] + flags)
    err = capsys.readouterr().err
    assert exit_.value.code == 2 and message in err and "Traceback" not in err and len(err.splitlines()) == 1
    assert not os.path.exists(tmp_path / "run" / "teacher")  # nothing trained


def test_an_unwritable_out_dir_is_refused_before_training(tmp_path, capsys):
    (tmp_path / "file").write_text("")
    with pytest.raises(SystemExit):
        cli.main(SMOKE + ["--out-dir", str(tmp_path / "file" / "run")])
    assert "--out-dir" in capsys.readouterr().err


def test_the_resolved_config_is_printed_and_saved(tmp_path, capsys):
    cli.main(SMOKE + ["--out-dir", str(tmp_path), "--lambda-mld", "3"])
    out = capsys.readouterr().out
    assert "  lambda_mld: 3.0" in out and "  canvas.size: 24" in out
    saved = json.loads((tmp_path / "config.json").read_text())
    assert saved["lambda_mld"] == 3.0 and saved["canvas"]["size"] == 24
    assert json.loads((tmp_path / "results.json").read_text())["config"] == saved
    # a saved config is a config file: the same run again
    assert config.resolve(l2d.L2DConfig, config.read_file(str(tmp_path / "config.json"))) == \
        config.resolve(l2d.L2DConfig, l2d.PRESETS["smoke"], config.given(cli.build_parser().parse_args(
            SMOKE + ["--out-dir", str(tmp_path), "--lambda-mld", "3"]), l2d.L2DConfig))


def test_resuming_with_other_settings_is_refused_naming_them(tmp_path, capsys):
    cli.main(SMOKE + ["--out-dir", str(tmp_path)])
    capsys.readouterr()
    with pytest.raises(SystemExit):
        cli.main(SMOKE + ["--out-dir", str(tmp_path), "--seed", "5"])
    err = capsys.readouterr().err
    assert "seed 0 -> 5" in err and "--no-resume" in err
    assert json.loads((tmp_path / "config.json").read_text())["seed"] == 0  # the refused run changed nothing
    cli.main(SMOKE + ["--out-dir", str(tmp_path), "--num-workers", "0", "--eval-every", "2"])  # paths, workers: ok
    cli.main(SMOKE + ["--out-dir", str(tmp_path), "--seed", "5", "--no-resume"])
    assert json.loads((tmp_path / "results.json").read_text())["config"]["seed"] == 5
