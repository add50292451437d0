"""The config schema (dataclasses), YAML loading, dotted command-line overrides and validation.

A YAML key maps to exactly one dataclass field; the code that uses a setting reads that field.
Every problem is raised as a ConfigError whose message says where (file:line or the override),
which key, and what is wrong, so the CLI can print it as one line.
"""

from __future__ import annotations

import ast
import codecs
import dataclasses
import difflib
import functools
import inspect
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Union

import yaml

from qflash.errors import ConfigError

EMBEDDED_MODEL = "smollm2-135m-instruct"

DType = Literal["auto", "bf16", "fp16", "fp32"]

CHAT_TEMPLATES = ("chatml", "gemma", "llama3", "mistral", "qwen")
"""The built-in chat templates (data.template); qflash/data/templates/NAME.jinja, chatml in data/template.py."""


def template_problem(value: str | None) -> str | None:
    """What is wrong with a data.template value (None when fine): a built-in name or an existing .jinja file."""
    if value is None or value in CHAT_TEMPLATES:
        return None
    if value.endswith(".jinja"):
        return None if Path(value).expanduser().is_file() else \
            f"is not a file ({value}); give the path of a Jinja chat template, or a built-in name"
    near = difflib.get_close_matches(value, CHAT_TEMPLATES, n=1, cutoff=0.5)
    hint = f"did you mean '{near[0]}'? " if near else ""
    return (f"is not a built-in template ({value!r}); {hint}built-in: {', '.join(CHAT_TEMPLATES)}, "
            "or give the path of a .jinja file")


@dataclass(frozen=True)
class Needs:
    """A combination rule: `switch`, set to true in the file or on the command line, takes effect only while
    `key` holds one of `allowed`. Each section lists its switches' rules in `requires`, beside the fields;
    check_combinations applies them. A switch left at its default is never refused (the code then skips it
    quietly, as it always has): only what the user asked for explicitly is."""

    switch: str
    """The dependent switch, as a dotted key (kernels.keep_attention)."""
    key: str
    """The prerequisite, as a dotted key (train.offload_activations)."""
    allowed: tuple[Any, ...]
    """Values of `key` under which `switch` does anything; the first is the one the error suggests."""
    why: str
    """What the switch needs the prerequisite for, said in the error."""


@dataclass
class ModelConfig:
    path: str = EMBEDDED_MODEL
    """A local Hugging Face model directory, a .gguf file, or `smollm2-135m-instruct` (the embedded default)."""
    trust_remote_code: bool = False
    """Run Python code shipped inside the model directory. Off unless you trust its author."""
    adapter: str | None = None
    """Start from this trained adapter (a run directory or an adapter directory) instead of fresh LoRA weights,
    e.g. preference tuning after supervised tuning (`model.adapter: runs/sft`). Its LoRA settings (r, alpha,
    targets, rsLoRA, DoRA) must equal this run's lora section."""
    add_tokens: list[str] = field(default_factory=list)
    """New special tokens added to the tokenizer before training, e.g. ['<|tool_call|>']; the embedding and lm_head
    grow to hold them when they have no spare rows. Their rows are learned only through lora.modules_to_save,
    which must then name the input embedding and lm_head. The tokenizer is saved with the adapter."""


@dataclass
class QuantConfig:
    mode: Literal["nf4", "none"] = "nf4"
    """nf4: base weights frozen in 4-bit NormalFloat (bitsandbytes); none: base kept in 16/32-bit."""
    double_quant: bool = True
    """Quantize the NF4 block scales too (about 0.4 bit per weight saved)."""
    compute_dtype: DType = "auto"
    """dtype of matmuls and activations; auto = bf16 on GPU, fp32 on CPU (where bf16 is far slower;
    measured: see bench/NOTES.md "Numbers quoted by config fields")."""
    residual_dtype: Literal["fp32", "compute"] = "fp32"
    """fp32: embeddings and norms kept in fp32, so the residual stream is fp32 (matmuls still run in
    compute_dtype). compute: all in compute_dtype, less memory, but small early LoRA updates are lost to
    bf16 rounding, so the loss falls more slowly (measured: see bench/NOTES.md "Numbers quoted by config
    fields"; bench/experiments)."""


@dataclass
class LoraConfig:
    r: int = 16
    """Rank of the LoRA update."""
    alpha: float = 32.0
    """Scale numerator: the update is scaled by alpha/r (alpha/sqrt(r) with rslora)."""
    dropout: float = 0.05
    """Dropout on the LoRA input."""
    target_modules: list[str] = field(default_factory=lambda: ["all-linear"])
    """Module names to adapt (q_proj, v_proj, ...) or `all-linear` for every linear layer of the blocks."""
    rslora: bool = False
    """Rank-stabilized scaling alpha/sqrt(r)."""
    dora: bool = False
    """Weight-decomposed LoRA (DoRA)."""
    modules_to_save: list[str] = field(default_factory=list)
    """Modules trained whole (not through LoRA) and saved in the adapter, by name: PEFT's modules_to_save, e.g.
    [embed_tokens, lm_head] (Qwen-1: [wte, lm_head]), to train the rows of model.add_tokens. They stay 16/32-bit
    (never NF4) and are trained on fp32 copies; a table tied to lm_head stays tied. kernels.fused_ce and
    train.embedding_on_cpu skip a trained lm_head / embedding (said in the banner)."""
    fused: bool = True
    """NF4 base + LoRA in one autograd function (the update added inside the base GEMM's epilogue);
    false = PEFT's own 4-bit LoRA layers. DoRA always uses PEFT's."""

    requires = (
        Needs("lora.fused", "lora.dora", (False,), "DoRA always runs PEFT's own layer, never the fused one"),
    )


@dataclass
class DatasetSpec:
    path: str = ""
    """A data file (JSON, JSONL, CSV/TSV, Parquet) or a directory of them."""
    format: Literal["auto", "alpaca", "messages", "sharegpt", "text", "columns"] = "auto"
    """Record format; auto detects it from the keys of each record."""
    columns: dict[str, str] = field(default_factory=dict)
    """For format=columns: role -> column, e.g. {user: ask, assistant: answer} (system optional)."""
    prompt_template: str | None = None
    """For format=columns: the user turn built from several columns, e.g. '[{department}] {title}\\n{ask}'."""
    weight: float = 1.0
    """Sampling weight when several datasets are mixed (1.0 = each record once per epoch)."""


