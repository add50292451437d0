from pathlib import Path

import pytest

from qflash.cli import main
from qflash.config import Config, all_keys, config_from_dict, field_docs, load_config, parse_override
from qflash.errors import ConfigError

REPO = Path(__file__).resolve().parents[2]
DEMO_CFG = REPO / "configs" / "demo.yaml"


def test_demo_config_loads_and_overrides_apply():
    cfg = load_config(DEMO_CFG, ["train.max_steps=20", "data.vars.name=Nova", "output_dir=runs/x", "train.lr=1e-4"])
    assert cfg.train.max_steps == 20
    assert cfg.data.vars["name"] == "Nova"
    assert cfg.data.vars["author"] == "the qflash team"  # untouched keys keep the file's value
    assert cfg.output_dir == "runs/x"
    assert cfg.train.lr == pytest.approx(1e-4)  # YAML 1.1 reads 1e-4 as a string; the schema makes it a float
    assert cfg.data.datasets[0].path == "data/demo/identity.json"


def test_round_trip_through_dict():
    cfg = load_config(DEMO_CFG)
    assert config_from_dict(cfg.to_dict()) == cfg


def test_numeric_name_stays_a_string():
    cfg = load_config(None, ["data.vars.name=2049", "lora.target_modules=q_proj"])
    assert cfg.data.vars["name"] == "2049"
    assert cfg.lora.target_modules == ["q_proj"]


def test_unknown_key_suggests_nearest_in_section(tmp_path):
    with pytest.raises(ConfigError, match=r"unknown key 'train.lrr': did you mean 'lr'\?"):
        load_config(None, ["train.lrr=1"])


def test_unknown_key_suggests_other_section():
    with pytest.raises(ConfigError, match=r"unknown key 'train.r'.*did you mean 'lora.r'"):
        load_config(None, ["train.r=8"])


def test_unknown_key_in_yaml_names_file_and_line(tmp_path):
    p = tmp_path / "c.yaml"
    p.write_text("train:\n  lr: 1.0e-4\n  max_stepz: 3\n", encoding="utf-8")
    with pytest.raises(ConfigError) as e:
        load_config(p)
    assert str(e.value).startswith(f"{p}:3: unknown key 'train.max_stepz'")
    assert "max_steps" in str(e.value)


def test_wrong_type_names_key_and_expectation(tmp_path):
    p = tmp_path / "c.yaml"
    p.write_text("lora:\n  r: sixteen\n", encoding="utf-8")
    with pytest.raises(ConfigError, match=rf"{p}:2: lora.r: expected an integer, got 'sixteen'"):
        load_config(p)
    with pytest.raises(ConfigError, match=r"command line 'quant.mode=nf5': quant.mode: expected one of 'nf4', 'none'"):
        load_config(None, ["quant.mode=nf5"])
    with pytest.raises(ConfigError, match=r"train.gradient_checkpointing: expected true or false"):
        load_config(None, ["train.gradient_checkpointing=maybe"])


def test_impossible_values():
    with pytest.raises(ConfigError, match=r"lora.dropout must be in \[0, 1\)"):
        load_config(None, ["lora.dropout=1.5"])
    with pytest.raises(ConfigError, match=r"train.micro_batch_size must be >= 1"):
        load_config(None, ["train.micro_batch_size=0"])


def test_override_syntax():
    assert parse_override("a.b=[1, 2]") == ("a.b", [1, 2])
    with pytest.raises(ConfigError, match="write KEY=VALUE"):
        parse_override("train.lr")


def test_every_field_is_documented():
    """The dataclass is the schema: every key a user can set is listed and reachable, and every field of every
    config dataclass carries its documentation (a string right after it, as litgpt's fields do), read by the
    same field_docs that `qflash config explain` prints."""
    keys = all_keys()
    assert "data.datasets.0.path" in keys and "quant.double_quant" in keys
    assert len(keys) == len(set(keys))
    docs = field_docs()
    assert list(docs) == keys
    sections = {k.rsplit(".", 1)[0] for k in keys if "." in k} - {k.rsplit(".", 2)[0] for k in keys if ".0." in k}
    # A key with keys below it is a section (`train`, documented by its own fields), unless it is a list of
    # items (data.datasets, whose items' keys read data.datasets.0.path): that one has a doc of its own.
    settings = [k for k in keys if k not in sections]
    undocumented = [k for k in settings if not docs[k].strip()]
    assert len(settings) >= 40 and undocumented == [], undocumented
    assert docs["lora.r"] == "Rank of the LoRA update."
    assert docs["data.replay.ratio"].startswith("Replay samples per training sample")


def _run_cli(capsys, *argv):
    code = main(list(argv))
    err = capsys.readouterr().err.strip().splitlines()
    return code, err


