"""qflash command line: argument parsing and calls into the library, nothing else."""

from __future__ import annotations

import argparse
import logging
import os
import sys

from qflash.errors import QflashError
from qflash.versions import warn_untested


def _quiet_libraries() -> None:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # qflash never downloads
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    import warnings

    import transformers

    # transformers/peft deprecation chatter about their own internals; nothing a user can act on.
    warnings.filterwarnings("ignore", category=FutureWarning, module=r"(transformers|peft)\.")

    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    # "kernels": bitsandbytes asks it at import, on AVX512-BF16 CPUs, for a Hub kernel for its repacked CPU
    # layout, which qflash never uses (model/loading.py keep_standard_nf4_layout); offline, it says so.
    for noisy in ("accelerate", "peft", "bitsandbytes", "torch", "kernels"):
        logging.getLogger(noisy).setLevel(logging.ERROR)


def cmd_train(args: argparse.Namespace) -> int:
    from qflash.config import load_config
    from qflash.train.loop import train

    cfg = load_config(args.config, args.overrides)
    train(cfg, overwrite=args.overwrite, force=args.force)
    return 0


def cmd_config_show(args: argparse.Namespace) -> int:
    from qflash.config import load_config

    cfg = load_config(args.config, args.overrides)
    sys.stdout.write(cfg.to_yaml())
    return 0


def cmd_config_explain(args: argparse.Namespace) -> int:
    from qflash.config import explain

    sys.stdout.write(explain(args.key))
    return 0


def _sampling(args: argparse.Namespace):
    from qflash.infer.options import SamplingOptions

    return SamplingOptions(
        temperature=args.temperature, top_p=args.top_p, max_new_tokens=args.max_new_tokens,
        repetition_penalty=args.repetition_penalty, seed=args.seed,
    ).checked(lambda f: "--" + f.replace("_", "-"))


def _engine(args: argparse.Namespace):
    from qflash.infer.engine import Engine
    from qflash.infer.generate import load_target

    return Engine(load_target(args.target, args.model, args.adapter, args.device, args.quant, args.trust_remote_code))


def cmd_chat(args: argparse.Namespace) -> int:
    from qflash.infer.chat import run_one_shot, run_repl

    opts = _sampling(args)
    engine = _engine(args)
    if args.prompt is not None:
        return run_one_shot(engine, opts, args.prompt, args.system)
    return run_repl(engine, opts, args.system)


def cmd_generate(args: argparse.Namespace) -> int:
    from pathlib import Path

    from qflash.infer.batch import run_generate

    opts = _sampling(args)
    run_generate(lambda: _engine(args), Path(args.input), Path(args.output), opts, batch_size=args.batch_size,
                 overwrite=args.overwrite)
    return 0


def cmd_serve(args: argparse.Namespace) -> int:
    from qflash.infer.serve import ServeLimits, check_bind, resolve_api_key, serve

    opts = _sampling(args)
    api_key = resolve_api_key(args.api_key)
    check_bind(args.host, api_key)  # before the model loads: a refused bind should not wait for it
    limits = ServeLimits(args.max_connections, args.max_queue, args.timeout).checked()
    engine = _engine(args)
    return serve(engine, host=args.host, port=args.port, model_id=args.model_name or engine.loaded.name,
                 defaults=opts, api_key=api_key, limits=limits)


def cmd_data_check(args: argparse.Namespace) -> int:
    from qflash.data.commands import run_check

    return run_check(
        args.source, args.overrides, fmt=args.format, columns=args.columns, prompt_template=args.prompt_template,
        on_error=args.on_error, model=args.model, skipped=args.skipped,
    )


def cmd_data_preview(args: argparse.Namespace) -> int:
    from qflash.data.commands import run_preview

    return run_preview(args.source, args.overrides, fmt=args.format, columns=args.columns,
                       prompt_template=args.prompt_template, model=args.model, n=args.n)


