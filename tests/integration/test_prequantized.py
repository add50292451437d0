"""A base checkpoint that is quantized already: bitsandbytes 4-bit loads as stored (its packed bytes unchanged,
never quantized again), trains, and merges into the 16-bit base given with --base; GPTQ/AWQ without their
package, and formats qflash cannot train on, are refused in one line."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from conftest import tiny_config
from qflash.cli import main
from qflash.errors import ModelError
from qflash.model.loading import load_base_model, stored_quantization

CPU = torch.device("cpu")


def _save_quantized(src: Path, out: Path, quant_type: str, double_quant: bool) -> Path:
    """The 16-bit tiny model loaded in 4-bit by plain transformers and saved: a pre-quantized checkpoint, as users
    make them (config.json carries its quantization_config)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer, BitsAndBytesConfig

    bnb = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type=quant_type, bnb_4bit_use_double_quant=double_quant,
                             bnb_4bit_compute_dtype=torch.float16)  # not the run's dtype: qflash sets its own
    model = AutoModelForCausalLM.from_pretrained(str(src), quantization_config=bnb, dtype=torch.float32,
                                                 device_map={"": "cpu"}, use_kernels=False)
    model.save_pretrained(str(out))
    AutoTokenizer.from_pretrained(str(src)).save_pretrained(str(out))
    return out


@pytest.fixture(scope="module")
def quantized(tiny_models, tmp_path_factory):
    root = tmp_path_factory.mktemp("prequant")
    return {
        "nf4": _save_quantized(tiny_models["qwen2"], root / "nf4-dq", "nf4", True),
        "fp4": _save_quantized(tiny_models["qwen2"], root / "fp4", "fp4", False),
    }


def _packed(model) -> dict[str, torch.Tensor]:
    """name.weight -> the packed 4-bit bytes of every bitsandbytes 4-bit layer."""
    return {f"{n}.weight": m.weight.data.clone() for n, m in model.named_modules()
            if hasattr(getattr(m, "weight", None), "quant_state")}


def _stored(model_dir: Path, names) -> dict[str, torch.Tensor]:
    with safe_open(str(model_dir / "model.safetensors"), framework="pt") as f:
        return {n: f.get_tensor(n) for n in names}


def _load(model_dir: Path, **kw):
    args = dict(quant_mode="nf4", double_quant=True, dtype=torch.float32, device=CPU, attention="sdpa") | kw
    return load_base_model(model_dir, **args)


@pytest.mark.parametrize("kind", ["nf4", "fp4"])
def test_packed_bytes_are_the_checkpoints(kind, quantized, caplog):
    """Whatever the quant section says (nf4 + double quant here), the checkpoint's own bytes and settings are used."""
    with caplog.at_level(logging.INFO, logger="qflash.model.loading"):
        model = _load(quantized[kind])
    packed = _packed(model)
    assert len(packed) == 14  # 7 projections x 2 layers
    stored = _stored(quantized[kind], packed)
    for name, got in packed.items():
        assert got.dtype == torch.uint8 and torch.equal(got.view(-1), stored[name].view(-1)), name
    states = [m.weight.quant_state for m in model.modules() if hasattr(getattr(m, "weight", None), "quant_state")]
    assert {s.quant_type for s in states} == {kind} and {s.nested for s in states} == {kind == "nf4"}
    assert {m.compute_dtype for m in model.modules() if hasattr(getattr(m, "weight", None), "quant_state")} == \
        {torch.float32}, "the run's compute dtype, not the fp16 the checkpoint was saved with"
    notices = [r.getMessage() for r in caplog.records if "quantized already" in r.getMessage()]
    assert len(notices) == 1 and "loaded as stored, not re-quantized" in notices[0]
    if kind == "fp4":  # the settings that differ are named
        assert "(quant.mode=nf4, quant.double_quant=true apply to 16-bit bases only)" in notices[0]
        assert notices[0].startswith(f"model.path: {quantized[kind]} is quantized already (bitsandbytes fp4, "
                                     "no double quant)")


def test_stored_4bit_is_used_even_with_quant_mode_none(quantized, caplog):
    """quant.mode=none cannot give back 16-bit weights: the 4-bit checkpoint is used as stored, said once."""
    with caplog.at_level(logging.WARNING, logger="qflash.model.loading"):
        model = _load(quantized["nf4"], quant_mode="none")
    assert len(_packed(model)) == 14
    assert any("quant.mode=none apply to 16-bit bases only" in r.getMessage() for r in caplog.records)