@dataclass
class ReplayConfig:
    prompts: str = ""
    """General prompts whose base-model answers are mixed into training (empty = no replay): JSON/JSONL of
    strings, {"prompt": ...} records, or any chat format (its replies are ignored)."""
    ratio: float = 0.5
    """Replay samples per training sample (1.0 = as many as the training set; repeated or subsampled, seeded)."""
    max_new_tokens: int = 96
    """Length limit of the base model's greedy answers."""
    system: str | None = None
    """System prompt put before each replay prompt (none by default)."""
    unfinished: Literal["keep", "drop"] = "keep"
    """An answer cut at max_new_tokens: keep (its tokens are trained, no end-of-turn is) or drop (counted)."""


@dataclass
class DataConfig:
    datasets: list[DatasetSpec] = field(default_factory=list)
    """Training datasets."""
    eval_datasets: list[DatasetSpec] = field(default_factory=list)
    """Held-out datasets (eval loss, identity questions)."""
    vars: dict[str, str] = field(default_factory=dict)
    """Values for placeholders in the data: {{name}} / <NAME> take vars.name, {{author}} / <AUTHOR> vars.author."""
    eval_ratio: float = 0.0
    """Share of the training records held out for evaluation (seeded), besides eval_datasets."""
    max_len: int = 1024
    """Longest tokenized sample, in tokens."""
    too_long: Literal["truncate", "split", "drop", "fail"] = "fail"
    """A sample longer than max_len: truncate (keeps trained tokens and the final end-of-turn), drop (counted), fail,
    or split — for samples trained on every token (raw text, train_on=all): consecutive pieces of max_len tokens,
    each seeing the last token of the one before, so every token is trained once (long documents, continued
    pretraining; full pieces pack into bins of one length, which attention.cudnn and train.cuda_graphs reward)."""
    on_error: Literal["fail", "skip"] = "fail"
    """A bad record: fail (exit 2, list the problems) or skip (count per reason, write them to a JSONL)."""
    encoding: str = "auto"
    """Text encoding of the data files that are neither UTF-8 nor marked by a byte-order mark (e.g. big5, gbk,
    shift_jis, cp1251, cp1252); auto detects it among GB18030, Big5, EUC-KR, Shift-JIS, EUC-JP, CP1251 and KOI8-R
    and refuses a file whose encoding it cannot tell. `qflash data check` shows what each file is read as."""
    num_proc: int = 0
    """Worker processes for tokenizing datasets of 2,000+ records; 0 = one per core (up to 8)."""
    cache: bool = True
    """Cache tokenized data (Arrow) under $QFLASH_HOME/data-cache, keyed by files + tokenizer + settings."""
    template: str | None = None
    """Chat template to use instead of the tokenizer's (needed when it has none, as base models): chatml, llama3,
    qwen (Qwen3-style: reasoning kept for the last reply only), gemma, mistral, or the path of a .jinja file."""
    train_reasoning: bool = True
    """Train the reasoning of trained replies (reasoning_content, or <think>...</think> in content); false masks it
    and trains only the answer (and its tool calls) after it."""
    train_on: Literal["assistant", "last_assistant", "all"] = "assistant"
    """Which tokens carry loss: every assistant turn (with its end-of-turn token), only the last one, or all."""
    packing: bool = True
    """Pack samples best-fit-decreasing into bins of max_len tokens; documents never attend to each other."""
    replay: ReplayConfig = field(default_factory=ReplayConfig)
    """Replay of the base model's own answers to general prompts, so that only the new thing is learned."""