@pytest.mark.parametrize(
    "overrides, expected",
    [
        (["train.lrr=1"], "did you mean 'lr'"),
        (["train.epochs=many"], "train.epochs: expected a number, got 'many'"),
        (["data.datasets=[{path: does/not/exist.json}]"], "data.datasets.0.path: does/not/exist.json: file not found"),
        (["model.path=/no/such/model"], "model.path: /no/such/model: no such file or directory"),
    ],
)
def test_bad_config_exits_2_with_one_line(capsys, overrides, expected, tmp_path):
    code, err = _run_cli(capsys, "train", str(DEMO_CFG), f"output_dir={tmp_path}", *overrides)
    assert code == 2
    assert len(err) == 1, err
    assert expected in err[0]
    assert err[0].startswith("qflash: error: ")


def test_config_show_prints_resolved_yaml(capsys):
    assert main(["config", "show", str(DEMO_CFG), "train.max_steps=7"]) == 0
    out = capsys.readouterr().out
    assert "max_steps: 7" in out and "name: Aurora" in out


def test_missing_config_file(capsys):
    code, err = _run_cli(capsys, "config", "show", "nope.yaml")
    assert code == 2 and "nope.yaml: config file not found" in err[0]


def test_defaults_are_valid():
    cfg = Config()
    assert cfg.quant.mode == "nf4" and cfg.quant.double_quant and cfg.train.gradient_checkpointing


def test_a_key_given_twice_in_the_yaml_names_file_line_and_key(tmp_path):
    # A second `train:` section used to replace the first: max_steps and save_every fell back to defaults.
    p = tmp_path / "twice.yaml"
    p.write_text("train:\n  max_steps: 20\n  save_every: 5\nlora:\n  r: 8\ntrain:\n  lr: 1.0e-4\n", encoding="utf-8")
    with pytest.raises(ConfigError, match=rf"^{p}:6: not valid YAML: the key 'train' is given twice \(first at line 1\)"):
        load_config(p)
    p.write_text("train:\n  max_steps: 20\n  lr: 1.0e-4\n  max_steps: 30\n", encoding="utf-8")
    with pytest.raises(ConfigError, match=rf"^{p}:4: .*'max_steps' is given twice \(first at line 2\)"):
        load_config(p)
    # Merge keys stay YAML: an explicit key overrides a merged one.
    p.write_text("data:\n  vars:\n    <<: {name: A, author: B}\n    name: C\n", encoding="utf-8")
    assert load_config(p).data.vars == {"name": "C", "author": "B"}


def test_a_key_given_twice_in_an_override_or_a_saved_run_config(tmp_path):
    with pytest.raises(ConfigError, match=r"command line 'data.vars=\{name: A, name: B\}': the key 'name' is given twice"):
        load_config(None, ["data.vars={name: A, name: B}"])
    from qflash.rundir import RUN_CONFIG, find_adapter

    (tmp_path / "adapter_config.json").write_text("{}", encoding="utf-8")
    (tmp_path / RUN_CONFIG).write_text("train:\n  max_steps: 3\ntrain:\n  max_steps: 4\n", encoding="utf-8")
    with pytest.raises(ConfigError, match=rf"^{tmp_path / RUN_CONFIG}:3: .*'train' is given twice"):
        find_adapter(tmp_path)


def test_adamw_betas_and_eps_reach_the_optimizer():
    """train.adam_betas / adam_eps (seed 002 trains with beta2 0.95) are the optimizer's: its steps are those of
    torch's AdamW built with them by hand, and differ from the defaults' from the second step on."""
    import re

    import torch

    from qflash.train.loop import build_optimizer

    def steps(cfg, make=None) -> torch.Tensor:
        torch.manual_seed(0)
        p = torch.nn.Parameter(torch.randn(8))
        opt = make([p]) if make else build_optimizer([p], cfg, torch.device("cpu"))
        for i in range(3):
            p.grad = torch.randn(8) * (i + 1)
            opt.step()
        return p.detach()

    cfg = load_config(None, ["train.adam_betas=[0.9, 0.95]", "train.adam_eps=1e-3", "train.weight_decay=0.1"])
    group = build_optimizer([torch.nn.Parameter(torch.ones(1))], cfg, torch.device("cpu")).param_groups[0]
    assert tuple(group["betas"]) == (0.9, 0.95) and group["eps"] == 1e-3 and group["weight_decay"] == 0.1
    by_hand = steps(None, lambda ps: torch.optim.AdamW(ps, lr=cfg.train.lr, betas=(0.9, 0.95), eps=1e-3,
                                                        weight_decay=0.1))
    assert torch.equal(steps(cfg), by_hand)
    assert not torch.allclose(steps(load_config(None, ["train.weight_decay=0.1"])), by_hand)
    for bad, says in ((["train.adam_betas=[0.9, 1.0]"], "two numbers in [0, 1)"), (["train.adam_eps=0"], "> 0")):
        with pytest.raises(ConfigError, match=re.escape(says)):
            load_config(None, bad)
