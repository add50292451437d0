"""fp16 compute (GPUs without bf16: T4, V100) on the CPU: dynamic loss scaling, overflowed steps skipped and
counted, the scaler's state in the checkpoint so a resumed run equals an uninterrupted one bit for bit."""

import json

import pytest
import torch

from conftest import tiny_config
from qflash.train.loop import build_setup, run_training

FP16 = ("quant.compute_dtype=fp16", "train.max_steps=8", "train.save_every=4", "train.keep=3")


def _start_scale(monkeypatch, scale: float) -> None:
    """GradScaler's first scale (2^16 by default, which the tiny models never overflow): larger ones do."""
    real = torch.amp.GradScaler.__init__

    def init(self, *args, **kwargs):
        real(self, *args, **{**kwargs, "init_scale": scale})

    monkeypatch.setattr(torch.amp.GradScaler, "__init__", init)


def _metrics(run) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def test_fp16_trains_with_a_loss_scale_and_resumes_exactly(tiny_models, identity_subset, tmp_path, monkeypatch):
    """The scale starts high enough to overflow in the first steps, so the scale at the step-4 checkpoint is not the
    starting one: a resume that did not restore it would skip steps the uninterrupted run applied."""
    _start_scale(monkeypatch, 2.0 ** 18)
    ref = tmp_path / "ref"
    setup = build_setup(tiny_config(tiny_models["qwen2"], identity_subset, ref, *FP16), quiet=True)
    assert setup.dtype == torch.float16
    run_training(setup, quiet=True)
    rows = _metrics(ref)
    assert rows[0]["loss_scale"] == 2.0 ** 18 and any(r["skipped"] for r in rows[:4]) and not rows[-1]["skipped"]
    applied = [r["loss"] for r in rows if not r["skipped"]]
    assert len(applied) >= 4 and applied[-1] < applied[0]
    from qflash.train.checkpoint import load_checkpoint

    state = load_checkpoint(ref / "checkpoints" / "step-00000004").state
    assert state["loss_scaler"]["scale"] == rows[4]["loss_scale"] < 2.0 ** 18

    # Interrupted after step 4's checkpoint, resumed: the same adapter, byte for byte.
    run = tmp_path / "run"

    class Stop(Exception):
        pass

    def stop_at_5(step, values):
        if step == 5:
            raise Stop

    with pytest.raises(Stop):
        run_training(build_setup(tiny_config(tiny_models["qwen2"], identity_subset, run, *FP16), quiet=True),
                     quiet=True, on_step=stop_at_5)
    run_training(build_setup(tiny_config(tiny_models["qwen2"], identity_subset, run, *FP16), quiet=True), quiet=True)
    assert (run / "adapter" / "adapter_model.safetensors").read_bytes() == (
        ref / "adapter" / "adapter_model.safetensors").read_bytes()
    assert [r["loss_scale"] for r in _metrics(run)] == [r["loss_scale"] for r in rows]  # the scale was restored


def test_overflowed_fp16_steps_are_skipped_counted_and_the_scale_lowered(tiny_models, identity_subset, tmp_path,
                                                                          monkeypatch):
    _start_scale(monkeypatch, 2.0 ** 40)  # scaled fp16 gradients overflow until the scale has come down
    run = tmp_path / "run"
    cfg = tiny_config(tiny_models["llama"], identity_subset, run, "quant.compute_dtype=fp16", "train.max_steps=40",
                      "train.save_every=40", "train.max_bad_steps=3")
    run_training(build_setup(cfg, quiet=True), quiet=True)  # more than 3 overflows in a row: no abort
    rows = _metrics(run)
    skipped = [r for r in rows if r["skipped"]]
    assert rows[0]["skipped"] and rows[0]["loss_scale"] == 2.0 ** 40
    assert len(skipped) > 3 and not rows[-1]["skipped"]
    scales = [r["loss_scale"] for r in rows]
    assert all(b == a / 2 for a, b, r in zip(scales, scales[1:], rows) if r["skipped"])  # halved after each overflow
    from qflash.train.checkpoint import load_checkpoint

    state = load_checkpoint(run / "checkpoints" / "step-00000040").state
    assert state["bad_total"] == len(skipped) and state["consecutive_bad"] == 0
