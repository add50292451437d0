"""Run directories and checkpoints on the CPU: resuming where fewer GPUs are visible, and a run directory's saved
config that asks to run a model's code."""

from __future__ import annotations

import json
import logging

import torch

from qflash.config import Config


def _fake_cuda(monkeypatch, visible: int, current: int = 0) -> list[tuple[int, torch.Tensor]]:
    """torch.cuda as a machine with `visible` GPUs shows it: setting the state of a device that is not there
    fails as CUDA does (invalid device ordinal). Returns the (device, state) pairs set."""
    calls: list[tuple[int, torch.Tensor]] = []

    def set_rng_state(state, device="cuda"):
        index = device if isinstance(device, int) else torch.device(device).index or 0
        if index >= visible:
            raise RuntimeError("CUDA error: invalid device ordinal")
        calls.append((index, state))

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: visible)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: current)
    monkeypatch.setattr(torch.cuda, "set_rng_state", set_rng_state)
    monkeypatch.setattr(torch.cuda.random, "set_rng_state", set_rng_state)  # what set_rng_state_all calls
    return calls


def test_resume_with_fewer_visible_gpus_restores_this_devices_rng(monkeypatch):
    from qflash.train.checkpoint import restore_rng, rng_state_json

    saved = {"torch": torch.get_rng_state(), "cuda": [torch.full((16,), i, dtype=torch.uint8) for i in range(4)]}
    state_json = rng_state_json()
    calls = _fake_cuda(monkeypatch, visible=1)
    restore_rng(state_json, saved)  # saved on 4 GPUs (an older checkpoint: no cuda_device), resumed on 1
    assert [(i, int(s[0])) for i, s in calls] == [(0, 0)], "only this process's device, with device 0's state"

    calls.clear()
    restore_rng(state_json, {**saved, "cuda_device": 2})  # the saving process ran on its GPU 2
    assert [(i, int(s[0])) for i, s in calls] == [(0, 2)], "the saving process's own state, into this device"


def test_checkpoint_rng_records_the_device_it_was_taken_on(monkeypatch):
    from qflash.train import checkpoint

    _fake_cuda(monkeypatch, visible=2, current=1)
    monkeypatch.setattr(torch.cuda, "get_rng_state_all", lambda: [torch.zeros(16, dtype=torch.uint8)] * 2)
    assert checkpoint._torch_rng()["cuda_device"] == 1


def _run_dir(tmp_path, trust: bool):
    adapter = tmp_path / "run" / "adapter"
    adapter.mkdir(parents=True)
    (adapter / "adapter_config.json").write_text(json.dumps({"r": 4}))
    cfg = Config()
    cfg.model.trust_remote_code = trust
    (adapter / "qflash_config.yaml").write_text(cfg.to_yaml())
    return tmp_path / "run"


def test_a_run_directorys_config_cannot_switch_on_remote_code(tmp_path, caplog):
    from qflash.rundir import find_adapter

    run = _run_dir(tmp_path, trust=True)
    with caplog.at_level(logging.WARNING):
        _, cfg = find_adapter(run)
    assert cfg.model.trust_remote_code is False, "a shared run directory must not run the model's code"
    assert "model.trust_remote_code: true is ignored" in caplog.text and "--trust-remote-code" in caplog.text
    _, cfg = find_adapter(run, trust_remote_code=True)  # the user's own --trust-remote-code
    assert cfg.model.trust_remote_code is True
    _, cfg = find_adapter(_run_dir(tmp_path / "b", trust=False), trust_remote_code=True)
    assert cfg.model.trust_remote_code is True


def test_commands_take_trust_from_the_command_line_only():
    from qflash.cli import build_parser

    parser = build_parser()
    for argv in (["chat", "run"], ["generate", "run", "--input", "i", "--output", "o"], ["serve", "run"],
                 ["merge", "run", "--output", "o"], ["export", "run"], ["eval", "run"], ["compare", "run"]):
        assert parser.parse_args(argv).trust_remote_code is False
        assert parser.parse_args([*argv, "--trust-remote-code"]).trust_remote_code is True


def test_a_setting_added_after_a_checkpoint_is_the_same_run_at_its_default():
    """A checkpoint written before a setting existed (data.encoding came later) resumes while the setting is left
    at its default; set to anything else, it is a difference like any other."""
    from qflash.config import Config
    from qflash.train.resume import differences, flatten, run_identity

    fingerprint, shapes = {"fingerprint": "f", "tokenizer": "t"}, {"a": [2, 2]}
    current = run_identity(Config().to_dict(), fingerprint, shapes)
    saved = {**current, "config": {k: v for k, v in current["config"].items() if k != "data.encoding"}}
    assert "data.encoding" in flatten(Config().to_dict()) and differences(saved, current) == []
    forced = Config()
    forced.data.encoding = "big5"
    assert differences(saved, run_identity(forced.to_dict(), fingerprint, shapes)) == ["data.encoding: None -> 'big5'"]
    changed = {**current, "config": {**current["config"], "train.lr": 1.0}}
    assert differences(changed, current) == [f"train.lr: 1.0 -> {Config().train.lr!r}"]