@dataclass
class TrainConfig:
    micro_batch_size: int = 4
    """Samples per forward/backward pass."""
    grad_accum: int = 1
    """Micro-batches per optimizer step."""
    lr: float = 2e-4
    """Peak learning rate."""
    weight_decay: float = 0.0
    """AdamW weight decay on the LoRA weights."""
    adam_betas: list[float] = field(default_factory=lambda: [0.9, 0.999])
    """AdamW's (beta1, beta2): the decay of the gradient's running mean and of its square's; some recipes
    lower beta2 (e.g. [0.9, 0.95]) for steadier updates on small batches."""
    adam_eps: float = 1e-8
    """AdamW's epsilon, added to the root of the squared-gradient average."""
    warmup_ratio: float = 0.03
    """Share of the steps spent warming up linearly from 0 to lr."""
    schedule: Literal["cosine", "linear", "constant"] = "cosine"
    """Learning-rate decay after warmup."""
    max_steps: int | None = None
    """Optimizer steps to run; when unset, `epochs` decides."""
    epochs: float = 1.0
    """Passes over the training data (used when max_steps is unset)."""
    seed: int = 42
    """Seed of LoRA init, data order and dropout."""
    optimizer: Literal["auto", "adamw", "paged_adamw_32bit", "paged_adamw_8bit"] = "auto"
    """auto = torch AdamW (fused on GPU); paged_adamw_* = bitsandbytes paged optimizers (GPU only)."""
    max_grad_norm: float = 1.0
    """Clip the global gradient norm; 0 disables."""
    gradient_checkpointing: bool = True
    """Recompute activations in backward (non-reentrant) to save memory."""
    offload_activations: bool = True
    """With gradient_checkpointing, on a GPU: each decoder layer's checkpointed input (the residual stream,
    tokens x hidden, fp32) waits for its backward in pinned CPU memory, copied out on a side stream and
    brought back one layer ahead. Same gradients; frees that tensor's GPU memory for a little speed
    (measured: see bench/NOTES.md "Numbers quoted by config fields"). Pins that much host memory (layers x
    tokens x hidden x 4 bytes); an input that would leave the host short (less than max(8 GB, 10%) available)
    stays on the GPU, said once. Ignored on the CPU and under FSDP2."""
    embedding_on_cpu: bool = True
    """On a GPU: the frozen input-embedding table stays in CPU memory and only the looked-up rows go to the
    GPU (exact; frees the table's GPU memory, measured: see bench/NOTES.md "Numbers quoted by config
    fields"). Not when the table is tied to lm_head or trained. Ignored on the CPU."""
    cuda_graphs: bool | Literal["auto"] = "auto"
    """On a GPU, single process: each micro-batch shape's forward and backward is captured into a CUDA graph
    on its second appearance and replayed after that (up to 4 shapes; the others run eagerly), so the CPU's
    per-layer launch work stops bounding the step. Same math. auto = on for models under 3B parameters (small
    models gain much; a 7B gained nothing and peaked higher, so off; measured: see bench/NOTES.md "Numbers
    quoted by config fields"); true/false force it. Never for steps that draw random numbers (lora.dropout > 0)
    nor several processes. Pays where shapes repeat (fixed-length bins, raw text); supervised batches rarely
    repeat. train/graphs.py."""
    device: Literal["auto", "cpu", "cuda"] = "auto"
    """Where to train; auto = cuda when available."""
    log_every: int = 1
    """Write metrics every N steps."""
    save_every: int = 200
    """Write a checkpoint every N optimizer steps (and always at the end)."""
    keep: int = 2
    """How many of the newest checkpoints to keep."""
    resume: str = "auto"
    """auto: continue from the newest complete checkpoint in output_dir; never: start fresh; or a checkpoint path."""
    max_bad_steps: int = 5
    """Abort after this many consecutive steps with a non-finite loss or gradient (each one is skipped)."""
    eval_every: int = 0
    """Held-out loss (token-weighted) every N optimizer steps and at the end, into metrics.jsonl; 0 = off."""
    objective: Literal["sft", "dpo", "orpo", "simpo"] = "sft"
    """What training optimizes. sft: next-token loss on the answers. dpo, orpo, simpo: preference tuning on
    pairs (a prompt with a chosen and a rejected answer; data/preference.py reads them), with the `pref` section's
    parameters. dpo compares with a reference: the model as the run starts (the base with fresh LoRA, or
    model.adapter), its log-probabilities computed once before the first step; orpo and simpo need none."""

    requires = (
        Needs("train.offload_activations", "train.gradient_checkpointing", (True,),
              "what it offloads is the checkpointed layer input"),
    )


@dataclass
class PrefConfig:
    beta: float | None = None
    """dpo and simpo: how sharply the loss separates chosen from rejected (the reward's scale). Unset: 0.1 for
    dpo, 2.0 for simpo (the papers' and TRL's usual values)."""
    loss_type: Literal["sigmoid", "ipo", "hinge"] = "sigmoid"
    """dpo's loss of the reward margin: sigmoid (DPO), ipo (IPO: squared distance to 1/(2 beta), on per-token
    average log-probabilities), hinge (SLiC)."""
    label_smoothing: float = 0.0
    """dpo (sigmoid) and simpo: the share of pairs assumed mislabelled (conservative DPO); 0 = none."""
    simpo_gamma: float = 0.5
    """simpo: the target reward margin gamma (the loss pushes beta x margin past it)."""
    orpo_lambda: float = 0.1
    """orpo: weight of the odds-ratio term beside the chosen answers' next-token loss."""
    rpo_alpha: float = 0.0
    """dpo: weight of the chosen answers' next-token loss (per token) added to the pair loss (RPO; TRL's
    rpo_alpha, LLaMA-Factory's pref_ftx). DPO alone can push up what separates the answers (a first word) while
    the chosen answers themselves grow less likely, and greedy answers degenerate into repeating it; a weight
    near 1 keeps them fluent. 0 = plain DPO."""


@dataclass
class AttentionConfig:
    backend: Literal["auto", "flash_attn", "torch_varlen", "sdpa", "eager"] = "auto"
    """auto: flash-attn if installed, else PyTorch's varlen FlashAttention-2 on GPU, else SDPA (CPU)."""
    cudnn: bool | Literal["auto"] = "auto"
    """Packed batches whose documents all have one length (text cut beforehand into equal chunks, a
    micro-batch holding one long document, the bench's `fixed`; supervised data rarely qualifies) run
    through cuDNN's fused attention (SDPA's CUDNN backend, native GQA) instead of the varlen
    FlashAttention-2 kernel: the same causal attention per document, rounded differently at bf16 level, and
    faster on Hopper (measured: see bench/NOTES.md "Numbers quoted by config fields"). auto = on with backend
    torch_varlen on a Hopper or newer GPU and no attention dropout, for documents up to 16,384 tokens (the
    longest measured); batches of mixed lengths keep the varlen kernel (torch 2.11's ragged cuDNN path gave
    wrong gradients there). true = any length, also with flash_attn; false = never."""


