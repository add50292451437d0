"""Preference tuning: DPO (sigmoid, IPO, hinge), ORPO and SimPO on pairs of answers to one prompt.

A step takes `micro_batch_size x grad_accum` pairs. A micro-batch packs the chosen and the rejected sequence of
each of its pairs into one batch (one varlen row, or bins stacked for SDPA/eager), so attention never crosses
sequences; one forward gives every sequence's summed log-probability of its answer tokens (the prompt carries
no labels). Per pair, with pi = the policy's log-probability of an answer and ref = the reference's:

  dpo sigmoid   -(1-ls) log sigmoid(beta z) - ls log sigmoid(-beta z),   z = (pi_c - pi_r) - (ref_c - ref_r)
  dpo hinge     relu(1 - beta z)
  dpo ipo       (z - 1/(2 beta))^2, on per-token average log-probabilities
  simpo         -(1-ls) log sigmoid(beta z) - ls log sigmoid(-beta z),   z = avg_c - avg_r - gamma/beta
  orpo          NLL of the chosen sequences (per token, prompt included) - lambda log sigmoid(log odds(avg_c) -
                log odds(avg_r))
  dpo + rpo     the dpo loss + alpha x NLL of the chosen answers (per token): pref.rpo_alpha

avg: the per-token average over the answer. orpo's NLL covers the chosen sequence's prompt and answer (every token
but the first), as the ORPO authors' code and TRL do. Rewards (metrics): beta (pi - ref) with summed log-probs for
dpo (IPO too), beta avg for simpo, lambda avg for orpo; accuracy counts strict wins (TRL's definitions).

The step's loss is the mean over the step's pairs (orpo's NLL: over the step's chosen-answer tokens), however
the pairs are split into micro-batches and processes. The reference is the model as the run starts (the base
with fresh LoRA, whose B is zero, or model.adapter): its log-probabilities are computed once, before the first
step, and kept beside the run (REFERENCE_FILE), so a resumed run uses the same numbers and no second model is
ever loaded.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from qflash.data.batching import Batch, labelled_positions, pack_rows, stack_rows
from qflash.data.template import IGNORE, Example

REFERENCE_FILE = "preference_reference.pt"
EVAL_REFERENCE_FILE = "preference_reference_eval.pt"  # the held-out pairs' (train.eval_every)
DEFAULT_BETA = {"dpo": 0.1, "simpo": 2.0, "orpo": 0.1}
# What each step reports (means over the step's pairs), in this order in the stats vector.
STATS = ("rewards/chosen", "rewards/rejected", "rewards/margin", "rewards/accuracy", "logps/chosen",
         "logps/rejected")
# ... then the chosen answers' summed NLL and their tokens (the per-token NLL is their ratio)


@dataclass(frozen=True)
class Objective:
    """train.objective with the pref section's parameters, resolved."""

    name: str  # dpo | orpo | simpo
    beta: float
    loss_type: str = "sigmoid"
    label_smoothing: float = 0.0
    gamma: float = 0.5
    lam: float = 0.1
    rpo_alpha: float = 0.0

    @classmethod
    def of(cls, cfg) -> "Objective":
        name, pf = cfg.train.objective, cfg.pref
        beta = pf.beta if pf.beta is not None else DEFAULT_BETA[name]
        return cls(name, beta, pf.loss_type if name == "dpo" else "sigmoid", pf.label_smoothing, pf.simpo_gamma,
                   pf.orpo_lambda, pf.rpo_alpha if name == "dpo" else 0.0)

    @property
    def averaged(self) -> bool:
        """Log-probabilities per answer token (IPO, SimPO, ORPO) rather than summed (DPO)."""
        return self.name in ("orpo", "simpo") or self.loss_type == "ipo"

    @property
    def needs_reference(self) -> bool:
        return self.name == "dpo"

    def describe(self) -> str:
        if self.name == "dpo":
            return (f"dpo ({self.loss_type}, beta {self.beta:g}"
                    + (f", label smoothing {self.label_smoothing:g}" if self.label_smoothing else "")
                    + (f", + {self.rpo_alpha:g} x the chosen answers' NLL" if self.rpo_alpha else "") + ")")
        if self.name == "simpo":
            return f"simpo (beta {self.beta:g}, gamma {self.gamma:g})"
        return f"orpo (lambda {self.lam:g})"


