"""Memory levers, exact by design (CPU): the offloaded checkpoint and the input embedding kept on the host.

Both are applied on CUDA only in training; here they are installed on CPU models by hand, which runs
the same autograd function and module with the CPU twin in place of pinned copies and streams.
"""

import dataclasses
import functools
import json

import pytest
import re

import torch

from conftest import INIT_RANGE, tiny_config
from qflash.model import activation_offload
from qflash.model.activation_offload import OffloadedCheckpoint, offload_checkpointed_layers
from qflash.model.host_embedding import HostEmbedding, keep_input_embedding_on_host
from qflash.train.loop import build_setup, micro_batches
from qflash.train.loss import loss_sum


@pytest.fixture(scope="module")
def untied_qwen2(tmp_path_factory, smol_tokenizer):
    """A tiny Qwen2 with its own lm_head (like Qwen2.5-7B), so the input embedding can leave."""
    from transformers import AutoModelForCausalLM, Qwen2Config

    out = tmp_path_factory.mktemp("untied") / "qwen2"
    config = Qwen2Config(vocab_size=len(smol_tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=3,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                         bos_token_id=smol_tokenizer.bos_token_id, eos_token_id=smol_tokenizer.eos_token_id,
                         pad_token_id=smol_tokenizer.pad_token_id, tie_word_embeddings=False,
                         initializer_range=INIT_RANGE)
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(config, dtype=torch.float32).save_pretrained(str(out))
    smol_tokenizer.save_pretrained(str(out))
    return out


def _setup(model_dir, data, out, *extra):
    cfg = tiny_config(model_dir, data, out, "train.gradient_checkpointing=true", *extra)
    setup = build_setup(cfg)
    with torch.no_grad():  # LoRA B starts at zero, which would leave every A gradient zero
        gen = torch.Generator().manual_seed(3)
        for n, p in sorted(setup.model.named_parameters()):
            if "lora_B" in n:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.05)
    setup.model.train()  # checkpointing and dropout act in training mode only
    return setup


def _loss_and_grads(setup, batch, autocast: bool):
    torch.manual_seed(11)  # the LoRA dropout masks
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        loss = loss_sum(setup.model, batch, fused_ce=setup.levers.fused_ce.on)
    loss.backward()
    grads = {n: p.grad.clone() for n, p in setup.model.named_parameters() if p.requires_grad}
    return loss.item(), grads


VARIANTS = ("none", "checkpoint", "offload", "offload+embedding")


@pytest.mark.parametrize("case", ["qwen2-untied-fp32-residual-bf16-varlen", "llama-fp32"])
def test_offloaded_checkpoint_gives_the_same_lora_gradients(case, untied_qwen2, tiny_models, identity_subset, tmp_path,
                                                            monkeypatch):
    """LoRA dropout 0.1, fused NF4 + LoRA and fused norm (the defaults): loss and every LoRA gradient equal
    with no checkpointing, transformers' checkpointing, and the offloaded one (with the embedding on the host).
    The qwen2 case runs like the GPU: bf16 compute under autocast, fp32 residual, a packed batch whose
    layers get cu_seqlens; the backward recomputes outside autocast, so the state must travel."""
    from qflash.data.batching import pack_rows
    from qflash.model import attention

    bf16 = case.startswith("qwen2")
    model_dir = untied_qwen2 if bf16 else tiny_models["llama"]
    extra = ["lora.dropout=0.1"] + (["quant.compute_dtype=bf16"] if bf16 else [])
    results = {}
    for variant in VARIANTS:
        setup = _setup(model_dir, identity_subset, tmp_path / variant, *extra,
                       f"train.gradient_checkpointing={str(variant != 'none').lower()}")
        if variant.startswith("offload"):
            assert offload_checkpointed_layers(setup.model) == setup.model.config.num_hidden_layers
        if variant.endswith("embedding"):  # the llama tiny model is tied: it stays
            assert keep_input_embedding_on_host(setup.model, fp32_rows=setup.levers.residual_fp32.on) == bf16
        if bf16:  # the torch_varlen backend, its kernel the CPU twin of qflash::flash_varlen
            attention.use(setup.model, attention.Choice("torch_varlen"))
            monkeypatch.setitem(attention._KERNELS, "torch_varlen",
                                lambda q, k, v, cu_q, cu_k, mq, mk, scaling, dropout=0.0, window=None:
                                attention.flash_varlen(q, k, v, cu_q, cu_k, mq, mk, scaling,
                                                       attention._window_left(window))[0])
            batch = pack_rows(setup.examples, list(range(6)), varlen=True)
            assert batch.cu_seqlens is not None
        else:
            batch = micro_batches(setup, list(range(8)))[0]
        results[variant] = _loss_and_grads(setup, batch, autocast=bf16)
    ref_loss, ref_grads = results["none"]
    assert len(ref_grads) == 2 * 7 * setup.model.config.num_hidden_layers
    for variant in VARIANTS[1:]:
        loss, grads = results[variant]
        assert abs(loss - ref_loss) <= 1e-6 * abs(ref_loss), (variant, loss, ref_loss)
        assert grads.keys() == ref_grads.keys()
        for n, g in ref_grads.items():
            assert g.abs().max() > 0, n
            torch.testing.assert_close(grads[n], g, rtol=1e-5, atol=1e-6 * g.abs().max().item(),
                                       msg=lambda m: f"{variant} {n}: {m}")


