"""TRL as the reference for qflash's preference objectives (test-only; qflash never imports TRL at runtime).

`trl_run` trains a PEFT LoRA adapter on a tiny model with TRL's own trainers, in fp32 on the CPU, and returns each
step's loss, the LoRA gradients just before each optimizer step and TRL's logged metrics, so a test can hold qflash's
dpo / orpo / simpo against them. The math these trainers compute (TRL 1.16.0) is written out, with file:line
citations, in bench/trl-preference-math.md.

    dpo    trl.DPOTrainer, loss_type sigmoid | ipo | hinge (any TRL DPO loss type passes through; "a+b": both,
           weights 1, e.g. "sigmoid+sft" = RPO with alpha 1), beta
    orpo   trl.experimental.orpo.ORPOTrainer, beta = ORPO's lambda
    simpo  trl.experimental.cpo.CPOTrainer(loss_type="simpo", cpo_alpha=0), beta, simpo_gamma, label_smoothing

Pre-tokenized pairs go in unchanged: (prompt_ids, chosen_ids, rejected_ids), the completions already holding every
end-of-turn/EOS token the caller wants scored. TRL's own preprocessing (prompt extraction, chat template, EOS/BOS
insertion, tokenization, truncation) is bypassed: DPO's `_prepare_dataset` returns the dataset as given (its
collator then builds prompt+completion rows and the completion mask), CPO's/ORPO's `tokenize_row` builds the
`{prompt,chosen,rejected}_{input_ids,attention_mask}` / `*_labels` rows from the ids (prompt labels -100), with no
BOS or EOS added and no truncation.

The reference model of DPO is the base model with the adapter disabled: the model goes to DPOTrainer unwrapped with
a `peft_config`, and `init_lora` is copied in after the trainer wrapped it. (A PeftModel handed to DPOTrainer would
instead get a frozen "ref" copy of its initial adapter as the reference.)
"""

from __future__ import annotations

import os
import tempfile
from typing import Any

import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # no Hub: TRL's start-up telemetry ping is skipped offline
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")  # ORPO and CPO live in trl.experimental

OBJECTIVES = ("dpo", "orpo", "simpo")

Pair = tuple[list[int], list[int], list[int]]


def trl_available() -> bool:
    try:
        import trl  # noqa: F401
        from trl.experimental.cpo import CPOTrainer  # noqa: F401
        from trl.experimental.orpo import ORPOTrainer  # noqa: F401
    except Exception:
        return False
    return True


def _norm_name(name: str) -> str:
    """PEFT names with or without the adapter name (named_parameters: `lora_A.default.weight`, the saved adapter's
    state dict: `lora_A.weight`) map to one key."""
    return name.replace(".default.", ".")


def _tokenizer(model_dir: str):
    """The model directory's tokenizer, else a stand-in: nothing is tokenized here, the trainers only read the pad /
    EOS / BOS ids (padding is masked out of attention and labels)."""
    from transformers import AutoConfig, AutoTokenizer, PreTrainedTokenizerFast

    try:
        return AutoTokenizer.from_pretrained(model_dir)
    except Exception:
        from tokenizers import Tokenizer
        from tokenizers.models import WordLevel

        vocab_size = AutoConfig.from_pretrained(model_dir).get_text_config().vocab_size
        vocab = {f"<t{i}>": i for i in range(vocab_size)}
        tok = PreTrainedTokenizerFast(tokenizer_object=Tokenizer(WordLevel(vocab, unk_token="<t0>")))
        tok.add_special_tokens({"pad_token": "<t0>", "eos_token": "<t0>"})
        return tok


def _ids_row(self, feature, model=None) -> dict:
    """CPOTrainer/ORPOTrainer `tokenize_row` for pre-tokenized ids: the same row layout as TRL's own (trl
    experimental/cpo/cpo_trainer.py:563-587), without its BOS/EOS insertion or truncation."""
    prompt = list(feature["prompt_ids"])
    row = {"prompt_input_ids": prompt, "prompt_attention_mask": [1] * len(prompt)}
    for side in ("chosen", "rejected"):
        completion = list(feature[f"{side}_ids"])
        row[f"{side}_input_ids"] = prompt + completion
        row[f"{side}_attention_mask"] = [1] * (len(prompt) + len(completion))
        row[f"{side}_labels"] = [-100] * len(prompt) + completion
    return row