@dataclass
class KernelsConfig:
    """Speed switches that leave the math unchanged (each has a plain PyTorch twin tested on CPU)."""

    fused_norm: bool = True
    """With lora.fused: RMSNorm that reads the (fp32) residual and writes the compute dtype in one fused
    kernel (torch.compile on CUDA, the same PyTorch code eagerly on CPU); false = transformers' own norm."""
    fused_ce: bool = True
    """lm_head + cross-entropy in one autograd function that computes the hidden states' gradient in the
    forward, chunk by chunk (two lm_head-sized GEMMs instead of three, nothing recomputed; one chunk of
    logits at a time). Exact: the same compute-dtype logits, fp32 loss and softmax gradient,
    compute-dtype GEMMs (in bf16 the loss scale multiplies after the GEMM instead of before: rounding
    only). Used when lm_head is a frozen plain linear without bias (else said once, and the loss falls
    back); false = lm_head in chunks under activation checkpointing."""
    lean_recompute: bool = True
    """With lora.fused and activation checkpointing (Llama, Mistral, Qwen2, Qwen3 layers): the recompute in
    backward skips mlp.down_proj's GEMMs, whose output only feeds the residual add that backward does not
    read (its inputs are still saved). Exact; false = the recompute reruns the whole layer."""
    lean_tail_in_graph: bool = False
    """With lean_recompute, compile_layers and train.offload_activations: trace the skip into the compiled
    recompute instead of running down_proj eagerly (a graph break per layer and pass, with dynamo's guards and
    a resumed graph each time). Faster where the CPU limits the step (small models gain most, a 7B little);
    costs about one more MLP activation at the backward's peak (measured: see bench/NOTES.md "Numbers quoted
    by config fields"). Off by default: on a 7B that extra memory crosses the memory target; turn it on for
    small models. Exact either way."""
    keep_attention: bool = False
    """With train.offload_activations and attention.backend torch_varlen: each layer's attention output and
    log-sum-exp from the forward wait for its backward in pinned CPU memory beside the layer input (pinned:
    tokens x hidden x 2 bytes per layer), so the recompute runs no attention forward: FlashAttention's
    backward reads only q, k, v, the output and the lse. Same bits (CPU-tested). Off by default until measured
    on a GPU (the expected gain, the recompute's share of attention time: see bench/NOTES.md "Numbers quoted
    by config fields")."""
    traced_dequant: bool = True
    """With lora.fused and compile_layers: NF4 dequantization written as tensor ops inside the compiled layer
    (one fused kernel per weight and pass instead of bitsandbytes' two custom ops and their Python dispatch).
    Bit-identical (kernels/nf4.py); false = bitsandbytes' ops. Eager code always uses bitsandbytes'."""
    compile_layers: bool | Literal["auto"] = "auto"
    """torch.compile every decoder layer (CUDA only: ignored on the CPU). Inductor fuses what sits between
    the matmuls (residual adds, RoPE, SwiGLU, casts); token counts are dynamic, so packed batches of any
    length reuse the compiled layers (tests/gpu/test_compile.py). The first steps pay the compile time
    (a second run of the same model may reuse inductor's cache; not measured): auto = compile when the run is long enough to
    pay that back (from about 420 optimizer steps: kernels/compile.py `compile_pays`, measured), said once
    when not; true = always, false = never."""

    requires = (
        Needs("kernels.fused_norm", "lora.fused", (True,),
              "only the fused layers take the norm's compute-dtype output"),
        Needs("kernels.lean_recompute", "lora.fused", (True,), "the skip lives in the fused layers"),
        Needs("kernels.lean_recompute", "train.gradient_checkpointing", (True,),
              "it shortens the checkpoint's recompute"),
        Needs("kernels.lean_tail_in_graph", "kernels.lean_recompute", (True,), "it traces lean_recompute's skip"),
        Needs("kernels.lean_tail_in_graph", "kernels.compile_layers", (True, "auto"),
              "it traces into the compiled layers"),
        Needs("kernels.lean_tail_in_graph", "train.offload_activations", (True,),
              "only the offloaded checkpoint's recompute can take the traced skip"),
        Needs("kernels.traced_dequant", "lora.fused", (True,), "it is the fused layers' dequantization"),
        Needs("kernels.traced_dequant", "kernels.compile_layers", (True, "auto"),
              "eager code always uses bitsandbytes' ops"),
        Needs("kernels.keep_attention", "train.offload_activations", (True,),
              "the kept outputs travel with the offloaded layer inputs"),
        Needs("kernels.keep_attention", "attention.backend", ("auto", "torch_varlen"),
              "only the torch_varlen kernel keeps its output and log-sum-exp"),
    )