def test_backward_fetches_the_previous_layer_input_before_taking_its_own(untied_qwen2, identity_subset, tmp_path,
                                                                        monkeypatch):
    events = []

    class Recorder(activation_offload._HostTwin):
        count = 0

        def __init__(self, t, keep=False):
            super().__init__(t)
            assert keep == (Recorder.count == 2)  # the last layer's input stays where it is
            self.i, Recorder.count = Recorder.count, Recorder.count + 1
            events.append(("hold", self.i))

        def prefetch(self):
            events.append(("prefetch", self.i))

        def take(self):
            events.append(("take", self.i))
            return super().take()

    monkeypatch.setattr(activation_offload, "_hold", Recorder)
    setup = _setup(untied_qwen2, identity_subset, tmp_path / "run")
    offload_checkpointed_layers(setup.model)
    loss = loss_sum(setup.model, micro_batches(setup, list(range(4)))[0], fused_ce=setup.levers.fused_ce.on)
    assert events == [("hold", 0), ("hold", 1), ("hold", 2)]  # one input per layer, kept for backward
    loss.backward()
    assert events.index(("prefetch", 1)) < events.index(("take", 2))
    assert events.index(("prefetch", 0)) < events.index(("take", 1))
    assert [e for e in events if e[0] == "take"] == [("take", 2), ("take", 1), ("take", 0)]


def test_argument_needing_grad_by_keyword_falls_back_to_plain_checkpointing():
    layer = torch.nn.Linear(4, 4)
    x = torch.randn(3, 4, requires_grad=True)
    scale = torch.randn(4, requires_grad=True)

    def forward(h, scale):
        return layer(h) * scale

    out = OffloadedCheckpoint(layer)(functools.partial(forward, scale=scale), x)
    out.sum().backward()
    got = (x.grad.clone(), scale.grad.clone(), layer.weight.grad.clone())
    for t in (x, scale, layer.weight):
        t.grad = None
    forward(x, scale).sum().backward()
    for u, v in zip(got, (x.grad, scale.grad, layer.weight.grad)):
        torch.testing.assert_close(u, v)


def test_offloaded_checkpoint_without_grad_just_runs():
    layer = torch.nn.Linear(4, 4)
    with torch.no_grad():
        out = OffloadedCheckpoint(layer)(layer, torch.randn(2, 4))
    assert not out.requires_grad


