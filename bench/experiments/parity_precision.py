"""Why does the seeds' recipe lower the loss faster than qflash over the first steps (2.3% after 20)?

Hypothesis: precision, not a bug. prepare_model_for_kbit_training upcasts every non-quantized
parameter (embeddings, norms, lm_head) to fp32, so the reference's residual stream is fp32 under
autocast; qflash keeps it bf16. Variants, 20 steps each, same data and initial LoRA weights:
  qflash            as shipped
  qflash+fp32       embeddings and norms upcast to fp32 (residual stream in fp32)
  reference         the seeds' recipe
  reference-bf16    the seeds' recipe without the upcast (GC and input grads kept)
Run on the GPU: PYTHONPATH=src python3 bench/experiments/parity_precision.py SHAPE [STEPS]
"""

import sys

import numpy as np
import torch

from qflash.bench import runner
from qflash.bench.shapes import model_config, random_model_dir
from qflash.model.attention import activate
from qflash.model.loading import qflash_home


def upcast_non_quantized(model) -> None:
    for name, p in model.named_parameters():
        if not p.requires_grad and p.dtype == torch.bfloat16 and ("norm" in name or "embed" in name):
            p.data = p.data.float()


def reference_bf16(model_dir, dropout, lr):
    import bitsandbytes as bnb
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    quant = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                               bnb_4bit_compute_dtype=torch.bfloat16)
    model = AutoModelForCausalLM.from_pretrained(str(model_dir), quantization_config=quant, dtype=torch.bfloat16,
                                                 attn_implementation="sdpa", device_map={"": 0})
    model.config.use_cache = False
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": True})
    model.enable_input_require_grads()
    model = get_peft_model(model, LoraConfig(r=64, lora_alpha=16, lora_dropout=dropout,
                                             target_modules=runner.TARGETS, bias="none", task_type="CAUSAL_LM"))
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    return model, bnb.optim.PagedAdamW32bit(params, lr=lr), params


def run(variant, model_dir, data, steps, init):
    if variant.startswith("qflash"):
        model, opt, params = runner.qflash_model(model_dir, 0.0, 1e-4, "auto", 0)
        if variant == "qflash+fp32":
            upcast_non_quantized(model)
        batches = [runner.qflash_batches(d, 2048) for d in data]
        step = lambda i: runner.qflash_step(model, opt, params, batches[i % 2])  # noqa: E731
    else:
        make = runner.reference_model if variant == "reference" else reference_bf16
        model, opt, params = make(model_dir, 0.0, 1e-4)
        batches = [runner.reference_batches(d) for d in data]
        step = lambda i: runner.reference_step(model, opt, params, batches[i % 2], True)  # noqa: E731
    if init is None:
        init = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    with torch.no_grad():
        for n, p in model.named_parameters():
            if p.requires_grad:
                p.copy_(init[n])
    losses = [step(i) for i in range(steps)]
    return losses, init


def main():
    shape = sys.argv[1] if len(sys.argv) > 1 else "qwen2.5-0.5b"
    steps = int(sys.argv[2]) if len(sys.argv) > 2 else 20
    activate("auto")
    model_dir = random_model_dir(shape, qflash_home() / "bench-models")
    vocab = model_config(shape).vocab_size
    rng = np.random.default_rng(1)
    data = [[rng.integers(0, vocab, 2048) for _ in range(4)] for _ in range(2)]
    init, table = None, {}
    for variant in ("qflash", "qflash+fp32", "reference", "reference-bf16"):
        table[variant], init = run(variant, model_dir, data, steps, init)
        runner._free()
    ref = table["reference"]
    for variant, losses in table.items():
        rel = max(abs(a - b) / b for a, b in zip(losses, ref))
        print(f"{shape} {variant:15s} last {losses[-1]:.4f}  max rel diff vs reference {rel:.3%}  "
              f"losses {[round(x, 3) for x in losses[::4]]}", flush=True)


if __name__ == "__main__":
    main()
