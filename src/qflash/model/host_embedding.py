"""The frozen input-embedding table kept in CPU memory (`train.embedding_on_cpu`).

The input embedding is a lookup: one row of a (vocab x hidden) table per token. For Qwen2.5-7B the
table is 1.09 GB (152,064 x 3,584, bf16) and a 4 x 2048 step reads 8,192 rows of it (58 MB). LoRA does
not train it, so it can live in host memory: the token ids come to the CPU, the rows are gathered
into a pinned buffer and sent to the GPU, where they are cast to fp32 as before (the fp32 residual).
A gather is exact, so the model computes the same values.

Left on the GPU, said once with the reason: a table tied to lm_head (the matmul needs it there and
nothing would be freed), a trained one (LoRA on it, modules_to_save: PEFT has wrapped it), anything
but a plain `nn.Embedding` (scaled embeddings, max_norm).

Applied by add_lora after PEFT has wrapped the model, so only training sees it: `qflash chat`,
`generate`, `serve` and `eval` load the base as stored, `merge` reads the safetensors files, and the
adapter PEFT saves holds the LoRA tensors only (tested).
"""

from __future__ import annotations

import logging

import torch

from qflash.model.loading import embeddings_tied

log = logging.getLogger(__name__)


class HostEmbedding(torch.nn.Module):
    """A frozen embedding lookup whose table stays on the CPU; the rows it returns are on `device`."""

    def __init__(self, table: torch.Tensor, device: torch.device, out_dtype: torch.dtype | None = None,
                 padding_idx: int | None = None):
        super().__init__()
        # A plain attribute, neither parameter nor buffer: `.to()`, DDP and Accelerate leave it on the
        # CPU and `model.device` (its first parameter's) still names the GPU.
        self.table = table.detach().to("cpu")  # (vocab, hidden)
        self.target = torch.device(device)
        self.out_dtype = out_dtype
        self.padding_idx = padding_idx
        self.num_embeddings, self.embedding_dim = self.table.shape

    @property
    def weight(self) -> torch.Tensor:
        """The table itself (on the CPU), for code that reads `get_input_embeddings().weight`."""
        return self.table

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        ids = input_ids.to("cpu").reshape(-1)  # a few KB; waits for the GPU work queued before it
        pinned = self.target.type == "cuda"
        rows = torch.empty((ids.numel(), self.embedding_dim), dtype=self.table.dtype, pin_memory=pinned)
        torch.index_select(self.table, 0, ids, out=rows)  # (tokens, hidden)
        out = rows.view(*input_ids.shape, self.embedding_dim).to(self.target, non_blocking=True)
        return out if self.out_dtype is None else out.to(self.out_dtype)

    def extra_repr(self) -> str:
        return f"{self.num_embeddings}, {self.embedding_dim}, table on cpu, rows to {self.target}"


def why_not_on_host(model) -> str | None:
    """Why the input embedding cannot move to CPU memory (None: it can)."""
    emb = model.get_input_embeddings()
    if type(emb) is not torch.nn.Embedding:
        return f"it is a {type(emb).__name__}, not a plain frozen nn.Embedding (trained, or not a plain lookup)"
    if emb.weight.requires_grad:
        return "it is trained"
    if emb.max_norm is not None:
        return "its max_norm rewrites the table during lookups"
    if embeddings_tied(model):
        return "it is tied to lm_head, which needs it on the GPU"
    return None


def keep_input_embedding_on_host(model, fp32_rows: bool = False) -> bool:
    """Replace `model`'s frozen input embedding by a HostEmbedding; False (said why) when it stays.

    The rows go to the device the table was on. On a CPU model that changes nothing but the module
    (the tests use it so); training applies it on CUDA only (train/levers.py, train.embedding_on_cpu).
    `fp32_rows`: the rows are cast to fp32 (quant.residual_dtype=fp32, whose forward hook sat on the module
    replaced here).
    """
    emb = model.get_input_embeddings()
    if isinstance(emb, HostEmbedding):
        return True
    reason = why_not_on_host(model)
    if reason is not None:
        (log.info if "tied" in reason else log.warning)("train.embedding_on_cpu: the input embedding stays on the GPU: %s", reason)
        return False
    # The fp32 residual (model/loading.py upcast_residual_path) casts the rows with a forward hook on
    # the module replaced here; the cast moves inside.
    out_dtype = torch.float32 if fp32_rows else None
    host = HostEmbedding(emb.weight, emb.weight.device, out_dtype, emb.padding_idx)
    model.set_input_embeddings(host)
    log.info("train.embedding_on_cpu: input embedding table (%.2f GB) in CPU memory, rows sent per batch",
             host.table.numel() * host.table.element_size() / 1e9)
    return True
