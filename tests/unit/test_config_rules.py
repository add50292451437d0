"""Combination rules (each section's `requires`) and `qflash config explain`."""

import subprocess
import sys
from pathlib import Path

import pytest

from qflash import config as config_module
from qflash.cli import main
from qflash.config import KernelsConfig, Needs, all_keys, combination_rules, explain, load_config
from qflash.errors import ConfigError

REPO = Path(__file__).resolve().parents[2]

# (the switch set on, a prerequisite set so it cannot work, the same prerequisite set so it can, and what the
# error must name). Every rule of every section appears here (test_every_rule_is_tested).
CASES = [
    ("kernels.keep_attention=true", "train.offload_activations=false", "train.offload_activations=true",
     "train.offload_activations=true"),
    ("kernels.keep_attention=true", "attention.backend=sdpa", "attention.backend=torch_varlen",
     "attention.backend=auto or torch_varlen"),
    ("kernels.keep_attention=true", "attention.backend=flash_attn", "attention.backend=auto",
     "attention.backend=auto or torch_varlen"),
    ("kernels.lean_tail_in_graph=true", "kernels.lean_recompute=false", "kernels.lean_recompute=true",
     "kernels.lean_recompute=true"),
    ("kernels.lean_tail_in_graph=true", "kernels.compile_layers=false", "kernels.compile_layers=true",
     "kernels.compile_layers=true or auto"),
    ("kernels.lean_tail_in_graph=true", "train.offload_activations=false", "train.offload_activations=true",
     "train.offload_activations=true"),
    ("kernels.traced_dequant=true", "lora.fused=false", "lora.fused=true", "lora.fused=true"),
    ("kernels.traced_dequant=true", "kernels.compile_layers=false", "kernels.compile_layers=auto",
     "kernels.compile_layers=true or auto"),
    ("kernels.lean_recompute=true", "lora.fused=false", "lora.fused=true", "lora.fused=true"),
    ("kernels.lean_recompute=true", "train.gradient_checkpointing=false", "train.gradient_checkpointing=true",
     "train.gradient_checkpointing=true"),
    ("kernels.fused_norm=true", "lora.fused=false", "lora.fused=true", "lora.fused=true"),
    ("lora.fused=true", "lora.dora=true", "lora.dora=false", "lora.dora=false"),
    ("train.offload_activations=true", "train.gradient_checkpointing=false", "train.gradient_checkpointing=true",
     "train.gradient_checkpointing=true"),
]
IDS = [f"{s.split('=')[0]}+{bad}" for s, bad, _, _ in CASES]


DEFAULT_OFF = [c for c in CASES if config_module._value(config_module.Config(), c[0].split("=")[0]) is not True]
DEFAULT_ON = [c for c in CASES if c not in DEFAULT_OFF]


def test_the_rules_cover_switches_on_and_off_by_default():
    assert {c[0] for c in DEFAULT_OFF} == {"kernels.keep_attention=true", "kernels.lean_tail_in_graph=true"}
    assert DEFAULT_ON


@pytest.mark.parametrize("switch, bad, good, needs", DEFAULT_OFF, ids=[f"{s.split('=')[0]}+{b}" for s, b, _, _ in DEFAULT_OFF])
def test_explicit_switch_with_its_prerequisite_off_is_refused(switch, bad, good, needs):
    with pytest.raises(ConfigError) as e:
        load_config(None, [switch, bad])
    msg = str(e.value)
    key = switch.split("=")[0]
    # where the switch was set, what it needs, where the prerequisite was set, and what to do
    assert msg.startswith(f"command line '{switch}': {key}=true needs {needs} ("), msg
    assert f"(command line '{bad}'); set " in msg and f" or {key}=false" in msg, msg
    assert "\n" not in msg


@pytest.mark.parametrize("switch, bad, good, needs", CASES, ids=IDS)
def test_switch_left_at_its_default_is_not_refused(switch, bad, good, needs):
    """The default-on switches (traced_dequant, lean_recompute, fused_norm, lora.fused, offload_activations)
    are skipped quietly by the code when their prerequisite is off, as before: only an explicit true fails."""
    load_config(None, [bad])


