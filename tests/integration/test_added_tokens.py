"""model.add_tokens + lora.modules_to_save: new special tokens whose embedding and lm_head rows train (PEFT's
modules_to_save), saved so that plain transformers + PEFT loads them with qflash's logits, and merged."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from conftest import make_tiny_model, tiny_config
from qflash.config import load_config
from qflash.errors import ConfigError, ModelError

NEW = ["<|tool_call|>", "<|observation|>"]
MODULES = "lora.modules_to_save=[embed_tokens, lm_head]"


@pytest.fixture(scope="module")
def tool_data(tmp_path_factory) -> Path:
    """Conversations whose answers use the new tokens (so their rows get gradients)."""
    records = [{"messages": [{"role": "user", "content": f"Look up item {i}."},
                             {"role": "assistant", "content": f"{NEW[0]} search({i}) {NEW[1]} found item {i}."}]}
               for i in range(16)]
    path = tmp_path_factory.mktemp("data") / "tools.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def untied_llama(tmp_path_factory, smol_tokenizer) -> Path:
    """A tiny Llama whose lm_head is its own table (as Qwen-1's wte / lm_head are)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    src = make_tiny_model(tmp_path_factory.mktemp("tied") / "llama", "llama", smol_tokenizer)
    config = AutoConfig.from_pretrained(str(src))
    config.tie_word_embeddings = False
    torch.manual_seed(1)
    out = src.parent.parent / "untied"
    AutoModelForCausalLM.from_config(config, dtype=torch.float32).save_pretrained(str(out))
    smol_tokenizer.save_pretrained(str(out))
    return out


def _train(model_dir: Path, data: Path, out: Path, *extra: str):
    from qflash.train.loop import build_setup, run_training

    cfg = tiny_config(model_dir, data, out, "train.max_steps=4", f"model.add_tokens={json.dumps(NEW)}", MODULES,
                      *extra)
    setup = build_setup(cfg, quiet=True)
    initial = {n: p.detach().clone() for n, p in setup.model.named_parameters() if "modules_to_save" in n}
    run_training(setup, quiet=True)
    return setup, initial


@pytest.fixture(scope="module", params=["tied-qwen2", "untied-llama"])
def run(request, tiny_models, untied_llama, tool_data, tmp_path_factory):
    model_dir = tiny_models["qwen2"] if request.param == "tied-qwen2" else untied_llama
    out = tmp_path_factory.mktemp("run") / request.param
    setup, initial = _train(model_dir, tool_data, out)
    return {"dir": out, "base": model_dir, "setup": setup, "initial": initial, "tied": request.param == "tied-qwen2"}


def _ids(tok) -> torch.Tensor:
    text = f"Look up item 3. {NEW[0]} search(3) {NEW[1]} found"
    return tok(text, add_special_tokens=False, return_tensors="pt")["input_ids"]


def test_new_rows_train_and_the_tokenizer_travels_with_the_adapter(run):
    from transformers import AutoTokenizer

    setup = run["setup"]
    tok = setup.tokenizer
    new_ids = tok.convert_tokens_to_ids(NEW)
    rows = len(tok)
    assert new_ids == [rows - 2, rows - 1] and all(i in _ids(tok)[0].tolist() for i in new_ids), "one id each"
    lm = setup.model.get_base_model()
    assert lm.get_input_embeddings().original_module.weight.shape[0] == rows  # grown from len(base tokenizer)
    assert not lm.get_input_embeddings().original_module.weight.requires_grad  # the base's own copy stays frozen
    # NF4 holds the projections only: both tables (and the trained copies) are plain floating-point tensors.
    for table in (lm.get_input_embeddings(), lm.get_output_embeddings()):
        for w in (table.original_module.weight, table.modules_to_save["default"].weight):
            assert w.is_floating_point() and not hasattr(w, "quant_state") and w.shape == (rows, 64)
    assert sum(type(m).__name__ == "Linear4bit" for m in lm.modules()) == 14  # 7 projections x 2 layers
    trained = {n: p for n, p in setup.model.named_parameters() if "modules_to_save" in n}
    assert trained and all(p.requires_grad and p.dtype == torch.float32 for p in trained.values())
    # tied: one table trained, shared by lm_head (ensure_weight_tying); untied: two.
    assert len({p.data_ptr() for p in trained.values()}) == (1 if run["tied"] else 2)
    for name, p in trained.items():
        moved = (p.detach() - run["initial"][name]).abs().amax(dim=1)
        assert moved[new_ids].min() > 0, f"{name}: the new rows trained"
    saved = AutoTokenizer.from_pretrained(str(run["dir"] / "adapter"))
    assert saved.convert_tokens_to_ids(NEW) == new_ids and len(saved) == rows
    assert not setup.levers.fused_ce.on and "lm_head" in setup.levers.fused_ce.why  # a trained lm_head: said why


@torch.no_grad()
def test_plain_transformers_and_peft_load_the_adapter_with_qflashs_logits(run):
    """The documented recipe: base (as qflash trained it: NF4, double quant), resized to the adapter's tokenizer,
    then PeftModel.from_pretrained. Same logits as qflash's own loading of the run."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer, BitsAndBytesConfig

    from qflash.infer.generate import load_for_inference

    loaded = load_for_inference(adapter=str(run["dir"]), device="cpu")
    ids = _ids(loaded.tokenizer)
    ours = loaded.model(input_ids=ids).logits.float()

    adapter = run["dir"] / "adapter"
    tok = AutoTokenizer.from_pretrained(str(adapter))
    bnb = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                             bnb_4bit_compute_dtype=torch.float32)
    base = AutoModelForCausalLM.from_pretrained(str(run["base"]), quantization_config=bnb, dtype=torch.float32,
                                                device_map={"": "cpu"}, use_kernels=False)
    for m in base.modules():  # bitsandbytes' CPU-only bf16 repack (its arithmetic, not its loading): fp32 as qflash
        if hasattr(m, "support_avx512bf16_for_cpu"):
            m.support_avx512bf16_for_cpu = False
    base.resize_token_embeddings(len(tok))
    plain = PeftModel.from_pretrained(base, str(adapter)).eval()
    theirs = plain(input_ids=_ids(tok)).logits.float()
    assert torch.equal(_ids(tok), ids)
    assert (ours - theirs).abs().max().item() <= 1e-5
    with plain.disable_adapter():
        untrained = plain(input_ids=ids).logits.float()
    assert (theirs - untrained)[..., -len(NEW):].abs().max().item() > 1e-2, "the new tokens' logits were trained"


def test_merge_writes_the_grown_vocabulary(run, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from qflash.export.merge import MergeOptions, merge

    out = tmp_path / "merged"
    result = merge(MergeOptions(str(run["dir"]), str(out), dtype="fp32", check_samples=1))
    tok = AutoTokenizer.from_pretrained(str(out))
    assert tok.convert_tokens_to_ids(NEW) == [len(tok) - 2, len(tok) - 1]
    assert json.loads((out / "config.json").read_text())["vocab_size"] == len(tok)
    comps = result.fidelity["comparisons"]  # the merge's own check: base + adapter, then NF4 (4-bit rounding apart)
    assert [c["reference"] for c in comps] == ["base fp32 + adapter", "NF4 base + adapter (as trained)"]
    assert comps[0]["max_abs_diff"] <= 1e-4
    merged = AutoModelForCausalLM.from_pretrained(str(out)).eval()
    assert merged.get_input_embeddings().weight.shape[0] == len(tok)
    base = AutoModelForCausalLM.from_pretrained(str(run["base"]), dtype=torch.float32)
    base.resize_token_embeddings(len(tok))
    ref = PeftModel.from_pretrained(base, str(run["dir"] / "adapter")).eval()
    ids = _ids(tok)
    with torch.no_grad():
        got, want = merged(input_ids=ids).logits, ref(input_ids=ids).logits
    assert (got - want).abs().max().item() <= 1e-4


def test_add_tokens_without_trained_rows_is_refused_at_its_line(tmp_path):
    cfg_file = tmp_path / "c.yaml"
    cfg_file.write_text("model:\n  add_tokens: ['<|x|>']\n", encoding="utf-8")
    with pytest.raises(ConfigError) as e:
        load_config(cfg_file)
    assert str(e.value) == (f"{cfg_file}:2: model.add_tokens needs trained rows for the new tokens: set "
                            "lora.modules_to_save to the input embedding and lm_head, e.g. [embed_tokens, lm_head]")
    load_config(cfg_file, [MODULES])  # fine with them


def test_modules_to_save_that_miss_the_model_are_refused(untied_llama, tool_data, tmp_path):
    """Qwen-1's names on a Llama: named, with the model's own names; and an untied lm_head left untrained."""
    from qflash.train.loop import build_setup

    cfg = tiny_config(untied_llama, tool_data, tmp_path / "a", "lora.modules_to_save=[wte, lm_head]")
    with pytest.raises(ModelError) as e:
        build_setup(cfg, quiet=True)
    assert str(e.value) == ("lora.modules_to_save: 'wte' names no module of this model; its input embedding is "
                            "'embed_tokens' and its output layer 'lm_head'")
    cfg = tiny_config(untied_llama, tool_data, tmp_path / "b", f"model.add_tokens={json.dumps(NEW)}",
                      "lora.modules_to_save=[embed_tokens]")
    with pytest.raises(ConfigError) as e:
        build_setup(cfg, quiet=True)
    assert str(e.value) == ("model.add_tokens: the new tokens' rows would not be trained nor saved: add lm_head to "
                            "lora.modules_to_save (the input embedding and the output layer)")


def test_trained_copies_are_fp32_master_weights_over_a_16bit_base(tiny_models):
    """On a GPU the base's tables are bf16; the trained copies of lora.modules_to_save are fp32 (as LoRA's are)."""
    from qflash.config import LoraConfig
    from qflash.model.loading import load_base_model
    from qflash.model.lora import add_lora

    model = load_base_model(tiny_models["qwen2"], quant_mode="none", double_quant=False, dtype=torch.bfloat16,
                            device=torch.device("cpu"), attention="sdpa", residual_dtype="compute")
    peft_model = add_lora(model, LoraConfig(modules_to_save=["embed_tokens", "lm_head"]), seed=0)
    trained = {n: p for n, p in peft_model.named_parameters() if p.requires_grad and "modules_to_save" in n}
    assert trained and {p.dtype for p in trained.values()} == {torch.float32}
    assert peft_model.get_base_model().get_input_embeddings().original_module.weight.dtype == torch.bfloat16


def test_interrupted_run_resumes_to_the_same_adapter(tiny_models, tool_data, tmp_path):
    """The trained tables (one parameter under two names when tied) are checkpointed and restored like LoRA's."""
    from qflash.train.loop import build_setup, run_training

    extra = ("train.max_steps=4", "train.save_every=2", f"model.add_tokens={json.dumps(NEW)}", MODULES)
    ref = tmp_path / "ref"
    run_training(build_setup(tiny_config(tiny_models["qwen2"], tool_data, ref, *extra), quiet=True), quiet=True)

    class Stop(Exception):
        pass

    def stop_at_3(step, values):
        if step == 3:
            raise Stop

    run = tmp_path / "run"
    with pytest.raises(Stop):
        run_training(build_setup(tiny_config(tiny_models["qwen2"], tool_data, run, *extra), quiet=True), quiet=True,
                     on_step=stop_at_3)
    run_training(build_setup(tiny_config(tiny_models["qwen2"], tool_data, run, *extra), quiet=True), quiet=True)
    assert (run / "adapter" / "adapter_model.safetensors").read_bytes() == (
        ref / "adapter" / "adapter_model.safetensors").read_bytes()


def test_a_run_starting_from_the_adapter_takes_its_trained_tables(run, tool_data, tmp_path):
    """model.adapter: the trained embedding / lm_head come along; other add_tokens than the adapter's are refused."""
    from safetensors.torch import load_file

    from qflash.train.loop import build_setup

    extra = (f"model.adapter={run['dir']}", MODULES)
    with pytest.raises(ConfigError) as e:
        build_setup(tiny_config(run["base"], tool_data, tmp_path / "a", *extra), quiet=True)
    assert "was trained with model.add_tokens=" in str(e.value) and "set the same tokens" in str(e.value)
    setup = build_setup(tiny_config(run["base"], tool_data, tmp_path / "b", *extra,
                                    f"model.add_tokens={json.dumps(NEW)}"), quiet=True)
    saved = load_file(str(run["dir"] / "adapter" / "adapter_model.safetensors"))
    lm = setup.model.get_base_model()
    assert torch.equal(lm.get_input_embeddings().modules_to_save["default"].weight.detach(),
                       saved["base_model.model.model.embed_tokens.weight"])
    assert torch.equal(lm.get_output_embeddings().modules_to_save["default"].weight.detach(),
                       saved["base_model.model.lm_head.weight"])
