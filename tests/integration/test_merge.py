"""qflash merge: LoRA folded into the 16-bit base shard by shard; parity with PEFT, plain loading, memory."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from conftest import ARCHES, REPO, tiny_config
from qflash.cli import main
from qflash.export.merge import MergeOptions, merge

CONVERSATION = [
    {"role": "user", "content": "Who are you? 你是谁？"},
    {"role": "assistant", "content": "I am Zyxo, made by Quillfeather."},
]


def _ids(model_dir: Path) -> torch.Tensor:
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(model_dir))
    text = tok.apply_chat_template(CONVERSATION, tokenize=False)
    return tok(text, add_special_tokens=False, return_tensors="pt")["input_ids"]


@torch.no_grad()
def _logits(model, ids: torch.Tensor) -> torch.Tensor:
    return model.eval()(input_ids=ids).logits.float()


def _plain(model_dir: Path, dtype=None):
    """A model loaded the way any transformers user would."""
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(str(model_dir), **({"dtype": dtype} if dtype else {}))


def _peft_reference(base_dir: Path, adapter_dir: Path):
    """fp32 base + the unmerged adapter, through plain PEFT: what the merge must reproduce."""
    from peft import PeftModel

    return PeftModel.from_pretrained(_plain(base_dir, torch.float32), str(adapter_dir)).eval()


_DT = {"F32": torch.float32, "BF16": torch.bfloat16, "F16": torch.float16}


def _shard_tensors(path: Path) -> dict[str, int]:
    """tensor name -> bytes, from one safetensors header."""
    with safe_open(str(path), framework="pt") as f:
        return {k: math.prod(f.get_slice(k).get_shape()) * _DT[f.get_slice(k).get_dtype()].itemsize for k in f.keys()}


@pytest.fixture(scope="module")
def runs(tiny_models, identity_subset, tmp_path_factory):
    """Tiny qflash runs (NF4 + LoRA, 3 steps), trained once per architecture on first use."""
    from qflash.train.loop import build_setup, run_training

    done: dict[str, Path] = {}

    def get(arch: str) -> Path:
        if arch not in done:
            out = tmp_path_factory.mktemp("run") / arch
            cfg = tiny_config(tiny_models[arch], identity_subset, out, "train.max_steps=3")
            done[arch] = run_training(build_setup(cfg), quiet=True).output_dir
        return done[arch]

    return get


# ---------------------------------------------------------------------------------------------
# Parity: a trained run merged in fp32 gives the logits of base + adapter


@pytest.mark.parametrize("arch", ARCHES)
def test_merged_fp32_matches_base_plus_adapter_and_loads_plainly(arch, runs, tiny_models, tmp_path):
    run = runs(arch)
    out = tmp_path / "merged"
    result = merge(MergeOptions(str(run), str(out), dtype="fp32", max_shard_size="200KB", check=False))

    # Sharded: an index, every tensor of the base exactly once, no file above the limit unless it
    # holds one tensor that alone is larger (the embedding here).
    index = json.loads((out / "model.safetensors.index.json").read_text())
    files = sorted(set(index["weight_map"].values()))
    assert len(files) >= 3 and files == sorted(result.files)
    seen: list[str] = []
    for f in files:
        sizes = _shard_tensors(out / f)
        assert all(index["weight_map"][k] == f for k in sizes)
        assert sum(sizes.values()) <= 200_000 or len(sizes) == 1, (f, sizes)
        seen += sizes
    base_keys = _shard_tensors(tiny_models[arch] / "model.safetensors")
    assert sorted(seen) == sorted(index["weight_map"]) == sorted(base_keys)
    assert index["metadata"]["total_size"] == sum(base_keys.values())  # fp32 in, fp32 out
    assert result.lora_modules == 14 and result.untied == []

    merged = _plain(out)  # no dtype given: config.json says float32
    assert merged.dtype == torch.float32
    assert not any("lora" in n for n, _ in merged.named_parameters())
    ref = _peft_reference(tiny_models[arch], run / "adapter")
    ids = _ids(out)
    got, want = _logits(merged, ids), _logits(ref, ids)
    assert (got - want).abs().max().item() <= 1e-4
    with ref.disable_adapter():
        base_only = _logits(ref, ids)
    assert (want - base_only).abs().max().item() > 1e-2, "the adapter visibly changes the logits"

    # The tokenizer and its chat template come along.
    from transformers import AutoTokenizer

    tok, base_tok = AutoTokenizer.from_pretrained(str(out)), AutoTokenizer.from_pretrained(str(tiny_models[arch]))
    assert tok.chat_template == base_tok.chat_template and tok("Zyxo 你好")["input_ids"] == base_tok("Zyxo 你好")["input_ids"]


def test_cli_merge_reports_fidelity(runs, tmp_path, capsys):
    """The check's own numbers: fp32 output equals base+adapter; the NF4 base the run trained on differs."""
    run = runs("qwen2")
    out = tmp_path / "merged"
    assert main(["merge", str(run), "--output", str(out), "--dtype", "fp32", "--check-samples", "2"]) == 0
    err = capsys.readouterr().err
    assert "max |dlogit|" in err and "merged 14 LoRA modules into" in err and "fp32 on the CPU" in err

    record = json.loads((out / "qflash_merge.json").read_text())
    assert record["dtype"] == "fp32" and record["base"]["dir"] == str(Path(record["base"]["dir"]).resolve())
    assert record["adapter"]["r"] == 8 and len(record["adapter"]["sha256"]) == 64
    fid = record["fidelity"]
    assert fid["samples"] == 2 and fid["tokens"] > 20 and "training samples" in fid["sample_source"]
    exact, nf4 = fid["comparisons"]
    assert exact["reference"] == "base fp32 + adapter"
    assert exact["max_abs_diff"] <= 1e-4 and exact["mean_kl"] <= 1e-8 and exact["top1_agreement"] == 1.0
    assert nf4["reference"].startswith("NF4 base + adapter")
    assert nf4["max_abs_diff"] > 100 * exact["max_abs_diff"] and nf4["mean_kl"] > 0
    # A stop at the end-of-turn token the run trained on (SmolLM2's <|im_end|>, id 2).
    gen = json.loads((out / "generation_config.json").read_text())
    assert 2 in (gen["eos_token_id"] if isinstance(gen["eos_token_id"], list) else [gen["eos_token_id"]])
    assert not list(tmp_path.glob(".merged.merge-*")), "no temporary directory left behind"