def cmd_merge(args: argparse.Namespace) -> int:
    from qflash.export.merge import MergeOptions, merge

    merge(MergeOptions(args.source, args.output, dtype=args.dtype, max_shard_size=args.max_shard_size, base=args.base,
                       overwrite=args.overwrite, check=not args.no_check, check_samples=args.check_samples,
                       trust_remote_code=args.trust_remote_code))
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    from qflash.export.gguf_export import ExportOptions, export

    export(ExportOptions(args.source, format=args.format, dtype=args.dtype, output=args.output, base=args.base,
                         overwrite=args.overwrite, check=not args.no_check, check_samples=args.check_samples,
                         trust_remote_code=args.trust_remote_code))
    return 0


def cmd_compare(args: argparse.Namespace) -> int:
    from qflash.demo import compare_and_print

    ok = compare_and_print(args.run, args.n, args.max_new_tokens, args.trust_remote_code)
    return 0 if ok else 1


def cmd_eval(args: argparse.Namespace) -> int:
    from qflash.eval.command import run_eval

    return run_eval(args.run, data=args.data, control=args.control, max_new_tokens=args.max_new_tokens, limit=args.limit,
                    trust_remote_code=args.trust_remote_code)


def cmd_demo(args: argparse.Namespace) -> int:
    from qflash.demo import run_demo

    return run_demo(args.config, args.overrides)


def cmd_bench(args: argparse.Namespace) -> int:
    from pathlib import Path

    from qflash.bench.runner import run_bench
    from qflash.model.loading import qflash_home

    if args.gpus > 1 and "WORLD_SIZE" not in os.environ:
        from qflash.bench.distributed import relaunch

        return relaunch(args.gpus, args.strategy, sys.argv[1:])
    if "WORLD_SIZE" in os.environ or args.as_ranks > 1:
        from qflash.bench.distributed import run_data_parallel

        for wl in args.workload.split(","):
            run_data_parallel(args.shape, wl, steps=args.steps, warmup=args.warmup, dropout=args.dropout,
                              attention=args.attention, out_dir=Path(args.out), overrides=args.set,
                              cache=Path(args.cache) if args.cache else qflash_home() / "bench-models",
                              loss_steps=args.parity, as_ranks=args.as_ranks)
        return 0
    run_bench(
        args.shape, args.workload.split(","), against=args.against, steps=args.steps, warmup=args.warmup,
        dropout=args.dropout, attention=args.attention, out_dir=Path(args.out), parity_steps=args.parity,
        cache=Path(args.cache) if args.cache else qflash_home() / "bench-models", overrides=args.set,
    )
    return 0


def _add_inference_args(p: argparse.ArgumentParser, max_new_tokens_help: str | None = None) -> None:
    """What chat, generate and serve share: what to load, and the sampling options."""
    from qflash.infer.options import SamplingOptions, option_help

    p.add_argument("target", nargs="?", metavar="MODEL_OR_RUN",
                   help="a run or adapter directory (base model from its config), or a model: HF directory, "
                        ".gguf file or smollm2-135m-instruct (the default)")
    p.add_argument("--model", help="base model for --adapter (default: the run's)")
    p.add_argument("--adapter", help="a run directory or an adapter directory")
    p.add_argument("--quant", default="auto", choices=["auto", "nf4", "none"],
                   help="auto: a run's base as it was trained (NF4), a plain model unquantized")
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    _add_trust_remote_code(p)
    doc, d = option_help(), SamplingOptions()
    p.add_argument("--temperature", type=float, default=d.temperature, help=doc["temperature"])
    p.add_argument("--top-p", type=float, default=d.top_p, help=doc["top_p"])
    p.add_argument("--max-new-tokens", type=int, default=d.max_new_tokens, help=max_new_tokens_help or doc["max_new_tokens"])
    p.add_argument("--repetition-penalty", type=float, default=d.repetition_penalty, help=doc["repetition_penalty"])
    p.add_argument("--seed", type=int, default=d.seed, help=doc["seed"])


def _add_trust_remote_code(p: argparse.ArgumentParser) -> None:
    p.add_argument("--trust-remote-code", action="store_true",
                   help="let the model's own Python code run (only here: a run directory's saved config cannot turn it on)")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="qflash", description="QLoRA fine-tuning with FlashAttention and packed sequences.")
    sub = p.add_subparsers(dest="command", required=True)
    for add in (_add_train, _add_config, _add_data, _add_chat, _add_generate, _add_serve, _add_merge, _add_export,
                _add_eval, _add_compare, _add_bench, _add_demo):
        add(sub)
    return p