def _trainer_classes(objective: str):
    from transformers import TrainerCallback

    if objective == "dpo":
        from trl import DPOConfig, DPOTrainer

        class Trainer(DPOTrainer):
            def _prepare_dataset(self, dataset, processing_class, args, dataset_name):
                return dataset  # already prompt_ids / chosen_ids / rejected_ids, as DataCollatorForPreference reads

        config_cls = DPOConfig
    elif objective == "orpo":
        from trl.experimental.orpo import ORPOConfig, ORPOTrainer

        class Trainer(ORPOTrainer):
            tokenize_row = _ids_row

        config_cls = ORPOConfig
    elif objective == "simpo":
        from trl.experimental.cpo import CPOConfig, CPOTrainer

        class Trainer(CPOTrainer):
            tokenize_row = _ids_row

        config_cls = CPOConfig
    else:
        raise ValueError(f"objective must be one of {OBJECTIVES}, not {objective!r}")

    class Capturing(Trainer):
        """Records the loss each `training_step` returns (exact; the logged `loss` is averaged over the logging window)."""

        def training_step(self, model, inputs, num_items_in_batch=None):
            loss = super().training_step(model, inputs, num_items_in_batch)
            self.ref_losses.append(float(loss))
            return loss

    class GradCapture(TrainerCallback):
        """The LoRA gradients just before each optimizer step (after any clipping, which is off here)."""

        def __init__(self):
            self.model = None
            self.grads: list[dict[str, torch.Tensor]] = []
            self.logs: list[dict[str, float]] = []

        def on_pre_optimizer_step(self, args, state, control, **kwargs):
            self.grads.append({
                name: (p.grad.detach().float().clone() if p.grad is not None else torch.zeros_like(p, dtype=torch.float32))
                for name, p in self.model.named_parameters() if p.requires_grad
            })

        def on_log(self, args, state, control, logs=None, **kwargs):
            if logs and "loss" in logs and "train_runtime" not in logs:
                self.logs.append(dict(logs))

    return Capturing, config_cls, GradCapture