def pair_losses(obj: Objective, pol_c: torch.Tensor, pol_r: torch.Tensor, ref_c: torch.Tensor | None,
                ref_r: torch.Tensor | None) -> torch.Tensor:
    """Per pair loss; log-probabilities already averaged where obj.averaged."""
    ls = obj.label_smoothing
    if obj.name == "dpo":
        z = (pol_c - pol_r) - (ref_c - ref_r)
        if obj.loss_type == "sigmoid":
            return -(1 - ls) * F.logsigmoid(obj.beta * z) - ls * F.logsigmoid(-obj.beta * z)
        if obj.loss_type == "hinge":
            return torch.relu(1 - obj.beta * z)
        return (z - 1 / (2 * obj.beta)) ** 2  # ipo
    if obj.name == "simpo":
        z = pol_c - pol_r - obj.gamma / obj.beta
        return -(1 - ls) * F.logsigmoid(obj.beta * z) - ls * F.logsigmoid(-obj.beta * z)
    # orpo: the log odds of an answer, log(p / (1 - p)) with p its per-token average probability
    log_odds = (pol_c - pol_r) - (torch.log1p(-torch.exp(pol_c)) - torch.log1p(-torch.exp(pol_r)))
    return -obj.lam * F.logsigmoid(log_odds)


# ---------------------------------------------------------------------------------------------
# Batches of pairs


@dataclass
class PairBatch:
    """One micro-batch of pairs: `batch` holds sequences 2k (chosen) and 2k+1 (rejected) of pair k. For each
    labelled position (Batch.label_index order): `owner`, the sequence it belongs to, and `answer`, whether it is
    an answer token (False: a chosen prompt token, labelled for orpo's NLL only)."""

    batch: Batch
    owner: torch.Tensor
    answer: torch.Tensor
    pairs: int

    def to(self, device: torch.device) -> "PairBatch":
        return PairBatch(self.batch.to(device), self.owner.to(device, non_blocking=True),
                         self.answer.to(device, non_blocking=True), self.pairs)


def _through_answer(ex: Example) -> Example:
    """`ex` labelled on every token up to the end of its answer (what the template adds after it stays out)."""
    labels = np.asarray(ex.labels)
    last = int(np.flatnonzero(labels != IGNORE)[-1])
    ids = np.asarray(ex.input_ids)
    return Example(ids, np.where(np.arange(len(ids)) <= last, ids, IGNORE))


def pair_batch(pairs: list, ids: list[int], *, capacity: int, varlen: bool, pad_id: int,
               chosen_prompt: bool = False) -> PairBatch:
    """Pairs `ids` of `pairs` (PairExample) as one micro-batch: one packed row (varlen), or the sequences packed
    into bins of `capacity` tokens stacked as rows. `chosen_prompt` (orpo): the chosen sequences' prompt tokens
    are labelled too."""
    from qflash.data.stats import best_fit_decreasing

    flat: list[Example] = [ex for i in ids for ex in (pairs[i].chosen, pairs[i].rejected)]
    seqs = [_through_answer(e) if chosen_prompt and k % 2 == 0 else e for k, e in enumerate(flat)]
    rows = [list(range(len(flat)))] if varlen else [sorted(b) for b in best_fit_decreasing(
        [len(e.input_ids) for e in flat], capacity)]
    if varlen:
        batch = pack_rows(seqs, rows[0], varlen=True)
    else:
        batch = stack_rows([pack_rows(seqs, r, varlen=False) for r in rows], pad_id)
    owner = torch.full(batch.labels.shape, -1, dtype=torch.long)
    answer = torch.zeros(batch.labels.shape, dtype=torch.bool)
    for k, members in enumerate(rows):
        at = 0
        for m in members:
            n = len(flat[m].input_ids)
            owner[k, at:at + n] = m
            answer[k, at:at + n] = torch.as_tensor(flat[m].labels) != IGNORE
            at += n
    keep = labelled_positions(batch.labels)
    flat_of = lambda t: t[:, 1:].reshape(-1).index_select(0, keep)  # noqa: E731
    return PairBatch(batch, flat_of(owner), flat_of(answer), len(ids))