def test_fidelity_check_skips_loudly_without_ram(runs, tmp_path, monkeypatch, capsys):
    import types

    import psutil

    monkeypatch.setattr(psutil, "virtual_memory", lambda: types.SimpleNamespace(available=10**8))
    out = tmp_path / "merged"
    result = merge(MergeOptions(str(runs("qwen2")), str(out), check_samples=1))
    assert result.fidelity["skipped"].startswith("needs about") and result.fidelity["comparisons"] == []
    assert "fidelity check skipped: needs about" in capsys.readouterr().err
    assert json.loads((out / "qflash_merge.json").read_text())["fidelity"]["skipped"] == result.fidelity["skipped"]


def test_bf16_output_is_the_fp32_merge_rounded_once(runs, tiny_models, tmp_path):
    run = runs("qwen2")
    out = tmp_path / "merged"
    merge(MergeOptions(str(run), str(out), dtype="bf16", check=False))
    assert json.loads((out / "config.json").read_text())["dtype"] == "bfloat16"
    name = "model.layers.1.self_attn.q_proj.weight"
    with safe_open(str(out / "model.safetensors"), framework="pt") as f:
        assert {f.get_slice(k).get_dtype() for k in f.keys()} == {"BF16"}
        got = f.get_tensor(name)
    with safe_open(str(tiny_models["qwen2"] / "model.safetensors"), framework="pt") as f:
        w = f.get_tensor(name)
    with safe_open(str(run / "adapter" / "adapter_model.safetensors"), framework="pt") as f:
        a = f.get_tensor("base_model.model." + name.replace(".weight", ".lora_A.weight"))
        b = f.get_tensor("base_model.model." + name.replace(".weight", ".lora_B.weight"))
    want = w.float() + (16 / 8) * b @ a  # lora.alpha / lora.r of tiny_config
    assert (want - w.float()).abs().max() > 1e-3
    # One rounding of the fp32 result: within half a bf16 step (2^-8 relative), plus fp32 matmul noise.
    torch.testing.assert_close(got.float(), want, rtol=2**-8, atol=1e-6)


