"""`data check` at scale: 5,000 multi-turn conversations within a time budget, then a cache hit.

The acceptance figure is 50,000 conversations of ~300 tokens in <= 60 s on 2 cores, and <= 5 s
from the cache (measured with `time qflash data check`, see the report). A tenth of it must take
a tenth of the time, plus the fixed start-up costs of a process that this test does not pay.
"""

import io
import json
import random
import time

import pytest
from rich.console import Console

from qflash.data import commands

WORDS = ("the model learns to answer questions about data quality and training while keeping every reply "
         "short clear and useful for people who fine tune language models on small machines").split()
CHINESE = "数据质量决定了微调模型的效果我们需要检查每一条记录确保没有错误的编码或者缺失的回答"


def sentence(rng: random.Random, n: int) -> str:
    if rng.random() < 0.3:
        return "".join(rng.choice(CHINESE) for _ in range(n))
    return " ".join(rng.choice(WORDS) for _ in range(n)).capitalize() + "."


def write_sharegpt(path, n: int, seed: int = 0):
    """n ShareGPT conversations, 1-4 exchanges, some with a system prompt: ~300 tokens each."""
    rng = random.Random(seed)
    with open(path, "w", encoding="utf-8") as f:
        for _ in range(n):
            turns = [{"from": "system", "value": sentence(rng, 12)}] if rng.random() < 0.3 else []
            for _ in range(rng.choice([1, 2, 2, 3, 3, 4])):
                turns.append({"from": "human", "value": sentence(rng, rng.randint(10, 40))})
                turns.append({"from": "gpt", "value": sentence(rng, rng.randint(30, 110))})
            f.write(json.dumps({"conversations": turns}, ensure_ascii=False) + "\n")
    return path


@pytest.mark.slow
def test_check_5000_conversations_in_budget_then_from_cache(tmp_path, monkeypatch, smol_dir):
    monkeypatch.setattr(commands, "default_cache_dir", lambda: tmp_path / "data-cache")
    data = write_sharegpt(tmp_path / "big.jsonl", 5000)
    console = Console(file=io.StringIO(), width=200)

    t0 = time.perf_counter()
    assert commands.run_check(str(data), [], console=console) == 0
    cold = time.perf_counter() - t0
    t0 = time.perf_counter()
    assert commands.run_check(str(data), [], console=console) == 0
    warm = time.perf_counter() - t0

    text = console.file.getvalue()
    assert "5,000 records -> 5,000 samples" in text and "cache written" in text and "cache hit" in text
    assert cold <= 6.0 + 6.0, f"cold check took {cold:.1f}s"  # a tenth of the 60 s budget, plus slack for CI
    assert warm <= 1.5, f"cached check took {warm:.1f}s"
