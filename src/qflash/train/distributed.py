"""Several processes (torchrun / accelerate launch): who I am, how a step's samples are split, sums.

The step is the unit that does not change with the number of processes: optimizer step k consumes
the same samples (train.micro_batch_size * train.grad_accum of them, the global batch) whether one
process or eight run it; process r takes every N-th of them. So the loss and the data position are
the same for any N, and a checkpoint written with N processes resumes with M.

The loss is token-weighted over the whole global batch: each process divides its summed token
losses by the global count of trained tokens (an all-reduce), and DDP averages gradients over the N
processes, so each process scales its loss by N. Processes may get different numbers of packed
micro-batches; they all run the largest count (zero-weighted repeats) so DDP's gradient
synchronisation, which happens on the last micro-batch, stays in step.
"""

from __future__ import annotations

import contextlib
import math
import os
from dataclasses import dataclass, fields

import torch

from qflash.data.batching import Batch
from qflash.errors import ConfigError


@dataclass
class Ranks:
    rank: int = 0
    world: int = 1
    accelerator: object | None = None

    @property
    def main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world > 1

    def _reduce(self, value: float, op) -> float:
        if not self.distributed:
            return value
        t = torch.tensor([value], dtype=torch.float64, device=self.accelerator.device)
        torch.distributed.all_reduce(t, op=op)
        return float(t.item())

    def sum(self, value: float) -> float:
        return self._reduce(value, torch.distributed.ReduceOp.SUM if self.distributed else None)

    def max(self, value: float) -> float:
        return self._reduce(value, torch.distributed.ReduceOp.MAX if self.distributed else None)

    def sum_tensor(self, t: torch.Tensor) -> torch.Tensor:
        """`t` summed over the processes (on this process's device for the collective; back where it was)."""
        if not self.distributed:
            return t
        on = t.to(self.accelerator.device)
        torch.distributed.all_reduce(on, op=torch.distributed.ReduceOp.SUM)
        return on.to(t.device)

    def barrier(self) -> None:
        if self.distributed:
            self.accelerator.wait_for_everyone()

    def shard(self, ids: list[int]) -> list[int]:
        """This process's share of a step's samples: every world-th one, starting at rank."""
        return ids[self.rank :: self.world]


def launched_distributed() -> bool:
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def _env_flag(name: str) -> bool:
    return os.environ.get(name, "false").lower() in ("1", "true", "yes")


def fsdp_requested() -> bool:
    """An FSDP launch (accelerate launch --config_file configs/accelerate/fsdp2.yaml sets this)."""
    return launched_distributed() and _env_flag("ACCELERATE_USE_FSDP")


def make_accelerator(cpu: bool):
    """The Accelerator for this process; the launcher's accelerate config picks DDP, FSDP2 or DeepSpeed."""
    from accelerate import Accelerator
    from accelerate.utils import DistributedType

    if cpu and launched_distributed() and _env_flag("ACCELERATE_USE_DEEPSPEED"):
        raise ConfigError("DeepSpeed runs on GPUs only (Accelerate ignores it on the CPU); on the CPU launch with "
                          "configs/accelerate/ddp.yaml or fsdp2.yaml, or train on GPUs")
    # Mixed precision is qflash's own (autocast around the loss); Accelerate only places and wraps.
    accelerator = Accelerator(cpu=cpu, mixed_precision="no")
    if accelerator.distributed_type == DistributedType.MULTI_CPU and fsdp_requested():
        # Accelerate sets FSDP up only on accelerators; FSDP2 itself runs on the CPU (gloo), which is
        # how CI tests it. Same plugin, read from the same environment the launcher wrote.
        from accelerate.utils import FullyShardedDataParallelPlugin

        accelerator.state.fsdp_plugin = FullyShardedDataParallelPlugin()
        accelerator.state.distributed_type = DistributedType.FSDP
    return accelerator


def strategy_of(accelerator) -> str:
    from accelerate.utils import DistributedType

    kind = accelerator.distributed_type
    if kind == DistributedType.FSDP:
        if accelerator.state.fsdp_plugin.fsdp_version != 2:
            raise ConfigError("FSDP1 cannot shard 4-bit weights next to LoRA's fp32 ones; set fsdp_version: 2 in the "
                              "accelerate config (configs/accelerate/fsdp2.yaml)")
        return "fsdp2"
    if kind == DistributedType.DEEPSPEED:
        stage = accelerator.state.deepspeed_plugin.zero_stage
        if stage not in (1, 2):
            raise ConfigError(f"DeepSpeed ZeRO-{stage}: ZeRO-3 would partition the frozen NF4 weights, which "
                              "bitsandbytes' 4-bit parameters do not survive; use ZeRO-2 "
                              "(configs/accelerate/deepspeed_zero2.yaml) or FSDP2 to shard the base model")
        return "deepspeed"
    return "ddp" if accelerator.num_processes > 1 else "single"