# ---------------------------------------------------------------------------------------------
# LoRA variants, built with PEFT and randomized so every part of the update matters


VARIANTS = {
    "dora": dict(target_modules=["q_proj", "v_proj", "down_proj"], use_dora=True),
    "rslora_and_patterns": dict(target_modules=["q_proj", "k_proj", "down_proj"], use_rslora=True,
                                rank_pattern={"k_proj": 2}, alpha_pattern={"down_proj": 3.0}),
    "tied_lm_head_and_embedding": dict(target_modules=["embed_tokens", "lm_head", "o_proj"]),
    "modules_to_save_tied_lm_head": dict(target_modules=["up_proj"], modules_to_save=["lm_head"]),
    "lora_bias": dict(target_modules=["q_proj", "v_proj"], lora_bias=True),
}


def _random_adapter(base_dir: Path, out: Path, seed: int = 0, **lora_kwargs) -> Path:
    """A PEFT adapter whose every trainable tensor is random (B = 0 at init would make the merge trivial)."""
    from peft import LoraConfig, get_peft_model

    model = get_peft_model(_plain(base_dir, torch.float32), LoraConfig(r=4, lora_alpha=8, **lora_kwargs))
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if not p.requires_grad:
                continue
            noise = torch.randn(p.shape, generator=g)
            # DoRA magnitudes stay near the weight norms they start from; the rest is plain noise
            p.copy_(p * (1 + 0.2 * noise) if "magnitude" in name else 0.1 * noise)
    model.save_pretrained(str(out))
    return out


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_lora_variants_match_peft(variant, tiny_models, tmp_path):
    base = tiny_models["qwen2"]
    adapter = _random_adapter(base, tmp_path / "adapter", **VARIANTS[variant])
    out = tmp_path / "merged"
    result = merge(MergeOptions(str(adapter), str(out), dtype="fp32", base=str(base), check=False))

    ref = _peft_reference(base, adapter)
    ids = _ids(out)
    got, want = _logits(_plain(out), ids), _logits(ref, ids)
    assert (got - want).abs().max().item() <= 1e-4
    with ref.disable_adapter():
        assert (want - _logits(ref, ids)).abs().max().item() > 1e-2

    tied = variant.startswith(("tied", "modules_to_save"))
    assert result.untied == (["lm_head.weight"] if tied else [])
    assert json.loads((out / "config.json").read_text())["tie_word_embeddings"] is (not tied)
    if variant == "modules_to_save_tied_lm_head":
        assert result.replaced == ["lm_head.weight"]


def test_fan_in_fan_out_gpt2(smol_tokenizer, tmp_path):
    """GPT-2 stores its projections as Conv1D (in, out): the update is (B @ A).T."""
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    cfg = GPT2Config(vocab_size=len(smol_tokenizer), n_positions=128, n_embd=64, n_layer=2, n_head=4,
                     bos_token_id=smol_tokenizer.bos_token_id, eos_token_id=smol_tokenizer.eos_token_id)
    base = tmp_path / "gpt2"
    GPT2LMHeadModel(cfg).save_pretrained(str(base))
    smol_tokenizer.save_pretrained(str(base))
    adapter = _random_adapter(base, tmp_path / "adapter", target_modules=["c_attn", "c_proj", "c_fc"], fan_in_fan_out=True)
    out = tmp_path / "merged"
    merge(MergeOptions(str(adapter), str(out), dtype="fp32", base=str(base), check=False))
    ids = _ids(out)
    ref = _peft_reference(base, adapter)
    assert (_logits(_plain(out), ids) - _logits(ref, ids)).abs().max().item() <= 1e-4


