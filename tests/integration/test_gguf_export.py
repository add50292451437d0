"""`qflash export --format gguf` on the CPU: tiny random Qwen2 and Llama models (the real SmolLM2 tokenizer) and a
trained tiny run, read back by transformers' own GGUF loader (no qflash code on the reading side)."""

from __future__ import annotations

import json

import pytest
import torch

from conftest import ARCHES, tiny_config
from qflash.errors import ConfigError, ModelError
from qflash.export.gguf import read_back
from qflash.export.gguf_export import ExportOptions, export


GGUF_ARCH = {"mistral": "llama"}
"""llama.cpp writes Mistral as its llama architecture."""


def _logits(model, ids):
    with torch.no_grad():
        return model(torch.tensor([ids])).logits.float()[0]


@pytest.mark.parametrize("arch", [a for a in ARCHES if a != "gemma3"])  # Gemma 3: refused (test_bad_inputs...)
def test_tiny_models_read_back_at_f16_rounding(arch, tiny_models, tmp_path):
    """f16: the logits of the fp32 model with its matrices rounded to f16, up to fp32 arithmetic (q/k permuted for
    Llama and Mistral and back by transformers; Qwen2's biases kept; Qwen3's q/k norms and its head_dim of 128 on
    hidden 64); q8_0: close in distribution. The tokenizer read back from the GGUF tokenizes the same."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    src = tiny_models[arch]
    ref = AutoModelForCausalLM.from_pretrained(str(src), dtype=torch.float32).eval()
    tok = AutoTokenizer.from_pretrained(str(src))
    text = "<|im_start|>user\nWhat is your name? 你叫什么名字？<|im_end|>\n<|im_start|>assistant\n"
    ids = tok(text)["input_ids"]
    want = _logits(ref, ids)
    with torch.no_grad():  # the same model with its matrices rounded to f16 (vectors stay f32, as in the GGUF)
        for p in ref.parameters():
            if p.dim() > 1:
                p.copy_(p.half().float())
    want16 = _logits(ref, ids)
    assert float((want16 - want).abs().max()) > 0
    # q8_0's blocks do not depend on the architecture: checked on Qwen2 and Llama (each takes seconds here)
    dtypes = ("f16", "q8_0") if arch in ("qwen2", "llama") else ("f16",)
    for dtype, bound in (("f16", 1e-5), ("q8_0", None))[: len(dtypes)]:
        out = tmp_path / f"{arch}-{dtype}.gguf"
        report = export(ExportOptions(str(src), dtype=dtype, output=str(out), check=False))
        assert out.is_file() and report["arch"] == GGUF_ARCH.get(arch, arch) and report["tensors"] > 0
        if arch in ("qwen2", "llama"):
            model, gtok = read_back(out)
            assert gtok(text)["input_ids"] == ids
        else:  # the same tokenizer as Qwen2's and Llama's: only the model is read back (each read parses the file)
            model = AutoModelForCausalLM.from_pretrained(str(out.parent), gguf_file=out.name, dtype=torch.float32,
                                                         use_kernels=False).eval()
        if arch == "qwen3":  # llama.cpp reads the head width from the file (transformers assumes Qwen3's 128)
            from gguf import GGUFReader

            reader = GGUFReader(str(out))
            assert int(reader.fields["qwen3.attention.key_length"].parts[-1][0]) == 128
            assert {"blk.1.attn_q_norm.weight", "blk.1.attn_k_norm.weight"} <= {t.name for t in reader.tensors}
        got = _logits(model, ids)
        diff = float((got - want).abs().max())
        if bound is not None:  # exactly the f16-rounded model, up to fp32 arithmetic
            assert float((got - want16).abs().max()) <= bound * float(want.abs().max()), (dtype, diff)
        else:
            kl = float((want.log_softmax(-1).exp() * (want.log_softmax(-1) - got.log_softmax(-1))).sum(-1).mean())
            assert kl < 1e-2 and diff > 0, (kl, diff)
    for dtype in dtypes:  # the SmolLM2 tokenizer's template is ChatML, with a default system prompt
        modelfile = (tmp_path / f"{arch}-{dtype}.Modelfile").read_text(encoding="utf-8")
        assert modelfile.startswith(f"FROM ./{arch}-{dtype}.gguf") and 'PARAMETER stop "<|im_end|>"' in modelfile
        assert 'SYSTEM """You are a helpful AI assistant named SmolLM' in modelfile, modelfile


