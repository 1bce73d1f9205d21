"""The trainer's step reads the host once: no synchronisation inside the micro-batch loop (docs/hazards.md#h18).

The real ``Trainer.train_step`` and ``micro_batch_loss`` (the real tiny model, its chunked loss) run against a
recording engine; every way a tensor's value reaches Python (``item``, ``tolist``, ``bool``, ``float``,
``int``, ``index``, ``numpy``) is counted. On the CPU these are exactly the host synchronisations a GPU would
have (CUDA-only ones such as ``nonzero`` are not seen here; the loss has none: tests/unit/test_loss.py).

transformers (5.24) itself asks ``(packed_sequence_mask[:, -1] == 0).all()`` in
masking_utils.find_packed_sequence_indices in every decoder forward without an attention mask; for rows known
to hold one sequence each the trainer answers that question without the read (model/adapters.py
one_sequence_per_row). Such a read is counted apart, by name, so that a change in transformers shows up here.
"""

from __future__ import annotations

import math
import sys
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from cllama_dist.model.adapters import build_model
from cllama_dist.model.config import LoraConfig, ModelConfig
from cllama_dist.model.presets import TINY
from cllama_dist.trainer.batches import DeviceCopier, model_inputs
from cllama_dist.trainer.loop import Trainer
from cllama_dist.trainer.plan import Plan

ORIG, NEW, BLOCK = 1000, 1100, 24
SYNCS = ("item", "tolist", "__bool__", "__float__", "__int__", "__index__", "numpy")


class Recorder:
    """The events of a step in order: forward, backward, sync:<how>, step, discard."""

    def __init__(self):
        self.events: list[str] = []
        self.on = False

    def add(self, what: str) -> None:
        if self.on:
            self.events.append(what)


class Engine(torch.nn.Module):
    """What train_step uses of a DeepSpeed engine, around the real model and a real optimizer."""

    def __init__(self, model, rec: Recorder):
        super().__init__()
        self.module, self.rec = model, rec
        self.optimizer = SimpleNamespace(zero_grad=self._discard)
        self._opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
        self.losses: list[torch.Tensor] = []

    def _discard(self, set_to_none=True):
        self.rec.add("discard")
        self._opt.zero_grad(set_to_none=set_to_none)

    def forward(self, **kw):
        self.rec.add("forward")
        return self.module(**kw)

    def backward(self, loss):
        self.rec.add("backward")
        self.losses.append(loss.detach().clone())
        loss.backward()

    def step(self):
        self.rec.add("step")
        self._opt.step()
        self._opt.zero_grad(set_to_none=True)

    def set_gradient_accumulation_boundary(self, flag):
        pass


@pytest.fixture(scope="module")
def model():
    cfg = ModelConfig(config={"vocab_size": ORIG, **TINY})
    m, _ = build_model(cfg, LoraConfig(rank=4, dropout=0.0), 0, ORIG, NEW, torch.float32)
    return m


def trainer(model, rec: Recorder, cls=Trainer, accum: int = 3):
    t = object.__new__(cls)
    t.plan = Plan(world=1, micro=2, accum=accum, block=BLOCK, max_steps=10, train_sequences=64)
    t.sft, t.device, t.model_dtype = False, "cpu", torch.float32
    t.cfg = SimpleNamespace(model=SimpleNamespace(attn_implementation="sdpa"))
    data = np.random.default_rng(0).integers(0, NEW, (64, BLOCK)).astype(np.int32)
    t.order = SimpleNamespace(indices=lambda pos: np.asarray(pos) % 64)
    t.train_blocks = SimpleNamespace(rows=lambda idx: {"input_ids": data[idx].astype(np.int64)}, token_loss=False)
    t.attn = "sdpa"
    t.copier = DeviceCopier(lambda rows: model_inputs(rows, "cpu", "sdpa", torch.float32), "cpu")
    t.engine = Engine(model, rec)
    return t