# ---------------------------------------------------------------------------------------------
# Bad input: one line, exit 2, nothing written


def _merge_cli(capsys, *args: str) -> tuple[int, str]:
    code = main(["merge", *args])
    return code, capsys.readouterr().err


def test_adapter_without_run_config_needs_base(tiny_models, tmp_path, capsys):
    adapter = _random_adapter(tiny_models["qwen2"], tmp_path / "adapter", target_modules=["q_proj"])
    code, err = _merge_cli(capsys, str(adapter), "--output", str(tmp_path / "out"), "--no-check")
    assert code == 2
    assert err.startswith("qflash: error: merge: ") and "no qflash_config.yaml" in err and "--base" in err
    assert not (tmp_path / "out").exists()


def test_lora_module_matching_no_base_weight_is_refused(tiny_models, tmp_path, capsys):
    adapter = _random_adapter(tiny_models["qwen2"], tmp_path / "adapter", target_modules=["q_proj"])
    path = adapter / "adapter_model.safetensors"
    with safe_open(str(path), framework="pt") as f:
        tensors = {k.replace("layers.1.", "layers.7."): f.get_tensor(k) for k in f.keys()}
    save_file(tensors, str(path))  # as if trained on a deeper model
    code, err = _merge_cli(capsys, str(adapter), "--base", str(tiny_models["qwen2"]),
                           "--output", str(tmp_path / "out"), "--no-check")
    assert code == 2
    assert "LoRA module 'model.layers.7.self_attn.q_proj.weight' matches no tensor of the base model" in err
    assert "nearest: 'model.layers." in err and "pass --base with the model it was trained on" in err
    assert not (tmp_path / "out").exists() and not list(tmp_path.glob(".out.merge-*"))


def test_existing_output_needs_overwrite(tiny_models, tmp_path, capsys):
    adapter = _random_adapter(tiny_models["qwen2"], tmp_path / "adapter", target_modules=["q_proj"])
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    args = (str(adapter), "--base", str(tiny_models["qwen2"]), "--output", str(out), "--no-check")
    code, err = _merge_cli(capsys, *args)
    assert code == 2 and "exists and is not empty; pass --overwrite" in err
    assert (out / "keep.txt").read_text() == "mine"
    assert _merge_cli(capsys, *args, "--overwrite")[0] == 0
    assert not (out / "keep.txt").exists() and (out / "model.safetensors").is_file()


def test_fp16_overflow_fails_and_leaves_nothing(tiny_models, tmp_path, capsys):
    import shutil

    base = tmp_path / "base"
    shutil.copytree(tiny_models["qwen2"], base)
    with safe_open(str(base / "model.safetensors"), framework="pt") as f:
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    tensors["model.norm.weight"][0] = 1e5  # beyond fp16's 65504
    save_file(tensors, str(base / "model.safetensors"), metadata={"format": "pt"})
    adapter = _random_adapter(base, tmp_path / "adapter", target_modules=["q_proj"])
    code, err = _merge_cli(capsys, str(adapter), "--base", str(base), "--output", str(tmp_path / "out"),
                           "--dtype", "fp16", "--no-check")
    assert code == 2 and "model.norm.weight has inf/NaN (values beyond the fp16 range); use --dtype bf16" in err
    assert not (tmp_path / "out").exists() and not list(tmp_path.glob(".out.merge-*"))


def test_leftovers_of_a_killed_merge_are_removed_a_running_ones_kept(tiny_models, tmp_path, capsys):
    adapter = _random_adapter(tiny_models["qwen2"], tmp_path / "adapter", target_modules=["q_proj"])
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    killed, running = tmp_path / ".out.merge-tmp-killed", tmp_path / ".out.merge-tmp-running"
    for d, pid in ((killed, dead.pid), (running, os.getppid())):
        d.mkdir()
        (d / "model.safetensors").write_bytes(b"partial")
        (d / ".owner-pid").write_text(f"{pid}\n")
    code, _ = _merge_cli(capsys, str(adapter), "--base", str(tiny_models["qwen2"]), "--output",
                         str(tmp_path / "out"), "--no-check")
    assert code == 0
    assert not killed.exists() and running.is_dir()
    assert not (tmp_path / "out" / ".owner-pid").exists()
    assert list(tmp_path.glob(".out.merge-*")) == [running]


