"""`make mutants`: break the code on purpose and check that the test that claims to cover it fails.

Each mutation below replaces one exact piece of a source file in a throwaway copy of the checkout (tracked
files, as they are in the working tree) and runs only the test that must catch it, with PYTHONPATH pointing
at the copy (the venv's editable install would otherwise import the unbroken checkout and every mutation
would "survive"). One line per mutation: caught, SURVIVED, or skipped (GPU tests on a machine without one).
Exit status 1 if any mutation survived or the unbroken copy fails a target test.

A new switch or numerics-sensitive piece of code that gets a test gets a mutation here too.

    python tools/mutants.py                 # all that run here
    python tools/mutants.py -k sampling     # those whose name contains "sampling"
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


@dataclass(frozen=True)
class Mutant:
    name: str
    path: str
    old: str
    new: str
    test: str
    gpu: bool = False


MUTANTS = [
    Mutant("sampling forced to greedy", "src/qflash/infer/engine.py",
           '"do_sample": not opts.greedy,', '"do_sample": False,',
           "tests/integration/test_serve.py::test_sampling_with_a_seed_is_reproducible_and_samples"),
    Mutant("top_p ignored", "src/qflash/infer/engine.py",
           "kw.update(temperature=opts.temperature, top_p=opts.top_p, top_k=0)",
           "kw.update(temperature=opts.temperature, top_k=0)",
           "tests/integration/test_serve.py::test_sampling_with_a_seed_is_reproducible_and_samples"),
    Mutant("fused LoRA scale alpha/r under rsLoRA", "src/qflash/model/fused_lora.py",
           "float(self.scaling[name])", "float(self.lora_alpha[name] / self.r[name])",
           "tests/unit/test_fused_lora.py::test_fused_model_matches_peft_loss_and_lora_grads[qwen2-lora.rslora=true]"),
    Mutant("host memory reader returns None", "src/qflash/model/activation_offload.py",
           "return int(line.split()[1]) * 1024", "return None",
           "tests/unit/test_memory_levers.py::test_host_memory_reader_reads_this_machine"),
    Mutant("lora.r undocumented", "src/qflash/config.py",
           '    r: int = 16\n    """Rank of the LoRA update."""\n', "    r: int = 16\n",
           "tests/unit/test_config.py::test_every_field_is_documented"),
    Mutant("no did-you-mean", "src/qflash/config.py",
           "    # The exact name in another section", '    return ""\n    # The exact name in another section',
           "tests/integration/test_cli_e2e.py::test_bad_config_is_one_line_without_traceback"),
    Mutant("fused norm copies the weight", "src/qflash/kernels/rmsnorm.py",
           "FusedRMSNorm(child.weight, float(eps), compiled)",
           "FusedRMSNorm(torch.nn.Parameter(child.weight.detach().clone()), float(eps), compiled)",
           "tests/unit/test_kernels.py::test_swap_shares_weights_and_keeps_state_dict"),
    # This session's (issues 20, 21)
    Mutant("bitsandbytes' CPU repack left on", "src/qflash/model/loading.py",
           "module.support_avx512bf16_for_cpu = False", "pass",
           "tests/integration/test_generate_then_train.py::test_replay_generation_then_training_equals_training_alone"),
    Mutant("inference outside the compute dtype", "src/qflash/model/loading.py",
           "        return torch.autocast(device.type, dtype=dtype)\n", "        pass\n",
           "tests/integration/test_generate_then_train.py::test_16bit_compute_with_the_fp32_residual_generates_and_evaluates"),
    Mutant("fp16 loss scale not restored on resume", "src/qflash/train/loop.py",
           'run.par.load_scaler_state(ckpt.state.get("loss_scaler"))', "pass",
           "tests/integration/test_fp16.py::test_fp16_trains_with_a_loss_scale_and_resumes_exactly"),
    Mutant("fp16 overflow counted toward max_bad_steps", "src/qflash/train/steps.py",
           "if scale is not None and math.isfinite(loss) and scale >= 1.0:", "if False:",
           "tests/integration/test_fp16.py::test_overflowed_fp16_steps_are_skipped_counted_and_the_scale_lowered"),
    Mutant("NF4 twin reads the low nibble first", "src/qflash/kernels/nf4.py",
           "torch.stack((data >> 4, data & 15)", "torch.stack((data & 15, data >> 4)",
           "tests/unit/test_nf4.py"),
    Mutant("untested versions not reported", "src/qflash/versions.py",
           "        if not _minor(low) <= _minor(version) <= _minor(high):", "        if False:",
           "tests/unit/test_versions.py"),
    Mutant("compiled layers drop the LoRA term of the input gradient", "src/qflash/model/fused_lora.py",
           "return (_grad_input_op if torch.compiler.is_compiling() else _grad_input)(g, w, gb, a, scaling)",
           "return (_grad_input_op(g, w, gb, a, 0.0) if torch.compiler.is_compiling() else _grad_input(g, w, gb, a, "
           "scaling))",
           "tests/unit/test_kernels.py::test_compiled_layer_backward_matches_eager_through_aot_autograd"),
    # The switch seam (issue 22)
    Mutant("levers: offloading under FSDP2", "src/qflash/train/levers.py",
           '(sharded, "FSDP2 shards the model', '(False, "FSDP2 shards the model',
           "tests/unit/test_memory_levers.py::test_levers_resolve_for_the_device_and_say_why_off"),
    Mutant("levers: fused_ce not handed to the training loss", "src/qflash/train/distributed.py",
           "LossModule(model, autocast_dtype, fused_ce)", "LossModule(model, autocast_dtype)",
           "tests/unit/test_fused_ce.py::test_training_steps_follow_the_lever"),
    # GGUF export (issue 23)
    Mutant("gguf: Llama q/k left in transformers' rotary layout", "src/qflash/export/gguf.py",
           "                t = _permute_rotary(t, heads if \"q_proj\" in hf_name else kv_heads)", "                pass",
           "tests/integration/test_gguf_export.py::test_tiny_models_read_back_at_f16_rounding[llama]"),
    Mutant("gguf: no end-of-turn id", "src/qflash/export/gguf.py",
           '("eot", writer.add_eot_token_id)', '("no-eot", writer.add_eot_token_id)',
           "tests/integration/test_gguf_export.py::test_a_trained_run_exports_merged_with_its_fidelity"),
    # Preference tuning (issue 25): each objective against TRL
    Mutant("pref: ipo target 1/beta instead of 1/(2 beta)", "src/qflash/train/preference.py",
           "return (z - 1 / (2 * obj.beta)) ** 2  # ipo", "return (z - 1 / obj.beta) ** 2  # ipo",
           "tests/integration/test_preference_parity.py::test_losses_and_lora_gradients_match_trl[ipo]"),
    Mutant("pref: dpo reference log-probabilities ignored", "src/qflash/train/preference.py",
           "        ref_c, ref_r = reference[:, 0], reference[:, 1]\n",
           "        ref_c, ref_r = reference[:, 0] * 0, reference[:, 1] * 0\n",
           "tests/integration/test_preference_parity.py::test_losses_and_lora_gradients_match_trl[dpo]"),
    Mutant("pref: orpo NLL on the answers only", "src/qflash/train/steps.py",
           'chosen_prompt=setup.objective.name == "orpo")', "chosen_prompt=False)",
           "tests/integration/test_preference_parity.py::test_losses_and_lora_gradients_match_trl[orpo]"),
    Mutant("pref: rpo's NLL term dropped", "src/qflash/train/preference.py",
           "total = total + obj.rpo_alpha * nll * w_token", "total = total + 0 * nll * w_token",
           "tests/integration/test_preference_parity.py::test_losses_and_lora_gradients_match_trl[rpo]"),
    Mutant("pref: simpo margin gamma ignored", "src/qflash/train/preference.py",
           "z = pol_c - pol_r - obj.gamma / obj.beta", "z = pol_c - pol_r",
           "tests/integration/test_preference_parity.py::test_losses_and_lora_gradients_match_trl[simpo]"),
    Mutant("pref: sequences attend across each other", "src/qflash/train/preference.py",
           "        batch = stack_rows([pack_rows(seqs, r, varlen=False) for r in rows], pad_id)",
           "        batch = stack_rows([pack_rows(seqs, r, varlen=False) for r in rows], pad_id)\n"
           "        batch.position_ids = torch.arange(batch.input_ids.shape[1]).repeat(batch.input_ids.shape[0], 1)",
           "tests/integration/test_preference_parity.py::test_losses_and_lora_gradients_match_trl[hinge]"),
    Mutant("pref: eval compares the tuned model with itself", "src/qflash/eval/preference.py",
           '        with model.disable_adapter():\n            yield "the base model"',
           '        yield "the base model"',
           "tests/integration/test_preference_eval.py"),
    # Gemma 3 (issue 26): (1 + w) norms, soft-capped logits, sliding windows within packed documents
    Mutant("gemma: fused norm forgets the 1 of (1 + w)", "src/qflash/kernels/rmsnorm.py",
           "else 1.0 if name in OFFSET_RMS_NORMS", "else 0.0 if name in OFFSET_RMS_NORMS",
           "tests/unit/test_kernels.py::test_swap_shares_weights_and_keeps_state_dict[gemma3]"),
    Mutant("gemma: the loss skips the logit soft-cap", "src/qflash/train/loss.py",
           "    cap = logit_softcap(lm)\n", "    cap = None\n",
           "tests/unit/test_fused_ce.py::test_softcapped_loss_equals_the_models_own_logits"),
    Mutant("gemma: the soft-capped gradient misses the cap's slope", "src/qflash/train/loss.py",
           "        dlogits.mul_(slope)", "        pass",
           "tests/unit/test_fused_ce.py::test_softcapped_gradient_twin"),
    Mutant("window: not handed to the varlen kernel", "src/qflash/model/attention.py",
           "scaling, dropout, window=window)", "scaling, dropout, window=None)",
           "tests/integration/test_packing.py::test_sliding_window_applies_per_document_in_a_packed_row"),
    Mutant("window: one key too many", "src/qflash/model/attention.py",
           "return window - 1 if window else -1", "return window if window else -1",
           "tests/unit/test_varlen_inputs.py::test_flash_varlen_twin_matches_per_document_attention_and_its_gradients"),
    Mutant("window: a varlen model's unpadded sequence attends past it", "src/qflash/model/attention.py",
           'kwargs.get("attention_mask") is None and not reached:', 'kwargs.get("attention_mask") is None:',
           "tests/integration/test_packing.py::test_an_unpacked_sequence_keeps_the_window_under_a_varlen_backend"),
    # GPU (run on the device: `python tools/mutants.py -k gpu`)
    Mutant("gpu: the Triton cross-entropy ignores the soft-cap", "src/qflash/kernels/xent.py",
           "CAPPED=cap is not None", "CAPPED=False", "tests/gpu/test_xent_kernel.py", gpu=True),
    Mutant("gpu: torch varlen kernel ignores the window", "src/qflash/model/attention.py",
           'kwargs["window_size"] = (_window_left(window), 0)', 'kwargs["window_size"] = (-1, 0)',
           "tests/gpu/test_gpu.py::test_varlen_backend_matches_per_document_sdpa", gpu=True),
    Mutant("gpu: kept varlen attention ignores the window", "src/qflash/model/attention.py",
           "0.0, True, False, scale=scale, window_size_left=left,", "0.0, True, False, scale=scale, window_size_left=-1,",
           "tests/gpu/test_gpu.py::test_varlen_backend_matches_per_document_sdpa", gpu=True),
    Mutant("gpu: compiled layers drop the LoRA term of the input gradient", "src/qflash/model/fused_lora.py",
           "return (_grad_input_op if torch.compiler.is_compiling() else _grad_input)(g, w, gb, a, scaling)",
           "return (_grad_input_op(g, w, gb, a, 0.0) if torch.compiler.is_compiling() else _grad_input(g, w, gb, a, "
           "scaling))",
           "tests/gpu/test_compile.py::test_compiled_layer_gradients_match_eager_tensor_by_tensor", gpu=True),
    Mutant("gpu: varlen attention ignores document boundaries", "src/qflash/model/attention.py",
           "return varlen_attn(q, k, v, cu_q, cu_k, max_q, max_k, scale=scaling, **kwargs)",
           "return varlen_attn(q, k, v, cu_q[[0, -1]], cu_k[[0, -1]], q.shape[0], k.shape[0], scale=scaling, "
           "**kwargs)",
           "tests/gpu/test_gpu.py::test_packed_logits_equal_per_document_logits_on_gpu", gpu=True),
    Mutant("gpu: varlen boundaries one token late", "src/qflash/model/attention.py",
           "return varlen_attn(q, k, v, cu_q, cu_k, max_q, max_k, scale=scaling, **kwargs)",
           "return varlen_attn(q, k, v, torch.where((cu_q > 0) & (cu_q < cu_q[-1]), cu_q + 1, cu_q), "
           "torch.where((cu_k > 0) & (cu_k < cu_k[-1]), cu_k + 1, cu_k), max_q + 1, max_k + 1, scale=scaling, "
           "**kwargs)",
           "tests/gpu/test_gpu.py::test_packed_logits_equal_per_document_logits_on_gpu", gpu=True),
    Mutant("bf16 allowed below Ampere", "src/qflash/model/loading.py",
           "and requested in (\"auto\", \"bf16\") and not gpu.bf16_supported():", "and False:",
           "tests/unit/test_capability.py"),
]


def tracked_copy(dst: Path) -> None:
    """The working tree's tracked files (uncommitted edits included) into `dst`; where the tree is not a git
    checkout (the GPU machine gets a copy without .git), src/, tests/, tools/ and configs/ as they are."""
    try:
        files = subprocess.run(["git", "ls-files", "-z"], cwd=REPO, capture_output=True, check=True).stdout
        names = list(filter(None, files.decode().split("\0")))
    except (OSError, subprocess.CalledProcessError):
        names = [str(f.relative_to(REPO)) for top in ("src", "tests", "tools", "configs", "data", "pyproject.toml")
                 for f in ([REPO / top] if (REPO / top).is_file() else sorted((REPO / top).rglob("*")))
                 if f.is_file() and "__pycache__" not in f.parts]
    for rel in names:
        src = REPO / rel
        if src.is_file():
            (dst / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dst / rel)


# Not listed: generation under torch.inference_mode instead of no_grad. With bitsandbytes' repack off, nothing in
# the models qflash trains keeps a tensor made during generation, so no test can tell the two apart (tried: it
# survives); no_grad stays as the safe choice for a model that trains next.


def run_test(copy: Path, test: str) -> tuple[int, str]:
    path = os.pathsep.join(filter(None, [str(copy / "src"), os.environ.get("PYTHONPATH", "")]))  # the copy first
    env = {**os.environ, "PYTHONPATH": path, "HF_HUB_OFFLINE": "1"}
    p = subprocess.run([sys.executable, "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider", test], cwd=copy,
                       env=env, capture_output=True, text=True, timeout=1200)
    return p.returncode, (p.stdout + p.stderr)[-1500:]


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("-k", default="", help="only mutations whose name contains this")
    parser.add_argument("--skip-baseline", action="store_true",
                        help="do not first run the target tests on the unbroken copy (only where they just passed in "
                             "the same session: the device's minutes are counted)")
    args = parser.parse_args(argv)
    import torch

    has_gpu = torch.cuda.is_available()
    chosen = [m for m in MUTANTS if args.k.lower() in m.name.lower()]
    copy = Path(tempfile.mkdtemp(prefix="qflash-mutants-"))
    failures = 0
    try:
        tracked_copy(copy)
        runnable = [m for m in chosen if has_gpu or not m.gpu]
        for test in [] if args.skip_baseline else dict.fromkeys(m.test for m in runnable):  # unbroken: all pass
            code, tail = run_test(copy, test)
            if code != 0:
                print(f"baseline FAILED  {test}\n{tail}")
                return 1
        if not args.skip_baseline:
            print(f"baseline: {len(set(m.test for m in runnable))} target tests pass on the unbroken copy", flush=True)
        for m in chosen:
            if m.gpu and not has_gpu:
                print(f"skipped   {m.name}  (needs a GPU: {m.test})")
                continue
            target = copy / m.path
            original = target.read_text(encoding="utf-8")
            count = original.count(m.old)
            if count != 1:
                print(f"BROKEN    {m.name}: the text to replace occurs {count} times in {m.path}")
                failures += 1
                continue
            target.write_text(original.replace(m.old, m.new), encoding="utf-8")
            t0 = time.perf_counter()
            try:
                code, tail = run_test(copy, m.test)
            finally:
                target.write_text(original, encoding="utf-8")
            caught = code == 1  # a test failed (2-5: errors, interrupted, no tests collected)
            if not caught:
                failures += 1
            verdict = "caught  " if caught else ("SURVIVED" if code == 0 else f"ERROR {code}")
            print(f"{verdict}  {m.name}  ({m.test}, {time.perf_counter() - t0:.0f}s)", flush=True)
            if code not in (0, 1):
                print(tail)
    finally:
        shutil.rmtree(copy, ignore_errors=True)
    print(f"{len(chosen)} mutations: {failures} not caught" if failures else f"{len(chosen)} mutations: all caught "
          "(or skipped where they need a GPU)")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
