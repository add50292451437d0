"""train.cuda_graphs (CPU twin): GraphedLoss's static buffers, signatures, gradient adoption and fallbacks.

RecordedGraph keeps the captured function and runs it again on replay, reading the graph's static
input buffers: if a replay read stale inputs, skipped the scale, or accumulated into other tensors than
the parameters' .grad, the losses and gradients below would differ from the eager ones.
"""

import pytest
import torch

from qflash.model.activation_offload import HostArena
from qflash.train.graphs import GraphedLoss, RecordedGraph, graph_blocker, random_blocker
from qflash.train.loop import micro_batches
from qflash.train.loss import loss_sum
from test_memory_levers import _setup


def _eager_step(model, params, batches, n):
    for b in batches:
        (loss_sum(model, b, fused_ce=True) * (1.0 / n)).backward()
    grads = [p.grad.clone() for p in params]
    for p in params:
        p.grad = None
    return grads


def _graphed_step(graphed, params, batches, n):
    losses = [graphed(b, 1.0 / n) for b in batches]
    grads = [p.grad.clone() for p in params]
    for p in params:
        p.grad = None  # an optimizer's zero_grad(set_to_none=True): GraphedLoss puts its tensors back, zeroed
    return losses, grads


def test_replays_give_the_eager_losses_and_gradients(tiny_models, identity_subset, tmp_path):
    setup = _setup(tiny_models["qwen2"], identity_subset, tmp_path, "lora.dropout=0")
    model = setup.model
    params = [p for p in model.parameters() if p.requires_grad]
    # Two data sets of different shapes, each seen three times (a signature is captured on its second sighting).
    one, two = micro_batches(setup, list(range(8))), micro_batches(setup, list(range(8, 11)))
    assert one[0].input_ids.shape != two[0].input_ids.shape
    steps = [one, two, one, two, one, two]
    graphed = GraphedLoss(model, params, factory=RecordedGraph, fused_ce=True)
    for batches in steps:
        n = sum(int((b.labels[:, 1:] != -100).sum()) for b in batches)
        want_losses = [loss_sum(model, b, fused_ce=True).item() for b in batches]
        for p in params:
            p.grad = None
        want = _eager_step(model, params, batches, n)
        losses, got = _graphed_step(graphed, params, batches, n)
        assert [x.item() for x in losses] == pytest.approx(want_losses, rel=1e-6)
        for g, w in zip(got, want):
            torch.testing.assert_close(g, w, rtol=1e-5, atol=1e-7)
    assert graphed.graphs, "no signature was captured"
    assert graphed.replays > 0 and graphed.eager_runs > 0
    # Each signature: one eager run, then captured and replayed.
    assert graphed.eager_runs == len(graphed.seen)


def test_grads_the_caller_kept_are_accumulated_into(tiny_models, identity_subset, tmp_path):
    setup = _setup(tiny_models["qwen2"], identity_subset, tmp_path, "lora.dropout=0")
    model = setup.model
    params = [p for p in model.parameters() if p.requires_grad]
    batch = micro_batches(setup, list(range(8)))[0]
    half = _eager_step(model, params, [batch], 2)  # the gradients of loss / 2
    graphed = GraphedLoss(model, params, factory=RecordedGraph, fused_ce=True)
    for _ in range(2):  # eager, then capture + replay
        graphed(batch, 1.0)
    captured = graphed.graphs[next(iter(graphed.graphs))].grads
    for p in params:
        p.grad = torch.ones_like(p)  # someone else's tensors, with something in them
    graphed(batch, 0.5)
    for p, g, w in zip(params, captured, half):
        assert p.grad is g  # the graph's own tensor is back in place, holding what was there plus loss / 2's
        torch.testing.assert_close(p.grad, w + 1, rtol=1e-5, atol=1e-6)


