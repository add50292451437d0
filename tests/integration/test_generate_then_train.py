"""Generating with a model and then training it: nothing the generation leaves behind changes the training.

Replay answers come from the very model that trains next. On a CPU with AVX512-BF16, bitsandbytes once repacked
every 4-bit weight in place at that first generation (a CPU-only layout, made under inference mode), and the
first training step then failed with "Inference tensors cannot be saved for backward" — but only on a cold
cache, when the answers were generated rather than read. Here both orders must give bit-identical training.
"""

import json

import pytest
import torch

from conftest import tiny_config
from qflash.train.loop import build_setup, micro_batches
from qflash.train.loss import loss_sum


def _first_step(cfg) -> tuple[float, dict[str, torch.Tensor], object]:
    setup = build_setup(cfg, quiet=True)
    with torch.no_grad():  # LoRA B starts at zero; values make the update and every gradient visible
        gen = torch.Generator().manual_seed(3)
        for n, p in sorted(setup.model.named_parameters()):
            if "lora_B" in n:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.05)
    setup.model.train()
    batch = micro_batches(setup, list(range(8)))[0]  # training samples: replay ones are appended after them
    loss = loss_sum(setup.model, batch, fused_ce=setup.levers.fused_ce.on)
    loss.backward()
    grads = {n: p.grad.clone() for n, p in setup.model.named_parameters() if p.requires_grad}
    return loss.item(), grads, setup


@pytest.mark.parametrize("fused", [True, False])
def test_replay_generation_then_training_equals_training_alone(fused, tiny_models, identity_subset, tmp_path,
                                                               monkeypatch):
    monkeypatch.setenv("QFLASH_HOME", str(tmp_path / "home"))  # an empty cache: the answers are generated here
    prompts = tmp_path / "prompts.json"
    prompts.write_text(json.dumps(["Say hello.", "Count to three.", "Name a colour.", "What is rain?"]),
                       encoding="utf-8")
    common = (f"lora.fused={str(fused).lower()}", "lora.dropout=0.0")
    alone = _first_step(tiny_config(tiny_models["qwen2"], identity_subset, tmp_path / "alone", *common))
    after = _first_step(tiny_config(tiny_models["qwen2"], identity_subset, tmp_path / "after", *common,
                                    f"data.replay.prompts={prompts}", "data.replay.max_new_tokens=6",
                                    "data.replay.ratio=1.0"))
    assert after[2].replay is not None and not after[2].replay.from_cache, "the answers were generated here"
    assert alone[0] == after[0], (alone[0], after[0])
    assert alone[1].keys() == after[1].keys() and len(alone[1]) > 0
    for n in alone[1]:
        assert torch.equal(alone[1][n], after[1][n]), n


def test_16bit_compute_with_the_fp32_residual_generates_and_evaluates(tiny_models, identity_subset, tmp_path,
                                                                       monkeypatch):
    """The GPU's arithmetic on the CPU: bf16 compute, embeddings and norms in fp32 (quant.residual_dtype=fp32).

    Outside training's autocast the fp32 hidden states met the bf16 lm_head ("expected scalar type Float but
    found BFloat16"): on a GPU, replay generation, generate, chat, serve and eval all failed. Every forward of a
    loaded model now runs in its compute context (LoadedModel.compute, as training does)."""
    from qflash.train.held_out import held_out_loss
    from qflash.infer.generate import LoadedModel

    monkeypatch.setenv("QFLASH_HOME", str(tmp_path / "home"))
    prompts = tmp_path / "prompts.json"
    prompts.write_text(json.dumps(["Say hello.", "Name a colour."]), encoding="utf-8")
    cfg = tiny_config(tiny_models["llama"], identity_subset, tmp_path / "run", "quant.compute_dtype=bf16",
                      f"data.replay.prompts={prompts}", "data.replay.max_new_tokens=4")
    setup = build_setup(cfg, quiet=True)  # the base model answers the replay prompts here
    assert setup.dtype == torch.bfloat16 and setup.replay is not None and setup.replay.prompts == 2
    assert setup.model.get_input_embeddings().weight.dtype == torch.bfloat16
    loaded = LoadedModel(setup.model, setup.tokenizer, setup.renderer, cfg, True, setup.device, dtype=setup.dtype)
    got = held_out_loss(setup.model, setup.examples[:4], pad_id=setup.tokenizer.pad_token_id, device=setup.device,
                        max_len=cfg.data.max_len, rows=2, packing=True, autocast=loaded.compute())
    assert torch.isfinite(torch.tensor(got.loss)) and got.tokens > 0
