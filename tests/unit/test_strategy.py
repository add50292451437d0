"""Which strategy a launch asks for, and the clear refusals (FSDP1, ZeRO-3, DeepSpeed on the CPU)."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
from accelerate.utils import DistributedType

from qflash.errors import ConfigError
from qflash.train.distributed import make_accelerator, strategy_of


def _acc(kind, processes=2, fsdp_version=2, zero_stage=2):
    state = SimpleNamespace(fsdp_plugin=SimpleNamespace(fsdp_version=fsdp_version),
                            deepspeed_plugin=SimpleNamespace(zero_stage=zero_stage))
    return SimpleNamespace(distributed_type=kind, num_processes=processes, state=state)


def test_strategies_by_launch():
    assert strategy_of(_acc(DistributedType.NO, processes=1)) == "single"
    assert strategy_of(_acc(DistributedType.MULTI_GPU)) == "ddp"
    assert strategy_of(_acc(DistributedType.MULTI_CPU)) == "ddp"
    assert strategy_of(_acc(DistributedType.FSDP)) == "fsdp2"
    assert strategy_of(_acc(DistributedType.DEEPSPEED, zero_stage=2)) == "deepspeed"
    assert strategy_of(_acc(DistributedType.DEEPSPEED, zero_stage=1)) == "deepspeed"


def test_fsdp1_and_zero3_are_refused_with_what_to_use():
    with pytest.raises(ConfigError, match="fsdp_version: 2"):
        strategy_of(_acc(DistributedType.FSDP, fsdp_version=1))
    with pytest.raises(ConfigError, match=r"ZeRO-3.*deepspeed_zero2.yaml.*FSDP2"):
        strategy_of(_acc(DistributedType.DEEPSPEED, zero_stage=3))


def test_deepspeed_on_the_cpu_is_refused(monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("ACCELERATE_USE_DEEPSPEED", "true")
    with pytest.raises(ConfigError, match="DeepSpeed runs on GPUs only"):
        make_accelerator(cpu=True)