def test_a_trained_run_exports_merged_with_its_fidelity(tiny_models, identity_subset, tmp_path):
    """A run: merged (streamed), converted, read back and compared with the merged model on held-out samples;
    the report beside the file; the GGUF carries the trained chat template and end-of-turn token."""
    from gguf import GGUFReader

    from qflash.train.loop import build_setup, run_training

    cfg = tiny_config(tiny_models["qwen2"], identity_subset, tmp_path / "run", "train.max_steps=3",
                      "data.eval_ratio=0.25")
    run_training(build_setup(cfg), quiet=True)
    out = tmp_path / "out" / "run.gguf"
    report = export(ExportOptions(str(tmp_path / "run"), dtype="f16", output=str(out)))
    saved = json.loads(out.with_name("run.gguf.fidelity.json").read_text(encoding="utf-8"))
    f = saved["fidelity"]
    assert f["tokens"] > 0 and f["mean_kl"] < 1e-4 and f["top1_agreement"] > 0.99, f
    assert report["fidelity"]["mean_kl"] == f["mean_kl"]
    fields = GGUFReader(str(out)).fields
    template = bytes(fields["tokenizer.chat_template"].parts[-1]).decode()
    assert "<|im_start|>" in template
    eot = int(fields["tokenizer.ggml.eot_token_id"].parts[-1][0])
    tokens = fields["tokenizer.ggml.tokens"]
    assert bytes(tokens.parts[tokens.data[eot]]).decode() == "<|im_end|>"
    assert not list(out.parent.glob(".*"))  # nothing temporary left beside it


def test_a_run_with_added_tokens_exports_them_as_control_tokens(tiny_models, tmp_path):
    """model.add_tokens + trained embedding/lm_head rows: the GGUF holds the grown vocabulary, the new tokens at
    their ids typed as control tokens (as llama.cpp's converter types added special tokens), and reads back with
    the merged model's logits."""
    from gguf import GGUFReader

    from qflash.train.loop import build_setup, run_training

    new = ["<|tool_call|>", "<|observation|>"]
    data = tmp_path / "tools.jsonl"
    data.write_text("".join(json.dumps({"messages": [
        {"role": "user", "content": f"Look up item {i}."},
        {"role": "assistant", "content": f"{new[0]} search({i}) {new[1]} found item {i}."}]}) + "\n"
        for i in range(8)), encoding="utf-8")
    cfg = tiny_config(tiny_models["qwen2"], data, tmp_path / "run", "train.max_steps=2", "data.eval_ratio=0.25",
                      f"model.add_tokens={json.dumps(new)}", "lora.modules_to_save=[embed_tokens, lm_head]")
    setup = build_setup(cfg, quiet=True)
    run_training(setup, quiet=True)
    ids = setup.tokenizer.convert_tokens_to_ids(new)
    out = tmp_path / "run.gguf"
    report = export(ExportOptions(str(tmp_path / "run"), dtype="f16", output=str(out)))
    assert report["fidelity"]["mean_kl"] < 1e-4 and report["fidelity"]["top1_agreement"] > 0.99, report["fidelity"]
    fields = GGUFReader(str(out)).fields
    tokens, types = fields["tokenizer.ggml.tokens"], fields["tokenizer.ggml.token_type"]
    assert len(tokens.data) == len(setup.tokenizer)
    for token, i in zip(new, ids):
        assert bytes(tokens.parts[tokens.data[i]]).decode() == token
        assert int(types.parts[types.data[i]][0]) == 3  # gguf TokenType.CONTROL