def _fake_checkpoint(root: Path, quant: dict) -> Path:
    """config.json only: the check runs before any weight is read."""
    root.mkdir(parents=True)
    (root / "config.json").write_text(json.dumps({"model_type": "qwen2", "architectures": ["Qwen2ForCausalLM"],
                                                  "quantization_config": quant}), encoding="utf-8")
    return root


@pytest.mark.parametrize("quant, says", [
    ({"quant_method": "gptq", "bits": 4, "group_size": 128}, "needs the package gptqmodel and optimum: "
                                                             "`pip install gptqmodel optimum`"),
    ({"quant_method": "awq", "bits": 4, "version": "gemm"}, "needs the package gptqmodel: `pip install gptqmodel`"),
    ({"quant_method": "bitsandbytes", "load_in_8bit": True}, "not 8-bit ones"),
    ({"quant_method": "fp8"}, "bitsandbytes 4-bit, GPTQ and AWQ checkpoints only"),
])
def test_quantized_checkpoints_qflash_cannot_load_are_refused_in_one_line(quant, says, tmp_path, capsys):
    import importlib.util

    if quant["quant_method"] in ("gptq", "awq") and importlib.util.find_spec("gptqmodel") is not None:
        pytest.skip("gptqmodel is installed here")
    model_dir = _fake_checkpoint(tmp_path / "m", quant)
    with pytest.raises(ModelError) as e:
        _load(model_dir)
    assert says in str(e.value) and "\n" not in str(e.value)
    assert str(e.value).startswith(f"model.path: {model_dir} is quantized already")
    # The same line from the command line (exit 2, nothing else on stderr).
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text('{"prompt": "hi"}\n', encoding="utf-8")
    assert main(["generate", str(model_dir), "--input", str(prompts), "--output", str(tmp_path / "answers.jsonl"),
                 "--device", "cpu"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and says in err[0], err


def test_gptq_base_trains_unfused_on_named_linears(tiny_models):
    """The GPTQ/AWQ path as far as the CPU goes (gptqmodel's layers cannot run here): lora.fused switches off with
    its reason, and `all-linear` names the model's linear layers (PEFT's own all-linear matches nn.Linear only)."""
    from qflash.config import load_config
    from qflash.model.lora import peft_lora_config
    from qflash.train import levers

    model = _load(tiny_models["qwen2"], quant_mode="none")
    model.config.quantization_config = {"quant_method": "gptq", "bits": 4}  # as transformers leaves a GPTQ model
    cfg = load_config(None, [f"model.path={tiny_models['qwen2']}", "train.device=cpu"])
    lv = levers.resolve(cfg, CPU, torch.float32, model)
    assert not lv.fused_lora.on and "GPTQ checkpoint" in lv.fused_lora.why and "PEFT's GPTQ LoRA layer" in lv.fused_lora.why
    assert not lv.fused_norm.on and not lv.lean_recompute.on
    assert sorted(peft_lora_config(cfg.lora, model).target_modules) == [
        "down_proj", "gate_proj", "k_proj", "o_proj", "q_proj", "up_proj", "v_proj"]
    # A bitsandbytes 4-bit base keeps the fused layer, however it was quantized.
    model.config.quantization_config = {"quant_method": "bitsandbytes", "load_in_4bit": True}
    assert levers.resolve(cfg, CPU, torch.float32, model).fused_lora.on


@pytest.fixture(scope="module")
def prequant_run(quantized, identity_subset, tmp_path_factory):
    from qflash.train.loop import build_setup, run_training

    out = tmp_path_factory.mktemp("run") / "prequant"
    cfg = tiny_config(quantized["nf4"], identity_subset, out, "train.max_steps=3")
    setup = build_setup(cfg, quiet=True)
    before = _packed(setup.model)
    assert setup.levers.fused_lora.on, setup.levers.table()
    run_training(setup, quiet=True)
    after = _packed(setup.model)
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)
    return out


def test_merge_of_a_run_on_a_quantized_base_needs_the_16bit_base(prequant_run, quantized, tiny_models, tmp_path,
                                                                  capsys):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from qflash.export.merge import MergeOptions, merge

    out = tmp_path / "merged"
    assert main(["merge", str(prequant_run), "--output", str(out), "--no-check"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and f"the run trained on {quantized['nf4']}, which is quantized (bitsandbytes nf4, double " \
        "quant)" in err[0] and "pass --base with the unquantized model" in err[0], err
    assert not out.exists()
    assert main(["merge", str(prequant_run), "--output", str(out), "--base", str(quantized["nf4"]), "--no-check"]) == 2
    assert "--base: " in capsys.readouterr().err

    result = merge(MergeOptions(str(prequant_run), str(out), dtype="fp32", base=str(tiny_models["qwen2"]),
                                check_samples=1))
    assert stored_quantization(out) is None
    names = [c["reference"] for c in result.fidelity["comparisons"]]
    assert names == ["base fp32 + adapter", "4-bit base as stored + adapter (as trained)"]
    assert result.fidelity["comparisons"][0]["max_abs_diff"] <= 1e-4
    ids = torch.tensor([[1, 42, 7, 99, 1000, 5]])
    merged = AutoModelForCausalLM.from_pretrained(str(out)).eval()
    ref = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(str(tiny_models["qwen2"]), dtype=torch.float32),
                                    str(prequant_run / "adapter")).eval()
    with torch.no_grad():
        got, want = merged(input_ids=ids).logits, ref(input_ids=ids).logits
        with ref.disable_adapter():
            base = ref(input_ids=ids).logits
    assert (got - want).abs().max().item() <= 1e-4
    assert (want - base).abs().max().item() > 1e-3, "the adapter changes the logits"


def test_seed_002_new_tokens_on_a_quantized_base_merge_into_the_16bit_one(quantized, tiny_models, identity_subset,
                                                                          tmp_path):
    """The issue's case end to end: a 4-bit checkpoint as the base, new tokens with trained embedding and lm_head,
    merged into the 16-bit model it was made from; the merged model is plain PEFT's base + adapter."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from qflash.export.merge import MergeOptions, merge
    from qflash.train.loop import build_setup, run_training

    run = tmp_path / "run"
    cfg = tiny_config(quantized["nf4"], identity_subset, run, "train.max_steps=2", "model.add_tokens=['<|tool|>']",
                      "lora.modules_to_save=[embed_tokens, lm_head]")
    run_training(build_setup(cfg, quiet=True), quiet=True)
    out = tmp_path / "merged"
    result = merge(MergeOptions(str(run), str(out), dtype="fp32", base=str(tiny_models["qwen2"]), check_samples=1))
    assert result.fidelity["comparisons"][0]["max_abs_diff"] <= 1e-4
    tok = AutoTokenizer.from_pretrained(str(out))
    ids = tok("hello <|tool|> world", add_special_tokens=False, return_tensors="pt")["input_ids"]
    assert len(tok) - 1 in ids[0].tolist()
    base = AutoModelForCausalLM.from_pretrained(str(tiny_models["qwen2"]), dtype=torch.float32)
    base.resize_token_embeddings(len(tok))
    ref = PeftModel.from_pretrained(base, str(run / "adapter")).eval()
    merged = AutoModelForCausalLM.from_pretrained(str(out)).eval()
    with torch.no_grad():
        assert (merged(input_ids=ids).logits - ref(input_ids=ids).logits).abs().max().item() <= 1e-4


def test_merge_of_a_run_on_a_gptq_base(prequant_run, tiny_models, tmp_path, capsys):
    """A run whose model.path is a GPTQ checkpoint (its adapter borrowed from the 4-bit run: same module names):
    merge asks for --base before anything needs gptqmodel, and with it merges, saying the as-trained comparison
    cannot run on the CPU."""
    import shutil

    import yaml

    from qflash.export.merge import MergeOptions, merge

    gptq = _fake_checkpoint(tmp_path / "gptq", {"quant_method": "gptq", "bits": 4, "group_size": 128})
    adapter = tmp_path / "run" / "adapter"
    shutil.copytree(prequant_run / "adapter", adapter)
    saved = yaml.safe_load((adapter / "qflash_config.yaml").read_text(encoding="utf-8"))
    saved["model"]["path"] = str(gptq)
    (adapter / "qflash_config.yaml").write_text(yaml.safe_dump(saved), encoding="utf-8")

    out = tmp_path / "merged"
    assert main(["merge", str(adapter.parent), "--output", str(out)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and f"the run trained on {gptq}, which is quantized (gptq 4-bit)" in err[0] \
        and "pass --base with the unquantized model" in err[0], err
    result = merge(MergeOptions(str(adapter.parent), str(out), dtype="fp32", base=str(tiny_models["qwen2"]),
                                check_samples=1))
    assert [c["reference"] for c in result.fidelity["comparisons"]] == ["base fp32 + adapter"]
    assert result.fidelity["comparisons"][0]["max_abs_diff"] <= 1e-4
    assert any(f"{gptq} is gptq 4-bit, which qflash does not run on the CPU" in n for n in result.fidelity["notes"])
