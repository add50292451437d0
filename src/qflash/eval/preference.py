"""Held-out preference pairs in `qflash eval`: how far the tuned model moved toward the chosen answers.

For each pair, the log-probability of both answers (summed over the answer's tokens) under the tuned model and under
its starting point (the base model: the adapter disabled; or the run's model.adapter, swapped in for the
measurement). The implicit reward of an answer is its log-probability ratio tuned / start (DPO's reward without
beta): preference_accuracy is the share of pairs whose chosen answer gained more than the rejected one (strictly,
as TRL counts it; the start against itself scores 0 by that rule), preference_margin the mean difference in nats.
likelihood_accuracy, for each model on its own, is the share of pairs whose chosen answer has the higher
per-token log-probability (no reference: meaningful for the base model too).
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
import numpy as np
import torch

from qflash.data.template import IGNORE


@dataclass
class PreferenceNumbers:
    pairs: int
    accuracy: float
    margin: float
    tuned_likelihood_accuracy: float
    start_likelihood_accuracy: float
    start: str
    """What the tuned model is compared with ("the base model", or the starting adapter's path)."""


def _answer_tokens(pairs) -> torch.Tensor:
    return torch.tensor([[int(np.count_nonzero(np.asarray(e.labels) != IGNORE)) for e in (p.chosen, p.rejected)]
                         for p in pairs], dtype=torch.float64)


@contextlib.contextmanager
def starting_point(model, start_adapter: str | None, trust_remote_code: bool = False):
    """Inside: `model` (a PeftModel) computes as the run's starting point — the base (adapter disabled), or the
    weights of `start_adapter` (model.adapter) loaded over the tuned ones and put back afterwards."""
    if not start_adapter:
        with model.disable_adapter():
            yield "the base model"
        return
    from peft import get_peft_model_state_dict, set_peft_model_state_dict
    from safetensors.torch import load_file

    from qflash import rundir

    adapter_dir, _ = rundir.find_adapter(start_adapter, trust_remote_code)
    tuned = {k: v.detach().clone() for k, v in get_peft_model_state_dict(model).items()}
    set_peft_model_state_dict(model, load_file(str(adapter_dir / "adapter_model.safetensors")))
    try:
        yield f"the starting adapter {adapter_dir}"
    finally:
        set_peft_model_state_dict(model, tuned)


def preference_numbers(loaded, pairs, *, micro: int, max_len: int, start_adapter: str | None = None,
                       progress=None) -> PreferenceNumbers:
    """The numbers of the module docstring for `pairs` (PairExample) and `loaded` (infer.generate.LoadedModel
    with its adapter)."""
    from qflash.model.attention import choice_of
    from qflash.train.preference import reference_logps

    kw = dict(micro=micro, capacity=max_len, varlen=choice_of(loaded.model).varlen,
              pad_id=loaded.tokenizer.pad_token_id, device=loaded.device,
              autocast_dtype=loaded.dtype if loaded.dtype != torch.float32 else None)
    tuned = reference_logps(loaded.model, pairs, progress=progress and progress("fine-tuned"), **kw)
    with starting_point(loaded.model, start_adapter, loaded.cfg.model.trust_remote_code) as start_name:
        start = reference_logps(loaded.model, pairs, progress=progress and progress("starting point"), **kw)
    gain = tuned - start  # (pairs, 2): log-probability ratio tuned / start of chosen and rejected
    n = _answer_tokens(pairs)
    likes = lambda lp: float(((lp[:, 0] / n[:, 0]) > (lp[:, 1] / n[:, 1])).double().mean())  # noqa: E731
    return PreferenceNumbers(len(pairs), float((gain[:, 0] > gain[:, 1]).double().mean()),
                             float((gain[:, 0] - gain[:, 1]).mean()), likes(tuned), likes(start), start_name)