def test_bad_inputs_leave_nothing_behind(tiny_models, tmp_path):
    from transformers import AutoModelForCausalLM, GPT2Config

    gpt2 = tmp_path / "gpt2"
    AutoModelForCausalLM.from_config(GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=64)).save_pretrained(gpt2)
    out = tmp_path / "out" / "x.gguf"
    with pytest.raises(ModelError, match="supported: LlamaForCausalLM, MistralForCausalLM, Qwen2ForCausalLM, Qwen3"):
        export(ExportOptions(str(gpt2), dtype="f16", output=str(out), check=False))
    assert not out.exists() and not list(out.parent.glob(".*"))
    with pytest.raises(ModelError, match=r"Gemma 3 .* not written .*; merge the run .* convert_hf_to_gguf.py$"):
        export(ExportOptions(str(tiny_models["gemma3"]), dtype="f16", output=str(out), check=False))
    assert not out.exists() and not list(out.parent.glob(".*"))
    out.write_bytes(b"keep")
    with pytest.raises(ConfigError, match="exists; pass --overwrite"):
        export(ExportOptions(str(tiny_models["llama"]), dtype="f16", output=str(out), check=False))
    assert out.read_bytes() == b"keep"
    with pytest.raises(ConfigError, match="--dtype q4_k"):
        export(ExportOptions(str(tiny_models["llama"]), dtype="q4_k", output=str(out), check=False))
    run = tmp_path / "orphan"
    (run / "adapter").mkdir(parents=True)
    (run / "adapter" / "adapter_config.json").write_text("{}", encoding="utf-8")
    with pytest.raises(ConfigError, match="base model is unknown"):
        export(ExportOptions(str(run), dtype="f16", output=str(tmp_path / "o.gguf"), check=False))
    assert not (tmp_path / "o.gguf").exists()


def test_a_full_disk_is_one_error_and_leaves_nothing(tiny_models, tmp_path, monkeypatch):
    """The writer failing half way (ENOSPC from the file system) is one clear error; no partial file remains."""
    import errno

    import gguf

    calls = []
    real = gguf.GGUFWriter.write_tensor_data

    def full(self, *a, **k):
        calls.append(1)
        if len(calls) > 3:
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(self, *a, **k)

    monkeypatch.setattr(gguf.GGUFWriter, "write_tensor_data", full)
    out = tmp_path / "out" / "full.gguf"
    with pytest.raises(ModelError, match="No space left on device"):
        export(ExportOptions(str(tiny_models["qwen2"]), dtype="f16", output=str(out), check=False))
    assert not out.exists() and list(out.parent.iterdir()) == []


def test_what_the_gguf_cannot_carry_or_the_check_cannot_read_is_said():
    """A Qwen3 head width other than 128 cannot be read back by transformers (its qwen3 table has no key_length):
    the check refuses, naming --no-check; a Mistral sliding window shorter than the context is said once."""
    from qflash.export.gguf import not_read_back, window_note

    qwen3 = {"architectures": ["Qwen3ForCausalLM"], "model_type": "qwen3"}
    assert not_read_back({**qwen3, "head_dim": 128}) is None and not_read_back(qwen3) is None
    assert "head_dim 128 only (this model has 64)" in not_read_back({**qwen3, "head_dim": 64})
    assert not_read_back({"architectures": ["MistralForCausalLM"], "head_dim": 64}) is None
    mistral = {"architectures": ["MistralForCausalLM"], "model_type": "mistral", "max_position_embeddings": 32768}
    assert "4096-token sliding window" in window_note({**mistral, "sliding_window": 4096})
    assert window_note({**mistral, "sliding_window": None}) is None
    assert window_note({**mistral, "sliding_window": 32768}) is None  # as wide as the context: no difference


def test_a_sentencepiece_style_tokenizer_is_refused(tiny_models, tmp_path):
    """Mistral 7B's tokenizer.json is BPE too, but SentencePiece-style (byte fallback, Metaspace): written as
    byte-level BPE, llama.cpp would split text wrongly and the logit check would not notice (it feeds both models
    the same ids). Refused, naming llama.cpp's converter."""
    import shutil

    src = tmp_path / "spm-mistral"
    shutil.copytree(tiny_models["mistral"], src)
    tok = json.loads((src / "tokenizer.json").read_text(encoding="utf-8"))
    tok["model"]["byte_fallback"] = True
    tok["pre_tokenizer"] = {"type": "Metaspace", "replacement": "\u2581", "prepend_scheme": "first", "split": False}
    (src / "tokenizer.json").write_text(json.dumps(tok), encoding="utf-8")
    out = tmp_path / "out" / "spm.gguf"
    with pytest.raises(ModelError, match="SentencePiece-style BPE .* convert_hf_to_gguf.py"):
        export(ExportOptions(str(src), dtype="f16", output=str(out), check=False))
    assert not out.exists() and not list(out.parent.glob(".*"))