def test_host_embedding_rows_equal_the_gpu_path(untied_qwen2, tiny_models, identity_subset, tmp_path):
    """bf16 table, fp32 residual: the rows (cast to fp32) and the logits are the same; tied or trained
    embeddings stay put."""
    setup = _setup(untied_qwen2, identity_subset, tmp_path / "run", "quant.compute_dtype=bf16")
    model = setup.model
    ids = torch.randint(0, model.config.vocab_size, (2, 9))
    before_rows = model.get_input_embeddings()(ids)
    autocast = torch.autocast("cpu", dtype=torch.bfloat16)  # as on the GPU: bf16 matmuls, fp32 residual
    with torch.no_grad(), autocast:
        before = model(input_ids=ids).logits
    table = model.get_input_embeddings().weight.detach().clone()
    assert setup.levers.residual_fp32.on
    assert keep_input_embedding_on_host(model, fp32_rows=True)
    host = model.get_input_embeddings()
    assert isinstance(host, HostEmbedding) and host.out_dtype == torch.float32
    assert torch.equal(host.weight, table)  # merge/export code reading .weight sees the real table
    assert not any("embed_tokens" in n for n, _ in model.named_parameters())  # .to()/DDP leave it alone
    rows = host(ids)
    assert rows.dtype == before_rows.dtype == torch.float32 and torch.equal(rows, before_rows)
    with torch.no_grad(), autocast:
        assert torch.equal(model(input_ids=ids).logits, before)
    assert keep_input_embedding_on_host(model)  # idempotent

    tied = build_setup(tiny_config(tiny_models["qwen2"], identity_subset, tmp_path / "tied"))
    assert not keep_input_embedding_on_host(tied.model)
    assert type(tied.model.get_input_embeddings()) is torch.nn.Embedding
    for extra in ("lora.target_modules=[embed_tokens, q_proj]",):
        trained = build_setup(tiny_config(untied_qwen2, identity_subset, tmp_path / "trained", extra))
        assert not keep_input_embedding_on_host(trained.model)


