"""GPU tier: train.cuda_graphs — micro-batches captured into CUDA graphs and replayed train exactly as the same
steps run eagerly (every other default lever on: compiled layers, offloaded checkpoint with its copies captured,
host embedding, lean recompute, fused lm_head + CE), across changing batch shapes and optimizer steps."""

from __future__ import annotations

import numpy as np
import pytest
import torch

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
]


def _train(model_dir, graphs: bool, steps, overrides=()):
    from qflash.bench import runner
    from qflash.bench.runner import qflash_batches, qflash_loss, qflash_model, qflash_step

    runner.QFLASH_OVERRIDES[:] = [f"train.cuda_graphs={str(graphs).lower()}", *overrides]
    try:
        model, optimizer, params = qflash_model(model_dir, dropout=0.0, lr=1e-3, attention="auto", seed=0)
        micro = qflash_loss(model, params)
    finally:
        runner.QFLASH_OVERRIDES[:] = []
    rng = np.random.default_rng(0)
    docs = {key: [rng.integers(0, 512, n) for n in lengths] for key, lengths in steps.items() if key != "order"}
    losses = [qflash_step(model, optimizer, params, qflash_batches(docs[key], 1024), micro) for key in steps["order"]]
    lora = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    return losses, lora, micro


STEPS = {"a": (300, 200, 700), "b": (1000, 17, 512, 3), "c": (64,), "order": "aabacbbaab"}


@pytest.mark.parametrize("overrides", [(), ("train.offload_activations=false",), ("train.gradient_checkpointing=false",)],
                         ids=["offloaded-checkpoint", "torch-checkpoint", "no-checkpointing"])
def test_replayed_steps_train_like_eager_ones(overrides, tmp_path, monkeypatch):
    from test_gpu import _tiny_dir

    from qflash.model import activation_offload

    monkeypatch.setattr(activation_offload, "MIN_OFFLOAD_BYTES", 0)  # the tiny layers' inputs really leave
    model_dir = _tiny_dir(tmp_path, "qwen2")
    graphed, graphed_lora, micro = _train(model_dir, True, STEPS, overrides)
    eager, eager_lora, _ = _train(model_dir, False, STEPS, overrides)
    assert hasattr(micro, "graphs"), "train.cuda_graphs did not apply"
    # a, b and c are captured on their second appearance; the rest of the 10 steps replay
    assert len(micro.graphs) >= 2 and micro.replays >= 5, micro.summary()
    if not overrides:
        assert micro.arena.buffers, "the offloaded checkpoint's copies were not captured"
    for g, e in zip(graphed, eager):
        assert g == pytest.approx(e, rel=1e-4), (graphed, eager)
    for n in eager_lora:
        torch.testing.assert_close(graphed_lora[n], eager_lora[n], rtol=1e-3, atol=1e-5)


def test_dropout_steps_stay_eager(tmp_path):
    from test_gpu import _tiny_dir

    from qflash.bench import runner

    model_dir = _tiny_dir(tmp_path, "qwen2")
    runner.QFLASH_OVERRIDES[:] = ["train.cuda_graphs=true"]
    try:
        model, _, params = runner.qflash_model(model_dir, dropout=0.1, lr=1e-3, attention="auto", seed=0)
        micro = runner.qflash_loss(model, params)
    finally:
        runner.QFLASH_OVERRIDES[:] = []
    assert not hasattr(micro, "graphs")  # the eager function: the recompute could not replay the masks