def trl_run(
    model_dir: str,
    pairs: list[Pair],
    objective: str,
    *,
    beta: float,
    loss_type: str = "sigmoid",
    label_smoothing: float = 0.0,
    simpo_gamma: float = 0.5,
    lora_r: int,
    lora_alpha: float,
    target_modules: list[str],
    init_lora: dict[str, torch.Tensor] | None,
    steps: int,
    batch_size: int,
    lr: float,
    seed: int = 0,
) -> dict[str, Any]:
    """Train `steps` optimizer steps of `batch_size` pairs (pairs[0:batch_size] first, no shuffling) with TRL.

    Returns {"losses": [float per step], "grads": [{peft_param_name: fp32 grad} per step, taken before the optimizer
    step], "metrics": [TRL's logged dict per step], "lora_names": [trainable PEFT parameter names],
    "init_lora": {name: the LoRA weights training started from}} (names as `named_parameters` gives them, with the
    adapter name `.default.`; `init_lora` may use either form). Without `init_lora`, PEFT's seeded default init
    (A Kaiming-uniform, B zero) is used and returned.

    `loss_type` applies to "dpo" only. `label_smoothing` is passed to DPOConfig/CPOConfig as is: TRL 1.16's DPO
    sigmoid / ipo / hinge ignore it (only its robust, exo_pair, aot and aot_unpaired losses read it), so asking for
    it with those loss types raises rather than silently returning the unsmoothed loss; SimPO (CPOTrainer) applies it
    (conservative form). ORPO has none.
    """
    import datasets
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM
    from transformers.trainer_callback import PrinterCallback

    if objective not in OBJECTIVES:
        raise ValueError(f"objective must be one of {OBJECTIVES}, not {objective!r}")
    if objective == "dpo" and label_smoothing and loss_type in ("sigmoid", "ipo", "hinge"):
        raise ValueError(f"TRL 1.16's DPO loss_type={loss_type!r} ignores label_smoothing (see "
                         f"bench/trl-preference-math.md); there is no TRL reference for smoothed {loss_type}")
    if objective == "orpo" and label_smoothing:
        raise ValueError("ORPO has no label smoothing")
    n = steps * batch_size
    if len(pairs) < n:
        raise ValueError(f"{steps} steps of {batch_size} need {n} pairs, got {len(pairs)}")
    pairs = pairs[:n]  # exactly one epoch, so the sequential sampler never wraps around

    Trainer, Config, GradCapture = _trainer_classes(objective)
    tokenizer = _tokenizer(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    peft_config = LoraConfig(r=lora_r, lora_alpha=lora_alpha, lora_dropout=0.0, target_modules=list(target_modules),
                             bias="none", task_type="CAUSAL_LM")
    dataset = datasets.Dataset.from_dict({
        "prompt_ids": [list(map(int, p)) for p, _, _ in pairs],
        "chosen_ids": [list(map(int, c)) for _, c, _ in pairs],
        "rejected_ids": [list(map(int, r)) for _, _, r in pairs],
    })

    with tempfile.TemporaryDirectory(prefix="trl-ref-") as out:
        common = dict(
            output_dir=out,
            use_cpu=True,
            bf16=False,  # TRL defaults bf16 to True when fp16 is off (trl/trainer/base_config.py:107-108)
            fp16=False,
            gradient_checkpointing=False,  # TRL's default is True (base_config.py:62-67); same math, slower
            activation_checkpointing=False,  # its new name in transformers 5.2x (the old one warns when the new is unset)
            per_device_train_batch_size=batch_size,
            gradient_accumulation_steps=1,
            max_steps=steps,
            num_train_epochs=1,
            learning_rate=lr,
            lr_scheduler_type="constant",
            warmup_steps=0,
            weight_decay=0.0,
            optim="adamw_torch",
            max_grad_norm=0.0,  # clipping runs only when max_grad_norm > 0 (transformers trainer.py:1975)
            train_sampling_strategy="sequential",  # the default is a RandomSampler
            logging_strategy="steps",
            logging_steps=1,
            save_strategy="no",
            eval_strategy="no",
            report_to="none",
            disable_tqdm=True,
            dataloader_num_workers=0,
            seed=seed,
            data_seed=seed,
            beta=beta,
        )
        if objective == "dpo":
            config = Config(**common, loss_type=loss_type.split("+"), label_smoothing=label_smoothing, max_length=None,
                            precompute_ref_log_probs=False, pad_to_multiple_of=None)
        elif objective == "orpo":
            # max_length is read only by TRL's tokenize_row (replaced here) and generation
            config = Config(**common, remove_unused_columns=False)
        else:
            config = Config(**common, loss_type="simpo", cpo_alpha=0.0, simpo_gamma=simpo_gamma,
                            label_smoothing=label_smoothing, remove_unused_columns=False)

        capture = GradCapture()
        trainer = Trainer(model=model, args=config, train_dataset=dataset, processing_class=tokenizer,
                          peft_config=peft_config, callbacks=[capture])
        trainer.ref_losses = []
        trainer.remove_callback(PrinterCallback)  # with tqdm off it prints every log dict
        peft_model = trainer.model
        capture.model = peft_model

        lora = {name: p for name, p in peft_model.named_parameters() if p.requires_grad}
        if init_lora is not None:
            given = {_norm_name(k): v for k, v in init_lora.items()}
            missing = [name for name in lora if _norm_name(name) not in given]
            extra = set(given) - {_norm_name(name) for name in lora}
            if missing or extra:
                raise KeyError(f"init_lora does not match the adapter: missing {missing[:4]}, unknown {sorted(extra)[:4]}")
            with torch.no_grad():
                for name, p in lora.items():
                    src = given[_norm_name(name)]
                    if tuple(src.shape) != tuple(p.shape):
                        raise ValueError(f"{name}: init shape {tuple(src.shape)} != {tuple(p.shape)}")
                    p.copy_(src.to(p.dtype))
        start = {name: p.detach().clone() for name, p in lora.items()}

        trainer.train()

    return {
        "losses": list(trainer.ref_losses),
        "grads": capture.grads,
        "metrics": capture.logs,
        "lora_names": list(lora),
        "init_lora": start,
    }


__all__ = ["OBJECTIVES", "trl_available", "trl_run"]