def _add_train(sub) -> None:

    t = sub.add_parser("train", help="fine-tune a model with NF4 QLoRA")
    t.add_argument("config", help="YAML config, e.g. configs/demo.yaml")
    t.add_argument("overrides", nargs="*", help="dotted overrides, e.g. train.max_steps=20 data.vars.name=Nova")
    t.add_argument("--overwrite", action="store_true", help="start over: delete the adapter, checkpoints and logs in output_dir")
    t.add_argument("--force", action="store_true", help="resume even though the config, data or tokenizer changed")
    t.set_defaults(fn=cmd_train)


def _add_config(sub) -> None:
    c = sub.add_parser("config", help="inspect configs")
    csub = c.add_subparsers(dest="config_command", required=True)
    show = csub.add_parser("show", help="print the resolved config")
    show.add_argument("config")
    show.add_argument("overrides", nargs="*")
    show.set_defaults(fn=cmd_config_show)
    explain = csub.add_parser("explain", help="a key's documentation, type and default (every key when none is given)")
    explain.add_argument("key", nargs="?", help="a dotted key, e.g. lora.r or kernels (a section)")
    explain.set_defaults(fn=cmd_config_explain)


def _add_data(sub) -> None:
    data = sub.add_parser("data", help="validate and inspect training data")
    dsub = data.add_subparsers(dest="data_command", required=True)
    for name, fn, help_ in (
        ("check", cmd_data_check, "validate a data file/directory or a config's datasets and print statistics"),
        ("preview", cmd_data_preview, "show rendered samples: trained tokens highlighted, masked ones dimmed"),
    ):
        dp = dsub.add_parser(name, help=help_)
        dp.add_argument("source", help="a data file or directory, or a YAML config")
        dp.add_argument("overrides", nargs="*", help="dotted config overrides, e.g. data.max_len=2048")
        dp.add_argument("--format", help="force the record format (alpaca, messages, sharegpt, text, columns)")
        dp.add_argument("--columns", help="role=column pairs for format columns, e.g. user=ask,assistant=answer")
        dp.add_argument("--prompt-template", help="format columns: the user turn from several columns, e.g. '{title}\\n{ask}'")
        dp.add_argument("--model", help="whose tokenizer and chat template to use (default: the config's, else the embedded model)")
        if name == "check":
            dp.add_argument("--on-error", choices=["fail", "skip"], help="fail (exit 2 on problems) or skip them")
            dp.add_argument("--skipped", help="where skip mode writes the skipped records (JSONL)")
        else:
            dp.add_argument("-n", type=int, default=3, help="samples to show")
        dp.set_defaults(fn=fn)


def _add_chat(sub) -> None:
    ch = sub.add_parser("chat", help="talk to a model or a fine-tuned run (streamed, multi-turn; --prompt: one reply)")
    _add_inference_args(ch)
    ch.add_argument("--prompt", help="ask one question, print the reply and exit")
    ch.add_argument("--system", help="system prompt")
    ch.set_defaults(fn=cmd_chat)


def _add_generate(sub) -> None:
    gen = sub.add_parser("generate", help="answer a JSONL file of prompts in batches (resumable)")
    _add_inference_args(gen)
    gen.add_argument("--input", required=True, help='JSONL: {"prompt": ...} or {"messages": [...]} per line, "id" optional')
    gen.add_argument("--output", required=True, help="JSONL of answers; ids already in it are skipped (resume)")
    gen.add_argument("--batch-size", type=int, default=8, help="prompts per generate call (sorted by length)")
    gen.add_argument("--overwrite", action="store_true", help="start --output over instead of resuming it")
    gen.set_defaults(fn=cmd_generate)


