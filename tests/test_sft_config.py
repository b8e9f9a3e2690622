"""SFT config: YAML + command-line overrides, type checks, and every impossible setting rejected by name."""

import pytest

from lora_kernels.training.sft.config import ConfigError, SFTConfig, build_config, config_from_argv, parse_overrides


def test_defaults_are_valid():
    cfg = SFTConfig().validate()
    assert cfg.model == "smollm2" and cfg.dataset == "chatterbot" and cfg.method == "lora" and cfg.lora_r == 16
    assert cfg.target_modules == "all-linear"


def test_yaml_then_cli_overrides(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("lr: 1e-3\nbatch_size: 4\npacking: true\ntarget_modules: [q_proj, v_proj]\nname: a\n")
    cfg = config_from_argv(
        ["--config", str(path), "--batch-size", "6", "--no-packing", "--lr=2e-4", "--name", "b", "--merge", "--resume"]
    )
    assert cfg.batch_size == 6 and cfg.packing is False and cfg.lr == 2e-4 and cfg.name == "b"
    assert cfg.target_modules == ["q_proj", "v_proj"] and cfg.merge is True and cfg.resume == "latest"
    cfg = config_from_argv(["--target_modules", "[o_proj]", "--max_examples", "null", "--system_prompt", "Be brief."])
    assert cfg.target_modules == ["o_proj"] and cfg.max_examples is None and cfg.system_prompt == "Be brief."
    assert config_from_argv(["--target_modules", r".*\.(q|v)_proj"]).target_modules == r".*\.(q|v)_proj"


@pytest.mark.parametrize(
    "argv, needle",
    [
        (["--batch_size", "0"], "batch_size"),
        (["--lr", "-1e-4"], "lr"),
        (["--lr", "0"], "lr"),
        (["--grad_accum", "0"], "grad_accum"),
        (["--max_len", "4"], "max_len"),
        (["--method", "qlora"], "method"),
        (["--lora_r", "0"], "lora_r"),
        (["--lora_dropout", "1.0"], "lora_dropout"),
        (["--precision", "fp8"], "precision"),
        (["--backend", "metal"], "backend"),
        (["--batch_size", "two"], "batch_size"),
        (["--no_such_field", "1"], "no_such_field"),
        (["--max_grad_norm", "-1"], "max_grad_norm"),
        (["positional"], "positional"),
        (["--batch_size"], "batch_size"),
        (["--config", "/nonexistent/config.yaml"], "not found"),
    ],
)
def test_bad_settings_name_the_field(argv, needle):
    with pytest.raises(ConfigError, match=needle):
        config_from_argv(argv)


def test_yaml_unknown_field_and_bad_shape(tmp_path):
    p = tmp_path / "c.yaml"
    p.write_text("lr: 1e-4\nlearning_rate: 1e-4\n")
    with pytest.raises(ConfigError, match="learning_rate"):
        build_config(p)
    p.write_text("- a\n- b\n")
    with pytest.raises(ConfigError, match="mapping"):
        build_config(p)
    p.write_text("batch_size: [1, 2]\n")
    with pytest.raises(ConfigError, match="batch_size"):
        build_config(p)


def test_parse_overrides_keeps_strings_for_string_fields():
    path, cli = parse_overrides(["--name", "123", "--model", "some/folder"])
    assert path is None and cli == {"name": "123", "model": "some/folder"}
    assert build_config(cli=cli).name == "123"


def test_shipped_configs_are_valid_and_the_main_one_equals_the_defaults():
    from pathlib import Path

    configs = sorted((Path(__file__).resolve().parents[1] / "configs").glob("sft_*.yaml"))
    assert configs
    for path in configs:
        build_config(path)
    main = build_config(path.parent / "sft_smollm2_lora.yaml")
    assert main == SFTConfig()  # `lora-kernels sft` with no arguments is the README's run


def test_cli_reports_errors_and_help(capsys):
    from lora_kernels.cli import main

    assert main(["sft", "--batch_size", "0"]) == 2
    assert "config field 'batch_size': must be >= 1" in capsys.readouterr().err
    assert main(["sft", "--dataset", "/nonexistent.jsonl"]) == 2  # found before the model is loaded
    assert "dataset '/nonexistent.jsonl': file not found" in capsys.readouterr().err
    assert main(["sft", "--model", "/nonexistent-model"]) == 2
    assert "/nonexistent-model" in capsys.readouterr().err
    assert main(["sft", "--help"]) == 0
    assert "--lora_r" in capsys.readouterr().out
    assert main(["frobnicate"]) == 2