def test_more_shapes_than_graphs_run_eagerly(tiny_models, identity_subset, tmp_path):
    setup = _setup(tiny_models["qwen2"], identity_subset, tmp_path, "lora.dropout=0")
    params = [p for p in setup.model.parameters() if p.requires_grad]
    graphed = GraphedLoss(setup.model, params, max_graphs=1, factory=RecordedGraph, fused_ce=True)
    a, b = micro_batches(setup, list(range(8)))[0], micro_batches(setup, list(range(1)))[0]
    assert a.input_ids.shape != b.input_ids.shape
    for batch in (a, a, b, b, b, a):
        graphed(batch, 1.0)
    assert len(graphed.graphs) == 1 and graphed.replays == 2 and graphed.eager_runs == 4


def test_steps_that_draw_random_numbers_are_not_captured(tiny_models, identity_subset, tmp_path):
    setup = _setup(tiny_models["qwen2"], identity_subset, tmp_path, "lora.dropout=0.1")
    assert "dropout 0.1" in random_blocker(setup.model)
    assert graph_blocker(setup.model, torch.device("cpu")) == "not on a CUDA device"
    quiet = _setup(tiny_models["qwen2"], identity_subset, tmp_path / "b", "lora.dropout=0")
    assert random_blocker(quiet.model) is None


def test_host_arena_keeps_buffers_graphs_use():
    arena = HostArena()
    t = torch.zeros(4, 8)
    first = arena.take(t)
    assert first.shape == t.shape and arena.position == 1
    arena.position = 0
    assert arena.take(t).data_ptr() == first.data_ptr()  # the same buffer again, in call order
    arena.captured()
    arena.position = 0
    bigger = arena.take(torch.zeros(8, 8))
    assert bigger.data_ptr() != first.data_ptr()
    assert len(arena.kept) == 1  # the captured graph still writes the first one
    arena.position = 0
    arena.take(torch.zeros(16, 8))
    assert len(arena.kept) == 1  # the 8 x 8 one no graph uses is let go


class _FailingGraph(RecordedGraph):
    def capture(self, fn, pool=None):
        raise RuntimeError("operation not permitted when stream is capturing")


def test_a_failed_capture_leaves_that_shape_eager_with_the_same_result(tiny_models, identity_subset, tmp_path, caplog):
    setup = _setup(tiny_models["qwen2"], identity_subset, tmp_path, "lora.dropout=0")
    params = [p for p in setup.model.parameters() if p.requires_grad]
    batch = micro_batches(setup, list(range(8)))[0]
    want = _eager_step(setup.model, params, [batch], 1)
    graphed = GraphedLoss(setup.model, params, factory=_FailingGraph, fused_ce=True)
    for i in range(3):
        with caplog.at_level("WARNING"):
            graphed(batch, 1.0)
        got = [p.grad.clone() for p in params]
        for p in params:
            p.grad = None
        for g, w in zip(got, want):
            torch.testing.assert_close(g, w, rtol=1e-5, atol=1e-7)
    assert not graphed.graphs and len(graphed.failed) == 1 and graphed.eager_runs == 3
    assert sum("capture failed" in r.message for r in caplog.records) == 1  # said once, on the second sighting


def test_captures_stop_after_repeated_failures(tiny_models, identity_subset, tmp_path, caplog):
    """A cause that breaks one capture usually breaks every one: after MAX_FAILURES the run stays eager (no more
    attempts, no more warnings), with the same gradients."""
    setup = _setup(tiny_models["qwen2"], identity_subset, tmp_path, "lora.dropout=0")
    params = [p for p in setup.model.parameters() if p.requires_grad]
    one, two, three = (micro_batches(setup, ids)[0] for ids in (list(range(8)), list(range(8, 11)), [11]))
    assert len({b.input_ids.shape for b in (one, two, three)}) == 3
    graphed = GraphedLoss(setup.model, params, factory=_FailingGraph, fused_ce=True)
    graphed.MAX_FAILURES = 2
    with caplog.at_level("WARNING"):
        for batch in (one, one, two, two, three, three, three):
            want = _eager_step(setup.model, params, [batch], 1)
            graphed(batch, 1.0)
            for p, w in zip(params, want):
                torch.testing.assert_close(p.grad, w, rtol=1e-5, atol=1e-7)
                p.grad = None
    warnings = [r.message for r in caplog.records if "capture failed" in r.message]
    assert len(warnings) == 2 and "no more are tried" in warnings[-1]
    assert len(graphed.failed) == 2 and graphed.eager_runs == 7 and not graphed.graphs