def ranks_of(accelerator) -> Ranks:
    return Ranks(accelerator.process_index, accelerator.num_processes, accelerator)


def _is_dtensor(t) -> bool:
    from torch.distributed.tensor import DTensor

    return isinstance(t, DTensor)


def _full(t: torch.Tensor) -> torch.Tensor:
    """The whole tensor, whatever the strategy sharded (a collective for FSDP2's DTensors)."""
    return t.full_tensor() if _is_dtensor(t) else t


class Parallel:
    """One optimizer step's mechanics under each strategy, and the run state in one layout for all.

    single / ddp / fsdp2 go through Accelerate's prepare (DDP wrapper; FSDP2 `fully_shard` of every
    decoder layer, the 4-bit weights sharded as bf16 storage); deepspeed through Accelerate's
    DeepSpeed engine (ZeRO-2: the fp32 LoRA master weights' gradients and Adam states partitioned).
    The LoRA weights and the optimizer state are saved whole, in the layout a single process's
    torch AdamW has (state by parameter index), so a checkpoint resumes under any strategy and any
    number of processes.
    """

    def __init__(self, accelerator, model: torch.nn.Module, optimizer: torch.optim.Optimizer, *,
                 micro_batch_size: int, max_grad_norm: float, autocast_dtype: torch.dtype | None = None,
                 cuda_graphs: bool | str = False, fused_ce: bool = False):
        self.accelerator = accelerator
        self.autocast_dtype = autocast_dtype
        self.strategy = strategy_of(accelerator)
        self.max_grad_norm = max_grad_norm
        self.names = [n for n, p in model.named_parameters() if p.requires_grad]  # the optimizer's order
        if self.strategy == "deepspeed":
            world = accelerator.num_processes
            accelerator.state.deepspeed_plugin.deepspeed_config.update({
                # qflash decides the batches (packing makes their number vary): one DeepSpeed
                # "micro step" per call, the accumulation boundary set by hand on the last one.
                "train_micro_batch_size_per_gpu": micro_batch_size,
                "gradient_accumulation_steps": 1,
                "train_batch_size": micro_batch_size * world,
                "gradient_clipping": max_grad_norm,
                # fp32 master weights and qflash's own autocast, as in every other strategy
                "bf16": {"enabled": False},
                "fp16": {"enabled": False},
            })
        # fp16 (GPUs without bf16): dynamic loss scaling. A step whose scaled gradients overflow is skipped (the
        # optimizer does not step) and the scale is lowered; after 2000 good steps in a row it is raised again.
        self.scaler = None
        if autocast_dtype == torch.float16:
            if self.strategy in ("fsdp2", "deepspeed"):
                raise ConfigError(f"quant.compute_dtype=fp16 trains with one process or DDP ({self.strategy} is not "
                                  "supported with fp16 loss scaling); use bf16 on this GPU, or launch with DDP")
            device = next((p.device for p in model.parameters() if p.requires_grad), torch.device("cuda"))
            self.scaler = torch.amp.GradScaler(device.type)
        self.module, self.optimizer = accelerator.prepare(LossModule(model, autocast_dtype, fused_ce), optimizer)
        self.units = 0
        if self.strategy == "fsdp2":
            from torch.distributed.fsdp import FSDPModule

            self.units = sum(isinstance(m, FSDPModule) for m in self.module.modules())
        # FSDP2 has replaced the parameters by sharded DTensors (Accelerate re-pointed the optimizer).
        by_name = dict(model.named_parameters())
        self.params = [by_name[n] for n in self.names]
        self.graphed = None
        self.graphs_note = "train.cuda_graphs=false"
        if cuda_graphs is not False and self.scaler is not None:
            self.graphs_note = "off: fp16 loss scaling (the scale changes between steps)"
        elif cuda_graphs is not False:
            from qflash.train.graphs import GraphedLoss, graph_blocker

            device = self.params[0].device if self.params else torch.device("cpu")
            blocker = ("several processes (captured steps are single-process only)" if self.strategy != "single"
                       else graph_blocker(model, device, cuda_graphs))
            if blocker is None:
                self.graphed = GraphedLoss(model, self.params, fused_ce=fused_ce)
                self.graphs_note = "on"
            else:
                self.graphs_note = f"off: {blocker}"

    # ---- a step ----
    @contextlib.contextmanager
    def micro_step(self, last: bool):
        """Forward and backward of one micro-batch; gradients are synchronised on the step's last."""
        if self.strategy == "ddp" and not last:
            with self.accelerator.no_sync(self.module):
                yield
            return
        if self.strategy == "fsdp2":
            self.module.set_requires_gradient_sync(last)
        elif self.strategy == "deepspeed":
            self.module.set_gradient_accumulation_boundary(last)
        yield

    def loss(self, batch: Batch) -> torch.Tensor:
        return self.module(**batch_fields(batch))

    def loss_and_backward(self, batch: Batch, weight: float, poison: bool = False) -> torch.Tensor:
        """The micro-batch's summed loss (detached), after backward of loss * weight; through a CUDA graph when
        train.cuda_graphs is on here. `poison`: the loss is made NaN first (fault injection: eager)."""
        if self.graphed is not None and not poison:
            with torch.autocast("cuda", dtype=self.autocast_dtype, enabled=self.autocast_dtype is not None):
                return self.graphed(batch, weight)
        token_loss = self.loss(batch)  # under the compute-dtype autocast, entered by the loss module
        if poison:
            token_loss = token_loss * float("nan")
        loss = token_loss * weight
        self.backward(self.scaler.scale(loss) if self.scaler is not None else loss)
        return token_loss.detach()

    def pref_loss_and_backward(self, pb, objective, reference, w_pair: float, w_token: float,
                               poison: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
        """Preference tuning's micro-step (train/preference.py preference_loss): its weighted share of the step's
        loss (detached) and its summed statistics, after backward of that share. Eager (no CUDA graphs)."""
        part, stats = self.module(**batch_fields(pb.batch), pref=(pb.owner, pb.answer, pb.pairs, objective, reference,
                                                                  w_pair, w_token))
        if poison:
            part = part * float("nan")
        self.backward(self.scaler.scale(part) if self.scaler is not None else part)
        return part.detach(), stats

    def backward(self, loss: torch.Tensor) -> None:
        if self.strategy == "deepspeed":
            self.module.backward(loss)  # the engine's backward: ZeRO reduces the gradients into partitions
        else:
            self.accelerator.backward(loss)

    def step(self, loss_finite: bool) -> tuple[float, bool]:
        """Clip, and apply the step if the loss and gradient norm are finite. Returns (norm, applied)."""
        if self.strategy == "deepspeed":
            # DeepSpeed clips (gradient_clipping) and skips a step whose gradients are not finite.
            self.module.step()
            norm = self.module.get_global_grad_norm()
            norm = float("nan") if norm is None else float(norm)
            return norm, bool(self.module.was_step_applied()) and loss_finite and math.isfinite(norm)
        if self.scaler is not None:
            self.scaler.unscale_(self.optimizer)  # the true gradients (inf/nan where the scaled ones overflowed)
        if self.max_grad_norm > 0:
            norm = self.accelerator.clip_grad_norm_(self.params, self.max_grad_norm)
        else:
            grads = [p.grad for p in self.params if p.grad is not None]
            norm = torch.nn.utils.get_total_norm(grads) if grads else torch.zeros(())
        norm = float(_full(norm)) if torch.is_tensor(norm) else float(norm)
        applied = loss_finite and math.isfinite(norm)
        if applied:
            if self.scaler is not None:
                self.scaler.step(self.optimizer)  # steps: the unscaled gradients are finite (checked above)
            else:
                self.optimizer.step()
        if self.scaler is not None:
            self.scaler.update()  # lowered after an overflow, raised after a run of good steps
        self.optimizer.zero_grad(set_to_none=True)
        return norm, applied

    def loss_scale(self) -> float | None:
        """fp16's current loss scale (None without loss scaling)."""
        return float(self.scaler.get_scale()) if self.scaler is not None else None

    def scaler_state(self) -> dict | None:
        return self.scaler.state_dict() if self.scaler is not None else None

    def load_scaler_state(self, state: dict | None) -> None:
        if self.scaler is not None and state:
            self.scaler.load_state_dict(state)

    # ---- state, in one layout for every strategy (collectives: every process calls these) ----
    def full_trainable(self) -> dict[str, torch.Tensor]:
        return {n: _full(p.detach()).to("cpu") for n, p in zip(self.names, self.params)}

    def full_optimizer_state(self) -> dict:
        if self.strategy == "deepspeed":
            return self._deepspeed_state()
        sd = self.optimizer.state_dict()
        if self.strategy == "fsdp2":
            sd["state"] = {i: {k: _full(v).to("cpu") if torch.is_tensor(v) else v for k, v in s.items()}
                           for i, s in sorted(sd["state"].items())}
        return sd

    def load_optimizer_state(self, sd: dict) -> None:
        if self.strategy == "deepspeed":
            self._load_deepspeed_state(sd)
            return
        if self.strategy == "fsdp2":
            from torch.distributed.tensor import distribute_tensor

            state = {}
            for i, s in sd["state"].items():
                p = self.params[int(i)]
                state[i] = {k: distribute_tensor(v.to(p.device), p.device_mesh, p.placements, src_data_rank=None)
                            if torch.is_tensor(v) and v.shape == p.shape else v for k, v in s.items()}
            sd = {**sd, "state": state}
        self.optimizer.load_state_dict(sd)

    def _zero(self):
        return self.module.optimizer  # the engine's ZeRO optimizer; .optimizer is the torch AdamW inside

    def _deepspeed_state(self) -> dict:
        from deepspeed.utils import safe_get_full_optimizer_state

        inner = self._zero().optimizer
        steps = [s["step"] for s in inner.state.values() if "step" in s]
        state = {}
        if steps:  # Adam states exist after the first applied step
            for i, p in enumerate(self.params):
                state[i] = {"step": steps[0].detach().clone().cpu(),
                            "exp_avg": safe_get_full_optimizer_state(p, "exp_avg").cpu(),
                            "exp_avg_sq": safe_get_full_optimizer_state(p, "exp_avg_sq").cpu()}
        groups = [{**{k: v for k, v in g.items() if k != "params"}, "params": list(range(len(self.params)))}
                  for g in inner.param_groups]
        return {"state": state, "param_groups": groups}

    def _load_deepspeed_state(self, sd: dict) -> None:
        from deepspeed.utils import safe_set_full_optimizer_state

        zero = self._zero()
        inner = zero.optimizer
        for g, saved in zip(inner.param_groups, sd["param_groups"]):
            g.update({k: v for k, v in saved.items() if k != "params"})
        if not sd["state"]:
            return
        step = next(iter(sd["state"].values()))["step"]
        for g in inner.param_groups:
            for flat in g["params"]:
                on_device = g.get("fused") or g.get("capturable")
                inner.state[flat] = {
                    "step": torch.as_tensor(step, dtype=torch.float32, device=flat.device if on_device else "cpu").clone(),
                    "exp_avg": torch.zeros_like(flat), "exp_avg_sq": torch.zeros_like(flat),
                }
        zero._lazy_init_hp_params_optimizer_state()  # ties each parameter to its slice of the flat states
        for i, p in enumerate(self.params):
            s = sd["state"][i]
            safe_set_full_optimizer_state(p, s["exp_avg"].to(p.device), "exp_avg")
            safe_set_full_optimizer_state(p, s["exp_avg_sq"].to(p.device), "exp_avg_sq")


class LossModule(torch.nn.Module):
    """The model plus qflash's loss as one module, so the strategy's wrapper (DDP, FSDP2, the DeepSpeed
    engine) wraps both: its forward hooks and gradient synchronisation see the whole step.

    `autocast_dtype`: mixed precision entered inside forward, because the DeepSpeed engine turns an
    outer torch.autocast off around its module.
    """

    def __init__(self, model: torch.nn.Module, autocast_dtype: torch.dtype | None = None, fused_ce: bool = False):
        super().__init__()
        self.model = model
        self.autocast_dtype = autocast_dtype
        self.fused_ce = fused_ce
        # Accelerate's FSDP2 auto-wrap shards one unit per class named here (the decoder layers); without
        # it the whole model would be one unit, gathered whole for the forward and held until backward.
        self._no_split_modules = list(getattr(model, "_no_split_modules", None) or [])

    def get_input_embeddings(self):
        # Accelerate's FSDP2 prepare gives the input embedding its own unit (sharded between uses). The
        # final norm and lm_head stay in the root unit: the loss reads lm_head's weight chunk by chunk
        # (directly with kernels.fused_ce, in each chunk's recompute without), which a unit of their own
        # would reshard after the first chunk.
        # Tied to lm_head (small Qwen, Llama 3.2): both stay in the root unit.
        from qflash.model.loading import embeddings_tied

        return None if embeddings_tied(self.model) else self.model.get_input_embeddings()

    def forward(self, pref=None, **batch_fields):
        """The batch's summed token loss; with `pref` (preference tuning: owner, pairs, objective, reference,
        w_pair, w_token), the pairs' weighted loss and statistics (train/preference.py preference_loss)."""
        from qflash.train.loss import loss_sum
        from qflash.train.preference import PairBatch, preference_loss

        def run():
            if pref is None:
                return loss_sum(self.model, Batch(**batch_fields), fused_ce=self.fused_ce)
            owner, answer, pairs, objective, reference, w_pair, w_token = pref
            return preference_loss(self.model, PairBatch(Batch(**batch_fields), owner, answer, pairs), objective,
                                   reference, w_pair, w_token)

        if self.autocast_dtype is None:
            return run()
        with torch.autocast(device_type=batch_fields["input_ids"].device.type, dtype=self.autocast_dtype):
            return run()


def batch_fields(batch: Batch) -> dict:
    return {f.name: getattr(batch, f.name) for f in fields(batch)}