def _add_serve(sub) -> None:
    sv = sub.add_parser("serve", help="OpenAI-compatible HTTP server (/v1/chat/completions, /v1/models)")
    # The one option whose meaning differs here: a ceiling, not only a default.
    _add_inference_args(sv, max_new_tokens_help=(
        "the most new tokens a request may ask for (max_tokens / max_completion_tokens): a request asking for "
        "more is refused with 400 naming this limit, as OpenAI refuses a max_tokens over a model's limit; a "
        "request that names none gets this many, or what the context window leaves"))
    sv.add_argument("--host", default="127.0.0.1", help="address to bind; other than loopback needs --api-key")
    sv.add_argument("--port", type=int, default=8000, help="port (0 = any free one, printed at start)")
    sv.add_argument("--api-key", help="require 'Authorization: Bearer KEY' (default: $QFLASH_API_KEY)")
    sv.add_argument("--model-name", help="the model id clients send (default: the run's or the model's name)")
    from qflash.infer.options import option_help
    from qflash.infer.serve_api import ServeLimits

    doc, d = option_help(ServeLimits), ServeLimits()
    sv.add_argument("--max-connections", type=int, default=d.max_connections, help=doc["max_connections"])
    sv.add_argument("--max-queue", type=int, default=d.max_queue, help=doc["max_queue"])
    sv.add_argument("--timeout", type=float, default=d.timeout, help=doc["timeout"])
    sv.set_defaults(fn=cmd_serve)


def _add_merge(sub) -> None:
    mg = sub.add_parser("merge", help="merge a run's LoRA adapter into the 16-bit base model (sharded safetensors)")
    mg.add_argument("source", metavar="RUN_OR_ADAPTER_DIR", help="a run directory or a PEFT adapter directory")
    mg.add_argument("--output", required=True, help="directory for the merged model (created; must be empty)")
    mg.add_argument("--dtype", default="bf16", choices=["bf16", "fp16", "fp32"], help="dtype of the merged weights")
    mg.add_argument("--max-shard-size", default="2GB", help="largest safetensors file, e.g. 2GB, 500MB")
    mg.add_argument("--base", help="the base model (HF dir, .gguf, smollm2-135m-instruct); default: the run's model.path")
    mg.add_argument("--overwrite", action="store_true", help="replace a non-empty --output")
    mg.add_argument("--check-samples", type=int, default=4, help="held-out samples for the fidelity check")
    mg.add_argument("--no-check", action="store_true", help="skip the fidelity check (logits vs base+adapter)")
    _add_trust_remote_code(mg)
    mg.set_defaults(fn=cmd_merge)


def _add_export(sub) -> None:
    ex = sub.add_parser("export", help="a run (merged) or a model as one GGUF file for llama.cpp / Ollama, checked")
    ex.add_argument("source", metavar="RUN_OR_MODEL", help="a run directory, an adapter directory, or a model")
    ex.add_argument("--format", default="gguf", choices=["gguf"])
    ex.add_argument("--dtype", default="q8_0", choices=["f16", "bf16", "q8_0", "q4_0"], help="the GGUF's weight type")
    ex.add_argument("--output", help="the .gguf file (default: RUN/export/NAME-DTYPE.gguf)")
    ex.add_argument("--base", help="the base model for a run (default: the run's model.path)")
    ex.add_argument("--overwrite", action="store_true", help="replace an existing --output")
    ex.add_argument("--check-samples", type=int, default=4, help="held-out samples for the fidelity check")
    ex.add_argument("--no-check", action="store_true", help="skip the fidelity check (the GGUF read back)")
    _add_trust_remote_code(ex)
    ex.set_defaults(fn=cmd_export)


def _add_eval(sub) -> None:
    ev = sub.add_parser("eval", help="held-out loss, identity accuracy, stop rate, spill and closeness, base vs fine-tuned")
    ev.add_argument("run", help="run directory (output_dir of qflash train); writes RUN/eval/report.{json,md}")
    ev.add_argument("--data", action="append", metavar="FILE",
                    help="held-out data instead of the run's (repeatable); its questions are asked too")
    ev.add_argument("--control", metavar="FILE", help="control prompts instead of eval.control_prompts (spill, closeness)")
    ev.add_argument("--max-new-tokens", type=int, default=None,
                    help="answer length for held-out questions (default: eval.max_new_tokens or the longest reference + 16)")
    ev.add_argument("--limit", type=int, default=None, help="ask only the first N held-out questions")
    _add_trust_remote_code(ev)
    ev.set_defaults(fn=cmd_eval)