# ---------------------------------------------------------------------------------------------
# Log-probabilities of the answers


def sequence_logps(model: torch.nn.Module, pb: PairBatch, chunk_tokens: int = 1024) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per sequence (PairBatch order): the summed log-probability of its answer tokens (fp32, with gradients),
    its answer tokens, and its summed log-probability over every labelled token (differs from the first only
    where the chosen prompts are labelled: orpo). lm_head runs on the labelled positions only, in checkpointed
    chunks."""
    from qflash.train.loss import _causal_lm, _ce_chunk, _plain_head, device_inputs, logit_softcap

    lm, batch = _causal_lm(model), pb.batch
    labels = batch.labels[:, 1:].reshape(-1)
    keep = batch.label_index if batch.label_index is not None else labelled_positions(batch.labels)
    n = 2 * pb.pairs
    if not _plain_head(lm):
        logits = model(**batch.model_inputs()).logits[:, :-1].float()
        ce = F.cross_entropy(logits.reshape(-1, logits.size(-1)), labels, ignore_index=IGNORE,
                             reduction="none").index_select(0, keep)
    else:
        hidden = lm.get_decoder()(**device_inputs(model, batch)).last_hidden_state
        hidden = hidden[:, :-1].reshape(-1, hidden.size(-1)).index_select(0, keep)
        y = labels.index_select(0, keep)
        head, cap = lm.get_output_embeddings(), logit_softcap(lm)
        parts = []
        for s in range(0, hidden.size(0), chunk_tokens):
            h, t = hidden[s:s + chunk_tokens], y[s:s + chunk_tokens]
            parts.append(checkpoint(_ce_chunk, head, h, t, cap, "none", use_reentrant=False)
                         if torch.is_grad_enabled() else _ce_chunk(head, h, t, cap, "none"))
        ce = torch.cat(parts) if parts else hidden.new_zeros(0, dtype=torch.float32)
    zeros = torch.zeros(n, dtype=torch.float32, device=ce.device)
    answer = pb.answer.to(ce.dtype)
    return (zeros.index_add(0, pb.owner, -ce * answer), zeros.index_add(0, pb.owner, answer),
            zeros.index_add(0, pb.owner, -ce))


def preference_loss(model: torch.nn.Module, pb: PairBatch, obj: Objective, reference: torch.Tensor | None,
                    w_pair: float, w_token: float) -> tuple[torch.Tensor, torch.Tensor]:
    """This micro-batch's share of the step's loss (pair losses x w_pair, orpo's NLL x w_token), and its STATS
    summed over its pairs plus the chosen sequences' NLL and tokens (detached; mean_stats makes them means).
    `reference`: (pairs, 2) summed log-probabilities of chosen and rejected under the reference (dpo)."""
    logps, counts, all_logps = sequence_logps(model, pb)
    pol_c, pol_r = logps[0::2], logps[1::2]
    n_c, n_r = counts[0::2].clamp_min(1), counts[1::2].clamp_min(1)
    avg_c, avg_r = pol_c / n_c, pol_r / n_r
    if obj.needs_reference:
        ref_c, ref_r = reference[:, 0], reference[:, 1]
        if obj.averaged:  # ipo
            losses = pair_losses(obj, avg_c, avg_r, ref_c / n_c, ref_r / n_r)
        else:
            losses = pair_losses(obj, pol_c, pol_r, ref_c, ref_r)
        r_c, r_r = obj.beta * (pol_c - ref_c), obj.beta * (pol_r - ref_r)
        shown_c, shown_r = pol_c, pol_r
    else:
        losses = pair_losses(obj, avg_c, avg_r, None, None)
        scale = obj.lam if obj.name == "orpo" else obj.beta
        r_c, r_r = scale * avg_c, scale * avg_r
        shown_c, shown_r = avg_c, avg_r
    total = losses.sum() * w_pair
    # the chosen sequences' NLL over their labelled tokens (orpo labels their prompts too)
    chosen = pb.owner % 2 == 0
    nll, nll_tokens = -all_logps[0::2].sum(), chosen.sum()
    if obj.name == "orpo":
        total = total + nll * w_token
    elif obj.rpo_alpha:  # dpo + the chosen answers' NLL (the chosen sequences are labelled on their answers only)
        total = total + obj.rpo_alpha * nll * w_token
    r_c, r_r = r_c.detach(), r_r.detach()
    stats = torch.stack([r_c.sum(), r_r.sum(), (r_c - r_r).sum(), (r_c > r_r).float().sum(), shown_c.detach().sum(),
                         shown_r.detach().sum(), nll.detach(), nll_tokens.to(nll.dtype)])
    return total, stats


def reference_logps(model: torch.nn.Module, pairs: list, *, micro: int, capacity: int, varlen: bool, pad_id: int,
                    device: torch.device, autocast_dtype: torch.dtype | None, progress=None,
                    share: tuple[int, int] = (0, 1)) -> torch.Tensor:
    """(pairs, 2) float64: each pair's summed log-probabilities of its chosen and rejected answer under `model` as
    it is now, in eval mode (no dropout) and without gradients, batched as training batches them.
    `share` (rank, world): only every world-th micro-batch from rank on is scored (the others' rows stay zero), so
    processes can split the work and sum their results; each micro-batch holds the same pairs as with one process,
    so the numbers are the same bits."""
    rank, world = share
    was_training = model.training
    model.eval()
    out = torch.zeros(len(pairs), 2, dtype=torch.float64)
    try:
        with torch.no_grad(), torch.autocast(device.type, dtype=autocast_dtype or torch.float32,
                                             enabled=autocast_dtype is not None):
            starts = list(range(0, len(pairs), micro))[rank::world]
            mine = sum(min(micro, len(pairs) - s) for s in starts)
            done = 0
            for s in starts:
                ids = list(range(s, min(s + micro, len(pairs))))
                pb = pair_batch(pairs, ids, capacity=capacity, varlen=varlen, pad_id=pad_id).to(device)
                logps, _, _ = sequence_logps(model, pb)
                out[s:s + len(ids)] = logps.double().cpu().view(-1, 2)
                done += len(ids)
                if progress is not None:
                    progress(done, mine)  # this process's pairs (all of them with one process)
    finally:
        model.train(was_training)
    return out


def save_reference(path: Path, values: torch.Tensor, key: str) -> None:
    """Written whole or not at all (temporary file, fsync, rename)."""
    from qflash.paths import fsync_dir

    tmp = path.with_name(f".{path.name}.{os.getpid()}")
    with open(tmp, "wb") as f:
        torch.save({"key": key, "logps": values}, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    fsync_dir(path.parent)


def load_reference(path: Path, key: str, n: int) -> torch.Tensor | None:
    """The saved reference log-probabilities if they were made for `key` (same model start and pairs)."""
    if not path.is_file():
        return None
    saved = torch.load(path, map_location="cpu", weights_only=True)
    if saved.get("key") != key or tuple(saved["logps"].shape) != (n, 2):
        return None
    return saved["logps"]


def mean_stats(totals: list[float], pairs: int) -> dict[str, float]:
    """A step's STATS summed over its pairs (every process) -> means per pair, and "nll" per chosen token."""
    out = {name: v / pairs if pairs else math.nan for name, v in zip(STATS, totals)}
    out["nll"] = totals[len(STATS)] / totals[len(STATS) + 1] if totals[len(STATS) + 1] else math.nan
    return out