def test_static_inputs_keep_the_batch_aliasing():
    """cu_seq_lens_q and cu_seq_lens_k are one tensor in a packed batch; the compiled layers guard on that, so
    the graph's input buffers must keep them one (copied apart, dynamo recompiled inside the capture on the
    H100, where nothing may compile, and every capture failed)."""
    from qflash.model.attention import NO_MASK
    from qflash.train.graphs import _signature, _static_copies

    cu = torch.tensor([0, 3, 5], dtype=torch.int32)
    ids = torch.arange(5).view(1, 5)
    inputs = {"input_ids": ids, "cu_seq_lens_q": cu, "cu_seq_lens_k": cu, "attention_mask": NO_MASK,
              "max_length_q": 3}
    static = _static_copies(inputs)
    assert static["cu_seq_lens_q"] is static["cu_seq_lens_k"] and static["cu_seq_lens_q"] is not cu
    assert static["input_ids"] is not ids and torch.equal(static["input_ids"], ids)
    assert static["attention_mask"] is NO_MASK and static["max_length_q"] == 3
    # the same shapes with the two apart are another signature (the graph above would read only one of them)
    apart = {**inputs, "cu_seq_lens_k": cu.clone()}
    labels, keep = torch.zeros(4, dtype=torch.long), torch.arange(4)
    assert _signature(apart, labels, keep) != _signature(inputs, labels, keep)
    assert _signature({**inputs}, labels, keep) == _signature(inputs, labels, keep)


def test_auto_captures_small_models_only(tiny_models, identity_subset, tmp_path, monkeypatch):
    """train.cuda_graphs=auto: small models (CPU-bound steps) are captured, models of AUTO_MAX_PARAMETERS and
    more stay eager; 4-bit weights count at their full shape, not their packed bytes."""
    from transformers import AutoModelForCausalLM

    from qflash.train import graphs

    setup = _setup(tiny_models["qwen2"], identity_subset, tmp_path, "lora.dropout=0")
    model = setup.model
    assert any(getattr(p, "quant_state", None) is not None for p in model.parameters()), "expected NF4 weights"
    plain = AutoModelForCausalLM.from_pretrained(str(tiny_models["qwen2"]))
    lora = sum(p.numel() for n, p in model.named_parameters() if "lora_" in n)
    n = graphs.model_parameters(model)
    assert n == sum(p.numel() for p in plain.parameters()) + lora
    cuda = torch.device("cuda")  # only its type is read: no GPU needed
    assert graph_blocker(model, cuda, "auto") is None
    assert graph_blocker(model, cuda, True) is None
    assert graph_blocker(model, cuda, False) == "train.cuda_graphs=false"
    monkeypatch.setattr(graphs, "AUTO_MAX_PARAMETERS", n)
    reason = graph_blocker(model, cuda, "auto")
    assert reason.startswith("auto:") and "train.cuda_graphs=true" in reason
    assert graph_blocker(model, cuda, True) is None  # forced on: captured whatever the size


def test_capture_redirects_stale_streams_only_while_capturing():
    """Where torch has the switch, captures run with autograd's stale-stream redirect on, and it is put back."""
    from qflash.train.graphs import _stale_streams_redirected

    state = getattr(torch._C, "_override_stale_capture_stream", None)
    if state is None:
        pytest.skip("this torch has no stale-capture-stream switch")
    before = bool(state())
    with _stale_streams_redirected():
        assert state() is True
    assert bool(state()) == before


def test_signature_memory_is_bounded():
    """A long supervised run brings a new signature nearly every micro-batch: what GraphedLoss remembers of them
    stays bounded, and a signature seen twice in a row still counts as repeated."""
    graphed = GraphedLoss(torch.nn.Linear(2, 2), [], factory=RecordedGraph)
    graphed.MAX_SEEN = 8
    for i in range(100):
        assert graphed._sighting(("shape", i)) == 0
        assert len(graphed.seen) <= 8
    assert graphed._sighting(("shape", 99)) == 1