@dataclass
class EvalConfig:
    identity_samples: int = 5
    """How many held-out identity questions the demo and `qflash compare` ask."""
    max_new_tokens: int = 64
    """Generation length for identity questions."""
    control_prompts: str = ""
    """General prompts outside the training data: does the identity spill into them, how close to the base
    do the answers stay (`qflash eval`, the demo). Same formats as data.replay.prompts; empty = not measured."""
    control_max_new_tokens: int = 64
    """Generation length for control prompts."""


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    quant: QuantConfig = field(default_factory=QuantConfig)
    lora: LoraConfig = field(default_factory=LoraConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    attention: AttentionConfig = field(default_factory=AttentionConfig)
    kernels: KernelsConfig = field(default_factory=KernelsConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    pref: PrefConfig = field(default_factory=PrefConfig)
    output_dir: str = "runs/default"
    """Where checkpoints, the adapter, logs and metrics go."""

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False, allow_unicode=True)


# --------------------------------------------------------------------------------------------
# Value checks that types alone cannot express. Each returns a reason, or None when fine.

def _known_codec(name: str) -> bool:
    """`auto` or a codec Python knows (data.encoding)."""
    try:
        return name == "auto" or bool(codecs.lookup(name))
    except LookupError:
        return False


def _check_values(cfg: Config) -> list[tuple[str, str]]:
    problems: list[tuple[str, str]] = []

    def need(cond: bool, key: str, reason: str) -> None:
        if not cond:
            problems.append((key, reason))

    need(cfg.lora.r >= 1, "lora.r", "must be >= 1")
    need(cfg.lora.alpha > 0, "lora.alpha", "must be > 0")
    need(0.0 <= cfg.lora.dropout < 1.0, "lora.dropout", "must be in [0, 1)")
    need(len(cfg.lora.target_modules) > 0, "lora.target_modules", "must name at least one module or `all-linear`")
    added = cfg.model.add_tokens
    need(all(t.strip() for t in added), "model.add_tokens", "must not contain an empty token")
    need(len(set(added)) == len(added), "model.add_tokens", "names a token twice; list each once")
    need(not added or bool(cfg.lora.modules_to_save), "model.add_tokens",
         "needs trained rows for the new tokens: set lora.modules_to_save to the input embedding and lm_head, "
         "e.g. [embed_tokens, lm_head]")
    need(cfg.data.max_len >= 8, "data.max_len", "must be >= 8 tokens")
    template = template_problem(cfg.data.template)
    need(template is None, "data.template", template or "")
    need(0.0 <= cfg.data.eval_ratio < 1.0, "data.eval_ratio", "must be in [0, 1)")
    need(cfg.data.num_proc >= 0, "data.num_proc", "must be >= 0 (0 = one per core)")
    need(_known_codec(cfg.data.encoding), "data.encoding",
         "is not an encoding Python knows; use auto or a codec name such as big5, gbk, shift_jis, cp1251")
    for i, ds in enumerate(cfg.data.datasets + cfg.data.eval_datasets):
        name = f"data.datasets.{i}" if i < len(cfg.data.datasets) else f"data.eval_datasets.{i - len(cfg.data.datasets)}"
        need(bool(ds.path), f"{name}.path", "is required")
        need(ds.weight > 0, f"{name}.weight", "must be > 0")
    t = cfg.train
    need(t.micro_batch_size >= 1, "train.micro_batch_size", "must be >= 1")
    need(t.grad_accum >= 1, "train.grad_accum", "must be >= 1")
    need(t.lr > 0, "train.lr", "must be > 0")
    need(t.weight_decay >= 0, "train.weight_decay", "must be >= 0")
    need(len(t.adam_betas) == 2 and all(0 <= b < 1 for b in t.adam_betas), "train.adam_betas",
         "must be two numbers in [0, 1), e.g. [0.9, 0.95]")
    need(t.adam_eps > 0, "train.adam_eps", "must be > 0")
    need(0.0 <= t.warmup_ratio < 1.0, "train.warmup_ratio", "must be in [0, 1)")
    need(t.max_steps is None or t.max_steps >= 1, "train.max_steps", "must be >= 1 (or unset to use epochs)")
    need(t.epochs > 0, "train.epochs", "must be > 0")
    need(t.max_grad_norm >= 0, "train.max_grad_norm", "must be >= 0 (0 disables clipping)")
    need(t.log_every >= 1, "train.log_every", "must be >= 1")
    need(t.save_every >= 1, "train.save_every", "must be >= 1")
    need(t.keep >= 1, "train.keep", "must be >= 1")
    need(t.max_bad_steps >= 1, "train.max_bad_steps", "must be >= 1")
    need(bool(t.resume), "train.resume", "must be auto, never or a checkpoint path")
    need(cfg.eval.identity_samples >= 0, "eval.identity_samples", "must be >= 0")
    need(cfg.eval.max_new_tokens >= 1, "eval.max_new_tokens", "must be >= 1")
    need(cfg.eval.control_max_new_tokens >= 1, "eval.control_max_new_tokens", "must be >= 1")
    need(t.eval_every >= 0, "train.eval_every", "must be >= 0 (0 = off)")
    pf = cfg.pref
    need(pf.beta is None or pf.beta > 0, "pref.beta", "must be > 0 (or unset for the objective's default)")
    need(0.0 <= pf.label_smoothing < 0.5, "pref.label_smoothing", "must be in [0, 0.5)")
    need(pf.label_smoothing == 0 or pf.loss_type == "sigmoid" or t.objective != "dpo", "pref.label_smoothing",
         f"applies to pref.loss_type=sigmoid only (not {pf.loss_type})")
    need(pf.orpo_lambda > 0, "pref.orpo_lambda", "must be > 0")
    need(pf.rpo_alpha >= 0, "pref.rpo_alpha", "must be >= 0 (0 = plain DPO)")
    need(pf.rpo_alpha == 0 or t.objective in ("sft", "dpo"), "pref.rpo_alpha",
         f"applies to train.objective=dpo (orpo has its own NLL term; simpo none), not {t.objective}")
    need(t.objective == "sft" or not cfg.data.replay.prompts, "data.replay.prompts",
         f"replay adds supervised samples, which train.objective={t.objective} does not train on; leave it empty")
    rp = cfg.data.replay
    need(rp.ratio > 0, "data.replay.ratio", "must be > 0 (leave data.replay.prompts empty for no replay)")
    need(rp.max_new_tokens >= 1, "data.replay.max_new_tokens", "must be >= 1")
    need(bool(cfg.output_dir), "output_dir", "must not be empty")
    return problems


# --------------------------------------------------------------------------------------------
# Switch combinations: the `requires` rules of each section, applied to what the user set explicitly.

def combination_rules(cls: type | None = None) -> list[Needs]:
    """Every section's `requires` rules, in schema order."""
    cls = cls or Config
    rules = list(getattr(cls, "requires", ()))
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        if dataclasses.is_dataclass(hints[f.name]):
            rules.extend(combination_rules(hints[f.name]))
    return rules


def _value(cfg: Config, key: str) -> Any:
    node: Any = cfg
    for part in key.split("."):
        node = getattr(node, part)
    return node


def _yaml_value(value: Any) -> str:
    """A value as the user writes it: true, 16, auto, [all-linear]."""
    text = yaml.safe_dump(value, default_flow_style=True, allow_unicode=True, width=10**6)
    return text.removesuffix("\n...\n").strip()


def _unmet(cfg: Config, switch: str, rules: list[Needs]) -> tuple[list[str], Needs] | None:
    """The first rule `switch` breaks, with the chain of prerequisite switches that led to it: a prerequisite
    that is on (by default, say) but is itself a switch brings its own rules (lean_tail_in_graph needs
    lean_recompute, which needs lora.fused)."""
    for rule in (r for r in rules if r.switch == switch):
        value = _value(cfg, rule.key)
        if value not in rule.allowed:
            return [], rule
        if value is True and any(r.switch == rule.key for r in rules):
            deeper = _unmet(cfg, rule.key, rules)
            if deeper is not None:
                return [rule.key, *deeper[0]], deeper[1]
    return None


def check_combinations(cfg: Config, given: set[str], origins: _Origins) -> None:
    """Refuse a switch that is off by default, which the user turned on, while a prerequisite is off (explicitly
    or by default), instead of letting the code skip it quietly. Switches that are on by default are not refused
    when a prerequisite is off (a run's saved config writes every key out, `true` included): the training banner
    lists them as off, with the reason (train/levers.py)."""
    rules = combination_rules()
    defaults = Config()
    for switch in dict.fromkeys(r.switch for r in rules):
        if switch not in given or _value(cfg, switch) is not True or _value(defaults, switch) is True:
            continue
        unmet = _unmet(cfg, switch, rules)
        if unmet is None:
            continue
        chain, rule = unmet
        value = _value(cfg, rule.key)
        where = origins.of(rule.key) if rule.key in given else "the default"
        via = "".join(f"{k}, which needs " for k in chain)
        want = " or ".join(_yaml_value(a) for a in rule.allowed)
        raise ConfigError(
            f"{origins.of(switch)}: {switch}=true needs {via}{rule.key}={want} ({rule.why}), but "
            f"{rule.key} is {_yaml_value(value)} ({where}); set {rule.key}={_yaml_value(rule.allowed[0])} "
            f"or {switch}=false")


def _given_keys(tree: Any, prefix: str = "") -> set[str]:
    """The dotted keys present in the raw (file + overrides) tree: what the user set explicitly."""
    keys: set[str] = set()
    items = tree.items() if isinstance(tree, dict) else enumerate(tree) if isinstance(tree, list) else ()
    for k, v in items:
        key = f"{prefix}.{k}" if prefix else str(k)
        keys.add(key)
        keys |= _given_keys(v, key)
    return keys


# --------------------------------------------------------------------------------------------
# Building dataclasses from plain dicts, with a precise message for every mistake.

class _Origins:
    """Remembers where each dotted key came from: `file.yaml:12` or `command line 'a.b=c'`."""

    def __init__(self, default: str):
        self.default = default
        self.by_key: dict[str, str] = {}

    def of(self, key: str) -> str:
        # The most specific origin wins: a.b.c, then a.b, then a.
        parts = key.split(".")
        for n in range(len(parts), 0, -1):
            k = ".".join(parts[:n])
            if k in self.by_key:
                return self.by_key[k]
        return self.default


def _type_name(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if tp is bool:
        return "true or false"
    if tp is int:
        return "an integer"
    if tp is float:
        return "a number"
    if tp is str:
        return "a string"
    if origin is Literal:
        return "one of " + ", ".join(repr(a) for a in typing.get_args(tp))
    if origin in (list,):
        return "a list"
    if origin in (dict,):
        return "a mapping"
    if dataclasses.is_dataclass(tp):
        return "a mapping"
    if origin in (Union, types.UnionType):
        return " or ".join("null" if a is type(None) else _type_name(a) for a in typing.get_args(tp))
    return str(tp)


def all_keys(cls: type = Config, prefix: str = "") -> list[str]:
    """Every valid dotted key of the schema (list items as `datasets.0.path`)."""
    return list(_schema(cls, prefix))


def _schema(cls: type = Config, prefix: str = "") -> dict[str, tuple[type, dataclasses.Field, Any]]:
    """dotted key -> (the dataclass that holds it, its field, its type), for every key of the schema."""
    out: dict[str, tuple[type, dataclasses.Field, Any]] = {}
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        key, tp = prefix + f.name, hints[f.name]
        out[key] = (cls, f, tp)
        if dataclasses.is_dataclass(tp):
            out.update(_schema(tp, key + "."))
        elif _item_section(tp) is not None:
            out.update(_schema(_item_section(tp), key + ".0."))
    return out


def _item_section(tp: Any) -> type | None:
    """The dataclass of a list of sections (data.datasets: DatasetSpec), else None."""
    if typing.get_origin(tp) is list and dataclasses.is_dataclass(typing.get_args(tp)[0]):
        return typing.get_args(tp)[0]
    return None


def _suggest(key: str, candidates: list[str], full_key: str) -> str:
    # The exact name in another section (`train.r` -> `lora.r`) beats a near name in this one.
    elsewhere = [k for k in all_keys() if k.rsplit(".", 1)[-1] == key and ".0." not in k]
    if elsewhere:
        return f"did you mean '{elsewhere[0]}'?"
    near = difflib.get_close_matches(key, candidates, n=1, cutoff=0.6)
    if near:
        return f"did you mean '{near[0]}'?"
    near_full = difflib.get_close_matches(full_key, all_keys(), n=1, cutoff=0.6)
    if near_full:
        return f"did you mean '{near_full[0]}'?"
    return "valid keys here: " + ", ".join(candidates)


def _coerce(value: Any, tp: Any, key: str, origins: _Origins) -> Any:
    def bad(what: str | None = None) -> ConfigError:
        got = what or f"got {value!r}"
        return ConfigError(f"{origins.of(key)}: {key}: expected {_type_name(tp)}, {got}")

    origin = typing.get_origin(tp)
    if origin in (Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        for a in args:
            if a is type(None):
                continue
            try:
                return _coerce(value, a, key, origins)
            except ConfigError:
                continue
        raise bad()
    if dataclasses.is_dataclass(tp):
        if value is None:
            value = {}
        if not isinstance(value, dict):
            raise bad()
        return _build(tp, value, key, origins)
    if origin is Literal:
        choices = typing.get_args(tp)
        if value in choices:
            return value
        raise bad()
    if origin is list:
        (item_tp,) = typing.get_args(tp)
        if isinstance(value, (str, dict)) and not isinstance(value, list):
            value = [value]  # `lora.target_modules=q_proj` means a list of one
        if not isinstance(value, list):
            raise bad()
        return [_coerce(v, item_tp, f"{key}.{i}", origins) for i, v in enumerate(value)]
    if origin is dict:
        if value is None:
            return {}
        if not isinstance(value, dict):
            raise bad()
        _, val_tp = typing.get_args(tp)
        return {str(k): _coerce(v, val_tp, f"{key}.{k}", origins) for k, v in value.items()}
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise bad()
    if tp is int:
        if isinstance(value, bool):
            raise bad()
        if isinstance(value, int):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        raise bad()
    if tp is float:
        if isinstance(value, bool):
            raise bad()
        if isinstance(value, (int, float)):
            return float(value)
        if isinstance(value, str):  # YAML 1.1 reads `1e-4` as a string
            try:
                return float(value)
            except ValueError:
                raise bad() from None
        raise bad()
    if tp is str:
        if isinstance(value, str):
            return value
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return str(value)  # `data.vars.name=2049` is a name, not a number
        raise bad()
    raise bad()


def _build(cls: type, data: dict[str, Any], prefix: str, origins: _Origins) -> Any:
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    kwargs: dict[str, Any] = {}
    for k, v in data.items():
        full = f"{prefix}.{k}" if prefix else str(k)
        if k not in names:
            raise ConfigError(f"{origins.of(full)}: unknown key '{full}': {_suggest(str(k), names, full)}")
        kwargs[k] = _coerce(v, hints[k], full, origins)
    return cls(**kwargs)


# --------------------------------------------------------------------------------------------
# The keys' documentation: the string right after each field (litgpt's style), for `qflash config explain`.

@functools.cache
def _class_field_docs() -> dict[str, dict[str, str]]:
    """class name -> {field name: the string literal right after the field} of every class in this file."""
    tree = ast.parse(Path(__file__).read_text(encoding="utf-8"))
    docs: dict[str, dict[str, str]] = {}
    for cls in (n for n in tree.body if isinstance(n, ast.ClassDef)):
        fields = docs.setdefault(cls.name, {})
        for node, after in zip(cls.body, [*cls.body[1:], None]):
            if (isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name)
                    and isinstance(after, ast.Expr) and isinstance(after.value, ast.Constant)
                    and isinstance(after.value.value, str)):
                fields[node.target.id] = inspect.cleandoc(after.value.value)
    return docs


def _class_doc(cls: type) -> str:
    # A dataclass without a docstring gets a generated one, "Name(field: type = ...)": not documentation.
    doc = cls.__doc__ or ""
    return "" if doc.startswith(cls.__name__ + "(") else inspect.cleandoc(doc)


def field_docs() -> dict[str, str]:
    """dotted key -> its documentation, for every key of all_keys(); "" where a field has none. A section
    (`kernels`) without a string of its own gets its class docstring, if any."""
    docs = _class_field_docs()
    out: dict[str, str] = {}
    for key, (cls, f, tp) in _schema().items():
        doc = docs.get(cls.__name__, {}).get(f.name, "")
        if not doc and dataclasses.is_dataclass(tp):
            doc = _class_doc(tp)
        out[key] = doc
    return out


def _default(f: dataclasses.Field) -> Any:
    if f.default is not dataclasses.MISSING:
        return f.default
    if f.default_factory is not dataclasses.MISSING:
        return f.default_factory()
    return None


def _first_sentence(doc: str) -> str:
    text = " ".join(doc.split())
    m = re.search(r"(?<!e\.g)(?<!i\.e)\.(\s|$)", text)
    return text[: m.start() + 1] if m else text


def _schema_key(key: str) -> str:
    """The schema's spelling of `key` (a list item's index may be left out or be any number:
    data.datasets.path, data.datasets.3.path -> data.datasets.0.path), or a ConfigError with the did-you-mean
    that load_config gives for the same bad key."""
    parts, canon, cls, i = key.split("."), [], Config, 0
    while i < len(parts):
        names = [f.name for f in dataclasses.fields(cls)]
        if parts[i] not in names:
            raise ConfigError(f"unknown key '{key}': {_suggest(parts[i], names, key)}")
        canon.append(parts[i])
        tp = typing.get_type_hints(cls)[parts[i]]
        i += 1
        if dataclasses.is_dataclass(tp):
            cls = tp
        elif _item_section(tp) is not None and i < len(parts):
            cls = _item_section(tp)
            canon.append("0")
            i += parts[i].isdigit()
        elif i < len(parts):
            raise ConfigError(f"unknown key '{key}': '{'.'.join(canon)}' has no documented keys below it")
    return ".".join(canon)


def explain(key: str | None = None) -> str:
    """`qflash config explain [KEY]`: a key's documentation, type, default and what it needs when switched on;
    a section: its documentation and keys; no key: every key on one line (default, first sentence)."""
    schema, docs = _schema(), field_docs()
    if key is None:
        return _key_lines(schema, docs, "")
    key = _schema_key(key)
    _, f, tp = schema[key]
    if dataclasses.is_dataclass(tp):
        about = f"{docs[key]}\n\n" if docs[key] else ""
        return f"{key}: a section\n\n{about}" + _key_lines(schema, docs, key + ".")
    lines = [key, f"  type:    {_type_name(tp)}", f"  default: {_yaml_value(_default(f))}", "", docs[key]]
    needs = [r for r in combination_rules() if r.switch == key]
    if needs:
        lines += ["", "Set to true in a config or override, it needs (else the config is refused):"]
        lines += [f"  {r.key}={' or '.join(_yaml_value(a) for a in r.allowed)}: {r.why}" for r in needs]
    text = "\n".join(lines) + "\n"
    if _item_section(tp) is not None:
        text += "\nEach item:\n" + _key_lines(schema, docs, key + ".0.")
    return text


def _key_lines(schema: dict[str, tuple[type, dataclasses.Field, Any]], docs: dict[str, str], prefix: str) -> str:
    """One line per setting under `prefix`: `key = default  first sentence`."""
    rows = [(f"{k} = {_yaml_value(_default(f))}", _first_sentence(docs[k]))
            for k, (_, f, tp) in schema.items() if k.startswith(prefix) and not dataclasses.is_dataclass(tp)]
    width = max(len(left) for left, _ in rows)
    return "".join(f"{left:<{width}}  {doc}\n" for left, doc in rows)


# --------------------------------------------------------------------------------------------
# YAML with line numbers, overrides, and the public entry point.

class DuplicateKeyError(yaml.constructor.ConstructorError):
    """A mapping that gives one key twice: PyYAML would keep the last silently (a second `train:` section
    replacing the first)."""


class StrictLoader(yaml.SafeLoader):
    """yaml.SafeLoader that refuses a key given twice in one mapping (merge keys `<<:` may still be overridden)."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        first_line: dict[Any, int] = {}
        for key_node, _ in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":
                continue
            key = self.construct_object(key_node, deep=True)
            try:
                seen = first_line.get(key)
            except TypeError:
                continue  # an unhashable key: construct_mapping below says so
            if seen is not None:
                raise DuplicateKeyError(
                    None, None, f"the key '{key}' is given twice (first at line {seen}); keep one — "
                    "the second would silently replace the first", key_node.start_mark)
            first_line[key] = key_node.start_mark.line + 1
        return super().construct_mapping(node, deep=deep)


def read_yaml(path: str | Path, text: str | None = None) -> Any:
    """The YAML of a file (text, when given, is its content), with StrictLoader; a ConfigError naming the file
    and line when it is not valid YAML or gives a key twice."""
    if text is None:
        text = Path(path).read_text(encoding="utf-8")
    try:
        return yaml.load(text, Loader=StrictLoader)  # noqa: S506 (StrictLoader is a SafeLoader)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f"{path}:{mark.line + 1}" if mark else str(path)
        raise ConfigError(f"{where}: not valid YAML: {getattr(e, 'problem', e)}") from None


def _yaml_lines(text: str, path: str) -> dict[str, int]:
    """dotted key -> line number (1-based) of that key in the YAML text."""
    lines: dict[str, int] = {}

    def walk(node: yaml.Node, prefix: str) -> None:
        if isinstance(node, yaml.MappingNode):
            for knode, vnode in node.value:
                key = f"{prefix}.{knode.value}" if prefix else str(knode.value)
                lines[key] = knode.start_mark.line + 1
                walk(vnode, key)
        elif isinstance(node, yaml.SequenceNode):
            for i, item in enumerate(node.value):
                key = f"{prefix}.{i}"
                lines[key] = item.start_mark.line + 1
                walk(item, key)

    root = yaml.compose(text, Loader=yaml.SafeLoader)
    if root is not None:
        walk(root, "")
    return lines


def parse_override(text: str) -> tuple[str, Any]:
    """`train.lr=1e-4` -> ("train.lr", 1e-4). Values are read as YAML scalars/lists."""
    if "=" not in text:
        raise ConfigError(f"command line: '{text}' is not an override; write KEY=VALUE, e.g. train.max_steps=20")
    key, raw = text.split("=", 1)
    key = key.strip()
    if not key:
        raise ConfigError(f"command line: '{text}' has no key before '='")
    try:
        value = yaml.load(raw, Loader=StrictLoader) if raw.strip() else ""  # noqa: S506 (a SafeLoader)
    except DuplicateKeyError as e:
        raise ConfigError(f"command line '{text}': {e.problem}") from None
    except yaml.YAMLError:
        value = raw
    return key, value


def _set_dotted(tree: dict[str, Any], key: str, value: Any, where: str) -> None:
    parts = key.split(".")
    node: Any = tree
    for i, part in enumerate(parts[:-1]):
        if isinstance(node, list):
            if not part.isdigit() or int(part) >= len(node):
                raise ConfigError(f"{where}: '{'.'.join(parts[: i + 1])}': no such list item")
            node = node[int(part)]
            continue
        if not isinstance(node, dict):
            raise ConfigError(f"{where}: '{'.'.join(parts[:i])}' is not a section, cannot set '{key}'")
        nxt = node.get(part)
        if nxt is None:
            nxt = node[part] = {}
        node = nxt
    last = parts[-1]
    if isinstance(node, list):
        if not last.isdigit() or int(last) >= len(node):
            raise ConfigError(f"{where}: '{key}': no such list item")
        node[int(last)] = value
    elif isinstance(node, dict):
        node[last] = value
    else:
        raise ConfigError(f"{where}: cannot set '{key}'")


def load_config(path: str | Path | None, overrides: list[str] | tuple[str, ...] = ()) -> Config:
    """Read a YAML config (or none), apply `key=value` overrides, validate, and return the Config."""
    tree: dict[str, Any] = {}
    origins = _Origins(default=str(path) if path else "config")
    if path is not None:
        p = Path(path)
        if not p.is_file():
            raise ConfigError(f"{p}: config file not found; pass the path of a YAML file such as configs/demo.yaml")
        text = p.read_text(encoding="utf-8")
        loaded = read_yaml(p, text)
        lines = _yaml_lines(text, str(p))
        if loaded is None:
            loaded = {}
        if not isinstance(loaded, dict):
            raise ConfigError(f"{p}: the top level must be a mapping of sections (model, data, train, ...)")
        tree = loaded
        for key, line in lines.items():
            origins.by_key[key] = f"{p}:{line}"
    for text in overrides:
        key, value = parse_override(text)
        where = f"command line '{text}'"
        _set_dotted(tree, key, value, where)
        origins.by_key[key] = where
    cfg = _build(Config, tree, "", origins)
    problems = _check_values(cfg)
    if problems:
        key, reason = problems[0]
        raise ConfigError(f"{origins.of(key)}: {key} {reason}")
    check_combinations(cfg, _given_keys(tree), origins)
    return cfg


def config_from_dict(tree: dict[str, Any], where: str = "saved config") -> Config:
    """Rebuild a Config from its to_dict() form (a run's saved config)."""
    return _build(Config, tree, "", _Origins(default=where))


def check_paths(cfg: Config) -> None:
    """Fail early, with the key that names it, when a file the run needs does not exist."""
    for i, ds in enumerate(cfg.data.datasets):
        if not Path(ds.path).exists():
            raise ConfigError(f"data.datasets.{i}.path: {ds.path}: file not found (paths are relative to {Path.cwd()})")
    for i, ds in enumerate(cfg.data.eval_datasets):
        if not Path(ds.path).exists():
            raise ConfigError(f"data.eval_datasets.{i}.path: {ds.path}: file not found (paths are relative to {Path.cwd()})")
    if cfg.data.replay.prompts and not Path(cfg.data.replay.prompts).is_file():
        raise ConfigError(f"data.replay.prompts: {cfg.data.replay.prompts}: file not found (paths are relative to {Path.cwd()})")
    if not cfg.data.datasets:
        raise ConfigError("data.datasets: no training data; add at least one entry with a path")
