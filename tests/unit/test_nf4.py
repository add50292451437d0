"""kernels.traced_dequant (CPU): NF4 dequantization as tensor ops equals bitsandbytes' bit for bit, traces into
one graph without bitsandbytes' ops, and is used by the fused layers only while compiling."""

import bitsandbytes.functional as bnbf
import pytest
import torch

from qflash.kernels.nf4 import dequantize_nf4, traceable
from qflash.model import fused_lora


def _bnb_portable(packed, qs) -> torch.Tensor:
    """bitsandbytes' own arithmetic in its portable (PyTorch) backend: the reference for the traced version.

    bitsandbytes' CPU kernel (0.50, AVX512 machines) dequantizes wrongly where a 64-value block straddles two
    rows (a row length that is not a multiple of 64: 96, 80 — never so in the models qflash trains); its CUDA
    kernel is compared in tests/gpu/test_compile.py."""
    from bitsandbytes.backends.default.ops import _dequantize_4bit_compute

    absmax = bnbf.dequantize_blockwise(qs.absmax, qs.state2) + qs.offset if qs.nested else qs.absmax
    data = packed.reshape(-1) if packed.dtype == torch.uint8 else packed.reshape(-1).view(torch.uint8)
    return _dequantize_4bit_compute(data, absmax.float(), qs.code, qs.blocksize, qs.shape, qs.dtype)


def _quantized(shape, dtype, nested, seed=0):
    g = torch.Generator().manual_seed(seed)
    w = (torch.randn(shape, generator=g) * 0.02).to(dtype)
    w.view(-1)[:5] = torch.tensor([0.0, 1.0, -1.0, 3e-3, -7e-4]).to(dtype)  # zeros, block maxima, small values
    return bnbf.quantize_4bit(w, blocksize=64, compress_statistics=nested, quant_type="nf4",
                              quant_storage=torch.uint8)


@pytest.mark.parametrize("nested", [True, False])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("shape", [(256, 128), (33, 65), (3, 7), (40, 1000)])
def test_traced_dequant_is_bitsandbytes_bit_for_bit(shape, dtype, nested):
    packed, qs = _quantized(shape, dtype, nested)
    assert traceable(qs)
    want = _bnb_portable(packed, qs)
    if shape[-1] % 64 == 0:  # rows of whole blocks, as in every model: bitsandbytes' dispatched kernel agrees
        assert torch.equal(want, bnbf.dequantize_4bit(packed, qs))
    got = dequantize_nf4(packed, qs)
    assert got.shape == want.shape and got.dtype == want.dtype
    assert torch.equal(got.view(torch.uint8 if dtype != torch.float32 else torch.int32).view(-1).long(),
                       want.view(torch.uint8 if dtype != torch.float32 else torch.int32).view(-1).long())
    assert want.abs().max() > 0


@pytest.mark.parametrize("storage", [torch.bfloat16, torch.float32])
def test_traced_dequant_reads_other_quant_storage_as_bytes(storage):
    """FSDP keeps the packed NF4 bytes in a float storage dtype: the same bytes, the same weight."""
    w = (torch.randn(64, 96, generator=torch.Generator().manual_seed(2)) * 0.02).to(torch.bfloat16)
    packed, qs = bnbf.quantize_4bit(w, blocksize=64, compress_statistics=True, quant_type="nf4", quant_storage=storage)
    assert packed.dtype == storage
    assert torch.equal(dequantize_nf4(packed, qs), _bnb_portable(packed, qs))


def test_fp4_is_left_to_bitsandbytes():
    w = torch.randn(64, 64, dtype=torch.bfloat16)
    _, qs = bnbf.quantize_4bit(w, blocksize=64, quant_type="fp4")
    assert not traceable(qs)


def test_fused_layers_trace_the_dequant_only_while_compiling(monkeypatch):
    """Eager code calls bitsandbytes; compiled (aot_eager: the traced graph inductor would get), the graph has
    tensor ops only, no bitsandbytes op, and gives the same weight."""
    packed, qs = _quantized((96, 80), torch.bfloat16, nested=True, seed=1)
    want = {True: _bnb_portable(packed, qs), False: bnbf.dequantize_4bit(packed, qs)}  # traced: ours; else bnb's
    calls = []
    real = bnbf.dequantize_4bit
    monkeypatch.setattr(bnbf, "dequantize_4bit", lambda *a, **k: calls.append(1) or real(*a, **k))
    assert torch.equal(fused_lora._dequantize(packed, qs, traced=True), want[False]) and len(calls) == 1

    graphs = []

    def recording(gm, example_inputs):
        graphs.append(str(gm.graph))
        return torch._dynamo.backends.debugging.aot_eager(gm, example_inputs)

    torch._dynamo.reset()
    try:
        for traced in (True, False):
            graphs.clear()
            got = torch.compile(lambda p: fused_lora._dequantize(p, qs, traced=traced) * 1,
                                backend=recording, dynamic=True)(packed)
            assert torch.equal(got, want[traced])
            assert len(graphs) == 1
            assert ("bitsandbytes" in graphs[0]) != traced, graphs[0]
    finally:
        torch._dynamo.reset()
