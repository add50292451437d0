"""NF4 + LoRA training of tiny random Qwen2 and Llama models on the CPU."""

import pytest
import torch

from conftest import tiny_config
from qflash.train.loop import build_setup, run_training


def _base_state(model) -> dict[str, bytes]:
    """Every frozen tensor (the NF4-packed weights, their quant state, norms, embeddings) as bytes."""
    out = {}
    for name, t in model.state_dict().items():
        if "lora_" in name:
            continue
        out[name] = t.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes() if t.dtype != torch.bool else t.numpy().tobytes()
    return out


@pytest.mark.parametrize("arch, checkpointing", [("qwen2", False), ("llama", True)])
def test_nf4_lora_learns_and_base_stays_frozen(arch, checkpointing, tiny_models, identity_subset, tmp_path):
    import bitsandbytes as bnb

    cfg = tiny_config(tiny_models[arch], identity_subset, tmp_path / "run", "train.max_steps=12", "train.lr=3e-2",
                      f"train.gradient_checkpointing={str(checkpointing).lower()}")
    setup = build_setup(cfg)
    model = setup.model
    n4 = sum(isinstance(m, bnb.nn.Linear4bit) for m in model.modules())
    assert n4 == 2 * 7, "every attention and MLP projection of both blocks is NF4"
    q = next(m for m in model.modules() if isinstance(m, bnb.nn.Linear4bit))
    assert q.weight.quant_state.quant_type == "nf4" and q.weight.quant_state.nested  # double quantization

    inner = model.base_model.model
    assert getattr(inner, "is_activation_checkpointing", getattr(inner, "is_gradient_checkpointing", None)) == checkpointing
    base_before = _base_state(model)
    lora_before = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    assert lora_before and all("lora_" in n for n in lora_before)

    result = run_training(setup, quiet=True)

    assert result.steps == 12
    first, last = result.losses[0], sum(result.losses[-3:]) / 3
    assert last < 0.8 * first, result.losses
    changed = [n for n, p in model.named_parameters() if p.requires_grad and not torch.equal(p.detach(), lora_before[n])]
    assert len(changed) == len(lora_before), "every LoRA tensor was updated"
    assert _base_state(model) == base_before, "base weights are byte-identical after training"

    adapter = result.adapter_dir
    assert (adapter / "adapter_config.json").is_file() and (adapter / "adapter_model.safetensors").is_file()
    assert (adapter / "qflash_config.yaml").is_file() and (adapter / "data_fingerprint.json").is_file()
    assert (result.output_dir / "metrics.jsonl").read_text().count("\n") == 12
    assert list((result.output_dir / "tensorboard").glob("events.out.tfevents.*"))


def _one_step(tiny_dir, data, out, mbs, ga):
    cfg = tiny_config(tiny_dir, data, out, f"train.micro_batch_size={mbs}", f"train.grad_accum={ga}",
                      "train.max_steps=2", "train.lr=1e-3", "train.max_grad_norm=0")
    setup = build_setup(cfg)
    result = run_training(setup, quiet=True)
    return result.losses, {n: p.detach().clone() for n, p in setup.model.named_parameters() if p.requires_grad}


def test_gradient_accumulation_is_token_weighted(tiny_models, identity_subset, tmp_path):
    """1 micro-batch of 8 and 8 micro-batches of 1 give the same loss and the same LoRA update."""
    losses_a, w_a = _one_step(tiny_models["qwen2"], identity_subset, tmp_path / "a", 8, 1)
    losses_b, w_b = _one_step(tiny_models["qwen2"], identity_subset, tmp_path / "b", 1, 8)
    assert losses_a == pytest.approx(losses_b, abs=1e-5)
    for n in w_a:
        torch.testing.assert_close(w_a[n], w_b[n], atol=1e-5, rtol=0)