@pytest.fixture
def rec(monkeypatch):
    r = Recorder()
    for name in SYNCS:
        original = getattr(torch.Tensor, name)

        def counted(self, *a, _name=name, _original=original, **k):
            caller = sys._getframe(1).f_code
            if caller.co_name == "find_packed_sequence_indices" and caller.co_filename.endswith("masking_utils.py"):
                r.add("transformers-sync")  # transformers' own, see the module docstring
            else:
                r.add(f"sync:{_name}")
            return _original(self, *a, **k)

        monkeypatch.setattr(torch.Tensor, name, counted)
    return r


def between(events: list[str], first: str, last: str) -> list[str]:
    i = events.index(first)
    j = len(events) - 1 - events[::-1].index(last)
    return events[i:j + 1]


def test_one_host_read_per_step_none_inside_the_micro_batch_loop(model, rec):
    t = trainer(model, rec)
    rec.on = True
    loss = t.train_step(0)
    rec.on = False
    loop = between(rec.events, "forward", "backward")
    assert loop.count("forward") == 3 and loop.count("backward") == 3
    assert [e for e in loop if e.startswith("sync")] == []
    assert [e for e in rec.events if e.startswith("sync")] == ["sync:tolist"]  # the step's one read
    assert rec.events.count("transformers-sync") == 0  # answered without the read (one_sequence_per_row)
    assert rec.events[-1] == "step"
    # The value: the mean of the micro-batch losses, as the host-side average was.
    assert loss == pytest.approx(sum(float(v) for v in t.engine.losses) / 3, rel=1e-12)


class Poisoned(Trainer):
    """tests/integration/fault_train.py's fault: the loss of one micro-batch times NaN."""

    bad_micro = 1

    def micro_batch_loss(self, rows, step, micro):
        loss = super().micro_batch_loss(rows, step, micro)
        return loss * float("nan") if micro == self.bad_micro else loss


@pytest.mark.parametrize("bad", [0, 1, 2])
def test_a_non_finite_micro_batch_skips_the_step_and_discards_its_gradients(model, rec, bad):
    Poisoned.bad_micro = bad
    t = trainer(model, rec, Poisoned)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    rec.on = True
    assert t.train_step(0) is None
    rec.on = False
    assert "step" not in rec.events and rec.events[-1] == "discard"
    assert [e for e in between(rec.events, "forward", "backward") if e.startswith("sync")] == []
    assert all(p.grad is None for p in model.parameters())  # nothing of the bad step is left
    assert all(torch.equal(before[n], p) for n, p in model.named_parameters())
    assert math.isnan(float(t.engine.losses[bad]))


class Syncing(Trainer):
    """A micro-batch loss that reads its value on the host: what the counter must catch."""

    def micro_batch_loss(self, rows, step, micro):
        loss = super().micro_batch_loss(rows, step, micro)
        assert loss.item() > 0
        return loss


def test_the_counter_sees_a_sync_inside_the_loop(model, rec):
    t = trainer(model, rec, Syncing, accum=2)
    rec.on = True
    t.train_step(0)
    rec.on = False
    assert "sync:item" in between(rec.events, "forward", "backward")


def test_packed_rows_keep_transformers_own_check():
    """Outside one_sequence_per_row (packed rows with position ids, flash-attn's case) transformers' function
    still finds the sequences; inside it the answer is None, as transformers' is for positions 0..T-1."""
    from transformers import masking_utils

    from cllama_dist.model.adapters import one_sequence_per_row

    packed = torch.tensor([[0, 1, 2, 0, 1, 0]])
    with one_sequence_per_row():
        assert masking_utils.find_packed_sequence_indices(torch.arange(6)[None]) is None
    assert masking_utils.find_packed_sequence_indices(packed).tolist() == [[0, 0, 0, 1, 1, 2]]
    assert masking_utils.find_packed_sequence_indices(torch.arange(6)[None]) is None
