"""`qflash demo` from any directory: the demo config and data come from the checkout, the run stays in the cwd."""

from pathlib import Path

from qflash.config import load_config
from qflash.demo import DEMO_CONFIG, _anchor_inputs, demo_root

REPO = Path(__file__).resolve().parents[2]


def test_demo_from_another_directory_reads_the_checkout_and_writes_here(tmp_path):
    assert demo_root(REPO) == REPO
    root = demo_root(tmp_path)  # no configs/ here: the source checkout's
    assert root == REPO
    cfg = load_config(root / DEMO_CONFIG, [])
    moved = _anchor_inputs(cfg, root, tmp_path)
    inputs = [s.path for s in cfg.data.datasets + cfg.data.eval_datasets] + [cfg.data.replay.prompts,
                                                                             cfg.eval.control_prompts]
    assert len(moved) == len(inputs) == 4
    assert all(Path(p).is_absolute() and Path(p).is_file() for p in inputs), inputs
    assert cfg.output_dir == "runs/demo"  # relative: the run goes under the user's working directory


def test_a_file_of_the_same_name_in_the_cwd_wins(tmp_path):
    mine = tmp_path / "data/demo/identity.json"
    mine.parent.mkdir(parents=True)
    mine.write_text("[]", encoding="utf-8")
    cfg = load_config(REPO / DEMO_CONFIG, [])
    _anchor_inputs(cfg, REPO, tmp_path)
    assert cfg.data.datasets[0].path == "data/demo/identity.json"