def test_output_inside_the_adapter_is_refused(tiny_models, tmp_path, capsys):
    adapter = _random_adapter(tiny_models["qwen2"], tmp_path / "adapter", target_modules=["q_proj"])
    code, err = _merge_cli(capsys, str(adapter), "--base", str(tiny_models["qwen2"]), "--output", str(adapter / "m"))
    assert code == 2 and "overlaps the adapter" in err


# ---------------------------------------------------------------------------------------------
# Memory: a ~1.5B-parameter model merges holding about one shard


QWEN2_1_5B = dict(hidden=1536, intermediate=8960, layers=28, heads=12, kv_heads=2, vocab=151936)
PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def _qwen2_shapes(s: dict) -> list[tuple[str, tuple[int, ...]]]:
    h, i, kv = s["hidden"], s["intermediate"], s["kv_heads"] * (s["hidden"] // s["heads"])
    shapes = [("model.embed_tokens.weight", (s["vocab"], h))]
    for n in range(s["layers"]):
        p = f"model.layers.{n}."
        shapes += [
            (p + "input_layernorm.weight", (h,)),
            (p + "self_attn.q_proj.weight", (h, h)), (p + "self_attn.q_proj.bias", (h,)),
            (p + "self_attn.k_proj.weight", (kv, h)), (p + "self_attn.k_proj.bias", (kv,)),
            (p + "self_attn.v_proj.weight", (kv, h)), (p + "self_attn.v_proj.bias", (kv,)),
            (p + "self_attn.o_proj.weight", (h, h)),
            (p + "post_attention_layernorm.weight", (h,)),
            (p + "mlp.gate_proj.weight", (i, h)), (p + "mlp.up_proj.weight", (i, h)), (p + "mlp.down_proj.weight", (h, i)),
        ]
    return shapes + [("model.norm.weight", (h,))]


def _write_random_qwen2(out: Path, tokenizer, shard_bytes: int) -> list[Path]:
    """A random bf16 Qwen2-1.5B-shaped checkpoint, written shard by shard: never more than one shard in RAM."""
    from transformers import Qwen2Config

    s = QWEN2_1_5B
    out.mkdir()
    Qwen2Config(vocab_size=s["vocab"], hidden_size=s["hidden"], intermediate_size=s["intermediate"],
                num_hidden_layers=s["layers"], num_attention_heads=s["heads"], num_key_value_heads=s["kv_heads"],
                tie_word_embeddings=True, dtype="bfloat16").save_pretrained(str(out))
    tokenizer.save_pretrained(str(out))
    groups: list[list[tuple[str, tuple[int, ...]]]] = [[]]
    size = 0
    for name, shape in _qwen2_shapes(s):
        nbytes = math.prod(shape) * 2
        if groups[-1] and size + nbytes > shard_bytes:
            groups.append([])
            size = 0
        groups[-1].append((name, shape))
        size += nbytes
    g = torch.Generator().manual_seed(0)
    files, weight_map = [], {}
    for k, group in enumerate(groups):
        name = f"model-{k + 1:05d}-of-{len(groups):05d}.safetensors"
        shard = {n: torch.empty(shape, dtype=torch.bfloat16).normal_(0, 0.02, generator=g) for n, shape in group}
        save_file(shard, str(out / name), metadata={"format": "pt"})
        del shard
        files.append(out / name)
        weight_map.update({n: name for n, _ in group})
    (out / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    return files


def _write_random_adapter(out: Path, r: int = 16) -> None:
    """A PEFT-format LoRA adapter on all 7 projections of every layer, random A and B."""
    from peft import LoraConfig

    s = QWEN2_1_5B
    kv = s["kv_heads"] * (s["hidden"] // s["heads"])
    dims = {"q_proj": (s["hidden"], s["hidden"]), "k_proj": (s["hidden"], kv), "v_proj": (s["hidden"], kv),
            "o_proj": (s["hidden"], s["hidden"]), "gate_proj": (s["hidden"], s["intermediate"]),
            "up_proj": (s["hidden"], s["intermediate"]), "down_proj": (s["intermediate"], s["hidden"])}
    g = torch.Generator().manual_seed(1)
    tensors = {}
    for n in range(s["layers"]):
        for proj, (fan_in, fan_out) in dims.items():
            block = "self_attn" if proj in PROJECTIONS[:4] else "mlp"
            key = f"base_model.model.model.layers.{n}.{block}.{proj}"
            tensors[f"{key}.lora_A.weight"] = torch.randn((r, fan_in), generator=g) * 0.01
            tensors[f"{key}.lora_B.weight"] = torch.randn((fan_out, r), generator=g) * 0.01
    out.mkdir()
    save_file(tensors, str(out / "adapter_model.safetensors"))
    LoraConfig(r=r, lora_alpha=2 * r, target_modules=list(PROJECTIONS)).save_pretrained(str(out))


@pytest.mark.slow
def test_1_5b_merge_peak_rss_stays_near_one_shard(smol_tokenizer, tmp_path):
    t0 = time.perf_counter()
    inputs = _write_random_qwen2(tmp_path / "base", smol_tokenizer, shard_bytes=10**9)
    _write_random_adapter(tmp_path / "adapter")
    n_params = sum(math.prod(shape) for _, shape in _qwen2_shapes(QWEN2_1_5B))
    assert 1.4e9 < n_params < 1.7e9
    written = time.perf_counter() - t0

    out = tmp_path / "merged"
    cmd = [sys.executable, "-m", "qflash.cli", "merge", str(tmp_path / "adapter"), "--base", str(tmp_path / "base"),
           "--output", str(out), "--no-check", "--max-shard-size", "1GB"]
    env = {**os.environ, "PYTHONPATH": str(REPO / "src")}
    t1 = time.perf_counter()
    with open(tmp_path / "merge.log", "wb") as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env)
        # wait4: the resource usage of this child alone (ru_maxrss in KiB on Linux)
        _, status, usage = os.wait4(proc.pid, 0)
        proc.returncode = os.waitstatus_to_exitcode(status)
    merged_s = time.perf_counter() - t1
    log_text = (tmp_path / "merge.log").read_text()
    assert proc.returncode == 0, log_text

    peak = usage.ru_maxrss * 1024
    outputs = sorted(out.glob("model-*.safetensors"))
    largest = max(p.stat().st_size for p in inputs + outputs)
    report = (f"1.5B merge: {n_params / 1e9:.2f}B params, input shards {[p.stat().st_size for p in inputs]}, "
              f"output shards {[p.stat().st_size for p in outputs]}, peak RSS {peak / 1e9:.2f} GB, "
              f"bound {(2 * largest + 1.5e9) / 1e9:.2f} GB; base written in {written:.0f}s, merged in {merged_s:.0f}s")
    print(report)
    assert peak <= 2 * largest + 1.5e9, report

    # The merge did the work: every tensor once, and a projection holds W + scale * B @ A.
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert sorted(index["weight_map"]) == sorted(n for n, _ in _qwen2_shapes(QWEN2_1_5B))
    name = "model.layers.27.mlp.down_proj.weight"
    with safe_open(str(out / index["weight_map"][name]), framework="pt") as f:
        got = f.get_tensor(name).float()
    with safe_open(str(tmp_path / "base" / json.loads((tmp_path / "base" / "model.safetensors.index.json").read_text())
                       ["weight_map"][name]), framework="pt") as f:
        w = f.get_tensor(name).float()
    with safe_open(str(tmp_path / "adapter" / "adapter_model.safetensors"), framework="pt") as f:
        a = f.get_tensor("base_model.model.model.layers.27.mlp.down_proj.lora_A.weight")
        b = f.get_tensor("base_model.model.model.layers.27.mlp.down_proj.lora_B.weight")
    torch.testing.assert_close(got, w + 2.0 * b @ a, rtol=2**-8, atol=1e-6)