def test_host_embedding_keeps_the_adapter_and_generation(untied_qwen2, identity_subset, tmp_path):
    from safetensors.torch import load_file

    setup = _setup(untied_qwen2, identity_subset, tmp_path / "run")
    model = setup.model
    model.save_pretrained(str(tmp_path / "before"))
    prompt = torch.tensor([[1, 5, 9, 14, 3]])
    model.eval()
    want = model.generate(input_ids=prompt, max_new_tokens=6, do_sample=False)
    keep_input_embedding_on_host(model)
    got = model.generate(input_ids=prompt, max_new_tokens=6, do_sample=False)
    assert torch.equal(got, want)
    model.save_pretrained(str(tmp_path / "after"))
    a, b = load_file(str(tmp_path / "before" / "adapter_model.safetensors")), load_file(
        str(tmp_path / "after" / "adapter_model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert json.loads((tmp_path / "after" / "adapter_config.json").read_text()) == json.loads(
        (tmp_path / "before" / "adapter_config.json").read_text())


def test_levers_resolve_for_the_device_and_say_why_off(untied_qwen2, identity_subset, tmp_path):
    """train/levers.py: the memory levers apply on CUDA only, offloading not under FSDP2, each switch off with its
    reason; the CPU run's own setup is today's CPU path (no offload, the embedding where it was)."""
    from qflash.train.levers import resolve

    cfg = tiny_config(untied_qwen2, identity_subset, tmp_path / "run", "train.gradient_checkpointing=true")
    assert cfg.train.offload_activations and cfg.train.embedding_on_cpu  # the defaults (measured: bench/NOTES.md)
    setup = build_setup(cfg)  # CPU
    model, cuda, bf16 = setup.model, torch.device("cuda"), torch.bfloat16
    on_gpu = resolve(cfg, cuda, bf16, model, planned_steps=10)
    assert on_gpu.offload_activations.on and on_gpu.embedding_on_cpu.on and on_gpu.residual_fp32.on
    assert not on_gpu.compile_layers.on and "10 steps are too few" in on_gpu.compile_layers.why
    assert resolve(cfg, cuda, bf16, model, planned_steps=10**4).compile_layers.on
    assert not on_gpu.keep_attention.on and on_gpu.keep_attention.why == "kernels.keep_attention=false"
    sharded = resolve(cfg, cuda, bf16, model, sharded=True)
    assert not sharded.offload_activations.on and "FSDP2" in sharded.offload_activations.why
    assert sharded.embedding_on_cpu.on
    assert setup.levers == resolve(cfg, torch.device("cpu"), torch.float32, model, planned_steps=10)
    assert setup.levers.offload_activations.why == "on the CPU" and not setup.levers.residual_fp32.on
    cfg.train.offload_activations, cfg.kernels.keep_attention = False, True
    off = resolve(cfg, cuda, bf16, model)
    assert off.offload_activations.why == "train.offload_activations=false"
    assert off.keep_attention.why == "needs train.offload_activations"
    cfg.train.offload_activations = True
    assert resolve(cfg, cuda, bf16, model).keep_attention.why == "attention is sdpa, not torch_varlen"
    table = setup.levers.table()
    assert re.search(r"train.offload_activations +off: on the CPU", table) and "kernels.fused_ce" in table
    assert type(setup.model.get_input_embeddings()) is torch.nn.Embedding
    funcs = {type(getattr(m, "_gradient_checkpointing_func", None)).__name__
             for m in setup.model.modules() if type(m).__name__.endswith("DecoderLayer")}
    assert "OffloadedCheckpoint" not in funcs


def test_gemma3_switches_on_or_off_with_the_reason(tiny_models, identity_subset, tmp_path):
    """Gemma 3 on a GPU: fused LoRA, the (1 + w) fused norms and the soft-capped fused loss stay on; the lean
    recompute is off (its post-feedforward norm reads down_proj's output) and so is the host embedding (scaled and
    tied), each with its reason in the banner's table."""
    from qflash.model.host_embedding import why_not_on_host
    from qflash.train.levers import resolve
    from qflash.train.loss import fused_ce_blocker

    cfg = tiny_config(tiny_models["gemma3"], identity_subset, tmp_path / "run", "train.gradient_checkpointing=true",
                      "kernels.lean_recompute=true")
    setup = build_setup(cfg)  # CPU
    on_gpu = resolve(cfg, torch.device("cuda"), torch.bfloat16, setup.model, planned_steps=10)
    assert on_gpu.fused_lora.on and on_gpu.fused_norm.on and on_gpu.fused_ce.on and on_gpu.offload_activations.on
    assert not on_gpu.lean_recompute.on and "post-feedforward norm" in on_gpu.lean_recompute.why
    assert re.search(r"kernels.lean_recompute +off: Gemma 3's post-feedforward norm reads mlp.down_proj's output",
                     on_gpu.table())
    assert fused_ce_blocker(setup.model) is None  # the cap is applied inside the fused loss
    assert "not a plain frozen nn.Embedding" in why_not_on_host(setup.model.get_base_model())
    norms = {type(m).__name__ for m in setup.model.modules() if "Norm" in type(m).__name__}
    assert norms == {"FusedRMSNorm"}, norms  # the CPU run's own levers: every Gemma3RMSNorm swapped


def test_an_unapplied_gemma3_attention_softcap_is_said(tiny_models):
    """transformers' Gemma 3 passes no attn_logit_softcapping to its attention: a config that sets one is told so
    (checked: the logits do not move when it is set)."""
    from transformers import AutoModelForCausalLM

    from qflash.model.loading import unapplied_attention_softcap

    model = AutoModelForCausalLM.from_pretrained(str(tiny_models["gemma3"]), dtype=torch.float32).eval()
    assert unapplied_attention_softcap(model.config) is None
    ids = torch.arange(5, 40)[None]
    with torch.no_grad():
        before = model(ids).logits
        model.config.attn_logit_softcapping = 0.5  # would flatten every score if applied
        for layer in model.model.layers:
            layer.self_attn.attn_logit_softcapping = 0.5
        assert torch.equal(model(ids).logits, before)
    assert "attn_logit_softcapping=0.5 is set, but" in unapplied_attention_softcap(model.config)


def test_memory_levers_do_not_block_a_resume():
    from qflash.config import load_config
    from qflash.train.resume import differences, run_identity

    old = load_config(None, ["train.offload_activations=false", "train.embedding_on_cpu=false"]).to_dict()
    del old["train"]["offload_activations"], old["train"]["embedding_on_cpu"]  # a checkpoint from before them
    new = load_config(None, []).to_dict()
    assert differences(run_identity(old, {}, {}), run_identity(new, {}, {})) == []


def test_kernel_switches_do_not_block_a_resume():
    """kernels.* keep the math: a checkpoint written before fused_ce / lean_recompute existed, or with
    compile_layers off, resumes under today's defaults; a change of what is trained still blocks it."""
    from qflash.config import load_config
    from qflash.train.resume import differences, run_identity

    old = load_config(None, ["kernels.compile_layers=false"]).to_dict()
    del old["kernels"]["fused_ce"], old["kernels"]["lean_recompute"]
    new = load_config(None, []).to_dict()
    assert differences(run_identity(old, {}, {}), run_identity(new, {}, {})) == []
    other = load_config(None, ["lora.r=4"]).to_dict()
    assert differences(run_identity(other, {}, {}), run_identity(new, {}, {}))


def test_a_batch_moved_from_the_cpu_brings_its_label_positions_and_host_ids(untied_qwen2, identity_subset, tmp_path):
    """Batch.to() finds the labelled positions and keeps the CPU input ids, so the step reads neither back
    from the device; the host embedding looks up those ids; the loss is the same."""
    from qflash.data.template import IGNORE

    setup = _setup(untied_qwen2, identity_subset, tmp_path / "run")
    assert keep_input_embedding_on_host(setup.model)
    setup.model.eval()  # no dropout: the two losses must agree exactly
    batch = micro_batches(setup, list(range(6)))[0]
    moved = batch.to(torch.device("cpu"))
    want = (batch.labels[:, 1:].reshape(-1) != IGNORE).nonzero().squeeze(1)
    assert torch.equal(moved.label_index, want) and 0 < want.numel() < batch.labels[:, 1:].numel()
    assert moved.host_input_ids is batch.input_ids
    # On the CPU both id tensors are one object; a copy tells which one the embedding is given.
    moved = dataclasses.replace(moved, host_input_ids=batch.input_ids.clone())
    seen = []
    hook = setup.model.get_input_embeddings().register_forward_hook(lambda m, args, out: seen.append(args[0]))
    try:
        plain, fast = loss_sum(setup.model, batch, fused_ce=setup.levers.fused_ce.on), loss_sum(setup.model, moved, fused_ce=setup.levers.fused_ce.on)
    finally:
        hook.remove()
    assert seen[0] is batch.input_ids and seen[1] is moved.host_input_ids
    assert plain.item() == fast.item()


def test_offload_leaves_host_memory_for_the_system(monkeypatch):
    """Layer inputs are pinned only while MemAvailable keeps a reserve: a long sequence that would not fit
    stays on the GPU instead of having the kernel's OOM killer end the run (found at 262k tokens, 7B)."""
    GB = 1 << 30
    monkeypatch.setattr(activation_offload, "host_available_bytes", lambda: 20 * GB)
    assert activation_offload.fits_in_host(11 * GB)  # 20 - 11 leaves the 8 GB reserve
    assert not activation_offload.fits_in_host(13 * GB)
    monkeypatch.setattr(activation_offload, "host_available_bytes", lambda: 200 * GB)
    assert activation_offload.fits_in_host(170 * GB) and not activation_offload.fits_in_host(185 * GB)  # 10% kept
    monkeypatch.setattr(activation_offload, "host_available_bytes", lambda: None)  # unknown: not in the way
    assert activation_offload.fits_in_host(1 << 40)


def test_host_memory_reader_reads_this_machine():
    """What the pinning guard reads is this machine's available memory (psutil reads it its own way): None here
    would silently turn the guard off."""
    import psutil

    available = activation_offload.host_available_bytes()
    want = psutil.virtual_memory().available
    assert available is not None and abs(available - want) <= 0.05 * want + (256 << 20), (available, want)


def test_kept_attention_spares_the_recompute_its_attention_forward(untied_qwen2, identity_subset, tmp_path,
                                                                   monkeypatch):
    """kernels.keep_attention: the offloaded checkpoint carries each layer's attention output and lse from the
    forward to the recompute, which runs no attention forward; loss and every LoRA gradient are the same bits
    (the torch_varlen backend's CPU twin, LoRA dropout on, bf16 autocast, a packed batch)."""
    from qflash.data.batching import pack_rows
    from qflash.model import attention

    forwards = []
    twin = attention._twin_forward
    monkeypatch.setattr(attention, "_twin_forward", lambda *a: forwards.append(1) or twin(*a))
    results, counts = {}, {}
    for keep in (False, True):
        setup = _setup(untied_qwen2, identity_subset, tmp_path / str(keep), "lora.dropout=0.1",
                       "quant.compute_dtype=bf16")
        attention.use(setup.model, attention.Choice("torch_varlen"))  # the setup loaded it with the CPU's (sdpa)
        # the op's CPU twin for every call (outside keeping/reusing the backend calls torch's varlen_attn, CUDA only)
        monkeypatch.setitem(attention._KERNELS, "torch_varlen",
                            lambda q, k, v, cu_q, cu_k, mq, mk, scaling, dropout=0.0, window=None:
                            attention.flash_varlen(q, k, v, cu_q, cu_k, mq, mk, scaling,
                                                   attention._window_left(window))[0])
        offload_checkpointed_layers(setup.model, keep_attention=keep)
        batch = pack_rows(setup.examples, list(range(6)), varlen=True)
        assert batch.cu_seqlens is not None and len(batch.cu_seqlens) > 2
        forwards.clear()
        results[keep] = _loss_and_grads(setup, batch, autocast=True)
        counts[keep] = len(forwards)
    layers = setup.model.config.num_hidden_layers
    assert counts == {False: 2 * layers, True: layers}
    (loss, grads), (kept_loss, kept_grads) = results[False], results[True]
    assert kept_loss == loss and grads.keys() == kept_grads.keys() and len(grads) == 2 * 7 * layers
    for n, g in grads.items():
        assert g.abs().max() > 0 and torch.equal(kept_grads[n], g), n


def test_kept_attention_inside_compiled_layers(untied_qwen2, identity_subset, tmp_path, monkeypatch):
    """The same with compiled decoder layers (aot_eager_decomp_partition: the partitioned graphs Inductor gets):
    flash_varlen traced into the forward's and the recompute's graphs keeps and reuses at run time, and the
    gradients are those of eager layers recomputing their attention."""
    from qflash.data.batching import pack_rows
    from qflash.kernels.compile import compile_decoder_layers
    from qflash.model import attention

    forwards = []
    twin = attention._twin_forward
    monkeypatch.setattr(attention, "_twin_forward", lambda *a: forwards.append(1) or twin(*a))
    results, counts = {}, {}
    for variant in ("eager", "compiled-kept"):
        kept = variant == "compiled-kept"
        setup = _setup(untied_qwen2, identity_subset, tmp_path / variant, "lora.dropout=0", "quant.compute_dtype=bf16")
        attention.use(setup.model, attention.Choice("torch_varlen"))
        if not kept:  # eager reference: the CPU twin for every call (varlen_attn is CUDA only)
            monkeypatch.setitem(attention._KERNELS, "torch_varlen",
                                lambda q, k, v, cu_q, cu_k, mq, mk, scaling, dropout=0.0, window=None:
                                attention.flash_varlen(q, k, v, cu_q, cu_k, mq, mk, scaling,
                                                       attention._window_left(window))[0])
        else:
            monkeypatch.setitem(attention._KERNELS, "torch_varlen", attention._torch_varlen)
            torch._dynamo.reset()
            assert compile_decoder_layers(setup.model, backend="aot_eager_decomp_partition") > 0
        offload_checkpointed_layers(setup.model, keep_attention=kept)
        batch = pack_rows(setup.examples, list(range(6)), varlen=True)
        forwards.clear()
        results[variant] = _loss_and_grads(setup, batch, autocast=True)
        counts[variant] = len(forwards)
    torch._dynamo.reset()
    layers = setup.model.config.num_hidden_layers
    assert counts == {"eager": 2 * layers, "compiled-kept": layers}
    (ref_loss, ref), (loss, grads) = results["eager"], results["compiled-kept"]
    assert abs(loss - ref_loss) <= 1e-5 * abs(ref_loss)
    for n, g in ref.items():
        torch.testing.assert_close(grads[n], g, rtol=1e-4, atol=1e-5 * g.abs().max().item(), msg=lambda m: f"{n}: {m}")