@pytest.mark.parametrize("switch, bad, good, needs", CASES, ids=IDS)
def test_explicit_switch_with_its_prerequisite_on_is_accepted(switch, bad, good, needs):
    cfg = load_config(None, [switch, good])
    assert config_module._value(cfg, switch.split("=")[0]) is True


@pytest.mark.parametrize("switch, bad, good, needs", DEFAULT_ON, ids=[f"{s.split('=')[0]}+{b}" for s, b, _, _ in DEFAULT_ON])
def test_a_default_on_switch_written_out_is_not_refused(switch, bad, good, needs):
    """A run's saved config (config.yaml, the adapter's qflash_config.yaml) writes every key, `true` included: it
    loads back whatever the prerequisites; the levers report such a switch as off, with its reason."""
    cfg = load_config(None, [switch, bad])
    assert config_module._value(cfg, switch.split("=")[0]) is True


def test_a_saved_run_config_loads_back(tmp_path):
    """The demo's config (no activation checkpointing, offload on by default) written out whole and read again."""
    cfg = load_config(REPO / "configs" / "demo.yaml", [])
    assert not cfg.train.gradient_checkpointing and cfg.train.offload_activations
    saved = tmp_path / "config.yaml"
    saved.write_text(cfg.to_yaml(), encoding="utf-8")
    assert load_config(saved, []).to_dict() == cfg.to_dict()


def test_every_rule_is_tested():
    tested = {(s.split("=")[0], bad.split("=")[0]) for s, bad, _, _ in CASES}
    rules = combination_rules()
    assert {(r.switch, r.key) for r in rules} == tested
    keys = set(all_keys())
    assert all(r.switch in keys and r.key in keys for r in rules)


def test_everything_on_explicitly_is_accepted():
    load_config(None, ["kernels.keep_attention=true", "kernels.lean_tail_in_graph=true", "kernels.traced_dequant=true",
                       "kernels.lean_recompute=true", "kernels.fused_norm=true", "lora.fused=true",
                       "train.offload_activations=true", "train.gradient_checkpointing=true",
                       "attention.backend=torch_varlen", "kernels.compile_layers=true", "lora.dora=false"])


@pytest.mark.parametrize("switch, bad, chain", [
    ("kernels.lean_tail_in_graph=true", "lora.fused=false", "kernels.lean_recompute, which needs lora.fused=true"),
    ("kernels.lean_tail_in_graph=true", "train.gradient_checkpointing=false",
     "kernels.lean_recompute, which needs train.gradient_checkpointing=true"),
    ("kernels.keep_attention=true", "train.gradient_checkpointing=false",
     "train.offload_activations, which needs train.gradient_checkpointing=true"),
])
def test_a_prerequisite_on_by_default_brings_its_own_rules(switch, bad, chain):
    """lean_tail_in_graph needs lean_recompute, on by default, which does nothing without lora.fused."""
    with pytest.raises(ConfigError) as e:
        load_config(None, [switch, bad])
    assert str(e.value).startswith(f"command line '{switch}': {switch.split('=')[0]}=true needs {chain} ("), e.value
    load_config(None, [bad])


def test_yaml_origins_of_both_keys(tmp_path):
    p = tmp_path / "c.yaml"
    p.write_text("train:\n  lr: 1.0e-4\n  offload_activations: false\nkernels:\n  keep_attention: true\n",
                 encoding="utf-8")
    with pytest.raises(ConfigError) as e:
        load_config(p)
    assert str(e.value).startswith(f"{p}:5: kernels.keep_attention=true needs train.offload_activations=true")
    assert f"but train.offload_activations is false ({p}:3)" in str(e.value)
    # the override wins over the file, and its origin is named
    with pytest.raises(ConfigError, match=r"^command line 'kernels.keep_attention=true': "):
        load_config(p, ["kernels.keep_attention=true"])
    load_config(p, ["train.offload_activations=true"])
    load_config(p, ["kernels.keep_attention=false"])


def test_a_whole_section_override_counts_as_explicit():
    with pytest.raises(ConfigError, match=r"^command line 'kernels=\{keep_attention: true\}': kernels.keep_attention=true"):
        load_config(None, ["kernels={keep_attention: true}", "train.offload_activations=false"])