def test_adapter_loads_with_plain_peft_and_matches_qflash_inference(tiny_models, identity_subset, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    from qflash.infer.generate import load_for_inference

    cfg = tiny_config(tiny_models["llama"], identity_subset, tmp_path / "run", "train.max_steps=4")
    result = run_training(build_setup(cfg), quiet=True)

    base = AutoModelForCausalLM.from_pretrained(
        str(tiny_models["llama"]),
        quantization_config=BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=torch.float32,
        ),
        dtype=torch.float32,
        device_map={"": "cpu"},
    )
    for m in base.modules():  # on AVX512-BF16 CPUs bitsandbytes would switch to its bf16 CPU kernel in eval mode
        if hasattr(m, "support_avx512bf16_for_cpu"):  # (a repacked layout): the reference computes in fp32 as qflash
            m.support_avx512bf16_for_cpu = False
    plain = PeftModel.from_pretrained(base, str(tmp_path / "run" / "adapter")).eval()
    ours = load_for_inference(adapter=str(result.output_dir), device="cpu")
    ids = torch.tensor([ours.renderer.prompt_ids([{"role": "user", "content": "Who are you?"}])])
    with torch.no_grad():
        a = plain(input_ids=ids).logits
        b = ours.model(input_ids=ids).logits
        with ours.model.disable_adapter():
            c = ours.model(input_ids=ids).logits
    assert (a - b).abs().max().item() <= 1e-5
    assert (a - c).abs().max().item() > 1e-3, "the adapter changes the logits"


@pytest.mark.parametrize("switch", ["lora.rslora=true", "lora.dora=true"])
def test_rslora_and_dora_switches_train(switch, tiny_models, identity_subset, tmp_path):
    cfg = tiny_config(tiny_models["qwen2"], identity_subset, tmp_path / "run", "train.max_steps=3", switch)
    setup = build_setup(cfg)
    peft_cfg = setup.model.peft_config["default"]
    assert peft_cfg.use_rslora == cfg.lora.rslora and peft_cfg.use_dora == cfg.lora.dora
    if cfg.lora.dora:
        assert any("lora_magnitude_vector" in n for n, _ in setup.model.named_parameters())
    result = run_training(setup, quiet=True)
    assert all(torch.isfinite(torch.tensor(result.losses)))
    assert result.losses[-1] < result.losses[0]


def test_a_base_model_without_a_chat_template_trains_with_a_built_in_template(smol_tokenizer, identity_subset,
                                                                              tmp_path, caplog):
    """A base model (its tokenizer has no chat template, as Llama 3 base) is refused without data.template and trains
    with data.template=llama3: replies end with <|eot_id|>, which carries loss; the warning that a base model has
    likely never seen the turn markers is said."""
    import copy
    import math

    from conftest import make_tiny_model
    from qflash import once
    from qflash.data.template import IGNORE
    from qflash.errors import DataError
    from qflash.model.loading import load_tokenizer

    tok = copy.deepcopy(smol_tokenizer)
    tok.add_special_tokens({"additional_special_tokens": ["<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"]})
    tok.chat_template = None
    base = make_tiny_model(tmp_path / "base", "llama", tok)
    assert load_tokenizer(base).chat_template is None
    with pytest.raises(DataError, match="no chat template"):
        build_setup(tiny_config(base, identity_subset, tmp_path / "refused", "train.max_steps=2"))

    cfg = tiny_config(base, identity_subset, tmp_path / "run", "train.max_steps=3", "data.template=llama3",
                      "data.cache=false")
    once._said.clear()  # said once per process: another test may have said it already
    with caplog.at_level("WARNING", logger="qflash.data.template"):
        setup = build_setup(cfg)
    assert any("no chat template of its own (a base model); data.template=llama3" in r.message for r in caplog.records)
    eot = tok.convert_tokens_to_ids("<|eot_id|>")
    ex = setup.examples[0]
    trained = [int(i) for i, label in zip(ex.input_ids, ex.labels) if label != IGNORE]
    assert trained[-1] == eot and tok.convert_tokens_to_ids("<|start_header_id|>") in list(ex.input_ids)
    result = run_training(setup, quiet=True)
    assert result.steps == 3 and all(math.isfinite(loss) for loss in result.losses)
    assert "template: llama3" in (result.adapter_dir / "qflash_config.yaml").read_text(encoding="utf-8")