def _add_compare(sub) -> None:
    cmp_ = sub.add_parser("compare", help="held-out identity questions: base model vs fine-tuned, side by side")
    cmp_.add_argument("run", help="run directory (output_dir of qflash train)")
    cmp_.add_argument("-n", type=int, default=None, help="questions to ask (default: the run's eval.identity_samples)")
    cmp_.add_argument("--max-new-tokens", type=int, default=None)
    _add_trust_remote_code(cmp_)
    cmp_.set_defaults(fn=cmd_compare)


def _add_bench(sub) -> None:
    b = sub.add_parser("bench", help="training throughput and memory on a named model shape (GPU)")
    b.add_argument("--shape", default="qwen2.5-7b", help="qwen2.5-0.5b, qwen2.5-3b, qwen2.5-7b, llama3-8b, qwen3-8b, mistral-7b")
    b.add_argument("--workload", default="fixed,varlen", help="comma-separated: fixed, varlen, maxlen, dpo (preference pairs; --against trl, trl-per-step); \"\" with --parity N: the parity run alone")
    b.add_argument("--against", help="also run the seeds' recipe in the same process: reference (as the seeds "
                   "have it, no mixed precision), reference-amp (with bf16 autocast), or both comma-separated; for --workload "
                   "dpo: trl (TRL's DPOTrainer + PEFT + bitsandbytes, reference precomputed) and/or trl-per-step "
                   "(TRL's default: a reference forward every step), when trl is installed")
    b.add_argument("--steps", type=int, default=5, help="timed steps (median reported)")
    b.add_argument("--warmup", type=int, default=2)
    b.add_argument("--dropout", type=float, default=0.1, help="LoRA dropout, both recipes")
    b.add_argument("--attention", default="auto", choices=["auto", "flash_attn", "torch_varlen", "sdpa", "eager"])
    b.add_argument("--parity", type=int, default=0, help="also compare per-step losses for N steps (dropout 0)")
    b.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="qflash config override for the qflash side, repeatable (e.g. --set lora.fused=false)")
    b.add_argument("--out", default="bench/results", help="where the JSON results go")
    b.add_argument("--cache", help="where random-weight models are written (default $QFLASH_HOME/bench-models)")
    b.add_argument("--gpus", type=int, default=1, help="N GPUs (relaunches itself under accelerate launch); "
                   "each GPU trains the workload's micro-batch, --parity N logs N steps of loss")
    b.add_argument("--as-ranks", type=int, default=1, help="one GPU trains the global batch of N ranks "
                   "(gradient accumulation), to compare losses with --gpus N")
    b.add_argument("--strategy", default="ddp", choices=["ddp", "fsdp2", "deepspeed"],
                   help="with --gpus N: configs/accelerate/{ddp,fsdp2,deepspeed_zero2}.yaml")
    b.set_defaults(fn=cmd_bench)


def _add_demo(sub) -> None:
    d = sub.add_parser("demo", help="fine-tune the embedded model on the identity set and compare before/after")
    d.add_argument("--config", default=None,
                   help="default: configs/demo.yaml of the working directory, else of the qflash source checkout")
    d.add_argument("overrides", nargs="*", help="e.g. data.vars.name=Nova data.vars.author=Acme")
    d.set_defaults(fn=cmd_demo)


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    # Overrides may follow flags (`data check f.csv --columns user=ask data.max_len=512`): argparse
    # leaves those as unknown; they are overrides when they look like KEY=VALUE.
    stray = [a for a in extra if a.startswith("-") or "=" not in a]
    if stray or (extra and not hasattr(args, "overrides")):
        parser.error(f"unrecognized arguments: {' '.join(stray or extra)}")
    if extra:
        args.overrides = [*args.overrides, *extra]
    _quiet_libraries()
    warn_untested()
    try:
        return args.fn(args)
    except QflashError as e:
        print(f"qflash: error: {e}", file=sys.stderr)
        return e.exit_code
    except KeyboardInterrupt:
        print("qflash: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