def test_a_prerequisite_off_by_default_is_named_as_such(monkeypatch):
    """No shipped rule has a prerequisite that is off by default; one that had would say so."""
    monkeypatch.setattr(KernelsConfig, "requires", (Needs("kernels.keep_attention", "lora.rslora", (True,), "test"),))
    with pytest.raises(ConfigError, match=r"but lora.rslora is false \(the default\); set lora.rslora=true or "
                                          r"kernels.keep_attention=false$"):
        load_config(None, ["kernels.keep_attention=true"])
    load_config(None, ["kernels.keep_attention=true", "lora.rslora=true"])


def test_demo_config_refuses_kept_attention_as_one_line(capsys):
    """configs/demo.yaml turns checkpointing off; asking for kept attention on top is an error naming its line."""
    line = next(i for i, t in enumerate((REPO / "configs/demo.yaml").read_text().splitlines(), 1)
                if t.strip().startswith("gradient_checkpointing:"))
    code = main(["config", "show", str(REPO / "configs/demo.yaml"), "kernels.keep_attention=true"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1, err
    assert err[0].startswith("qflash: error: command line 'kernels.keep_attention=true': kernels.keep_attention=true")
    assert f"train.gradient_checkpointing is false ({REPO / 'configs/demo.yaml'}:{line})" in err[0]


# --------------------------------------------------------------------------------------------
# qflash config explain

def test_explain_a_key():
    text = explain("lora.r")
    assert text.startswith("lora.r\n  type:    an integer\n  default: 16\n")
    assert "Rank of the LoRA update." in text


def test_explain_a_switch_lists_what_it_needs():
    text = explain("kernels.keep_attention")
    assert "default: false" in text and "one of" not in text
    assert "  train.offload_activations=true: the kept outputs travel with the offloaded layer inputs" in text
    assert "  attention.backend=auto or torch_varlen: " in text


def test_explain_list_items_and_sections():
    assert explain("data.datasets.3.path") == explain("data.datasets.path") == explain("data.datasets.0.path")
    assert explain("data.datasets.path").startswith("data.datasets.0.path\n")
    section = explain("kernels")
    assert section.startswith("kernels: a section\n\nSpeed switches")
    assert "kernels.compile_layers = auto" in section and "lora.r" not in section


def test_explain_everything_one_line_per_setting():
    lines = explain().splitlines()
    settings = [k for k in all_keys() if not any(j.startswith(k + ".") for j in all_keys()) or k.endswith("datasets")]
    assert [line.split(" = ")[0] for line in lines] == settings
    lr = next(line for line in lines if line.startswith("train.lr "))
    assert lr.split() == ["train.lr", "=", "0.0002", "Peak", "learning", "rate."]
    fmt = next(line for line in lines if line.startswith("data.datasets.0.columns "))
    assert fmt.endswith("e.g. {user: ask, assistant: answer} (system optional).")  # not cut at "e.g."


@pytest.mark.parametrize("key, said", [
    ("lora.rank", "unknown key 'lora.rank': did you mean 'lora.r'?"),
    ("train.lrr", "unknown key 'train.lrr': did you mean 'lr'?"),
    ("train.r", "unknown key 'train.r': did you mean 'lora.r'?"),
])
def test_explain_a_wrong_key_suggests_as_load_config_does(key, said):
    with pytest.raises(ConfigError) as e:
        explain(key)
    assert str(e.value) == said
    with pytest.raises(ConfigError) as loading:
        load_config(None, [f"{key}=1"])
    assert str(loading.value) == f"command line '{key}=1': {said}"


def qflash(*args: str) -> subprocess.CompletedProcess:
    """The real console entry point, as tests/integration/test_cli_e2e.py runs it."""
    return subprocess.run([sys.executable, "-m", "qflash.cli", *args], cwd=REPO, capture_output=True, text=True,
                          timeout=300)


def test_cli_config_explain():
    p = qflash("config", "explain", "lora.r")
    assert p.returncode == 0, p.stderr
    assert "Rank of the LoRA update." in p.stdout and "default: 16" in p.stdout


def test_cli_config_explain_wrong_key_is_one_line():
    p = qflash("config", "explain", "lora.rank")
    assert p.returncode == 2
    assert p.stderr.strip().splitlines() == ["qflash: error: unknown key 'lora.rank': did you mean 'lora.r'?"]
