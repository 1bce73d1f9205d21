"""The training loop: extend the vocabulary, train LoRA + new rows under DeepSpeed, evaluate, log, save.

One step = ``accum`` micro-batches per process, then one optimizer update. The Trainer is built from the run
resolved by setup.py (``resolve(cfg) -> RunSpec``: inputs, plan, schedule, engine choice, resume point, run
identity; everything that can be refused is refused there, before the model is built), then builds the model,
the DeepSpeed engine and the metrics from it. The pieces live beside this file: the batch plan (plan.py), the
schedule (stages.py: a plain run is one stage), the DeepSpeed engine (engine.py), checkpoints and when to save
them (checkpoint.py), metrics (metrics.py), validation (validate.py); the data order in data/loader.py; every
collective in distributed.py.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np
import torch

from .. import distributed as dist
from ..config import dump_yaml, to_dict
from ..data.loader import step_positions
from ..errors import UserError
from ..files import write_atomic
from ..model import flops
from ..model.scoring import summed_nll
from ..progress import Progress
from . import engine as engines
from .batches import DeviceCopier, model_inputs
from .checkpoint import Checkpointer, TrainerState
from .config import TrainConfig
from .metrics import Logger, Throughput, train_line
from .setup import STOP_FILE, RunSpec, claim, resolve, run_folder
from .stages import Gates

EXIT_DONE, EXIT_STOPPED, EXIT_NONFINITE = 0, 3, 4


class Trainer:
    def __init__(self, cfg: TrainConfig):
        self.device = dist.init(cfg.engine.timeout_minutes)
        self.run_dir = run_folder(cfg)
        self.lock = None
        try:
            self.lock, notes = claim(cfg, self.run_dir)
            self.checkpointer = Checkpointer(self.run_dir, cfg.checkpoint)
            self.spec: RunSpec = resolve(cfg, self.device, self.checkpointer, notes)
            spec = self.spec  # frozen: everything below is built from it
            # What the step reads, by the names train_step uses.
            self.cfg, self.plan, self.schedule = spec.cfg, spec.plan, spec.schedule
            self.train_blocks, self.order, self.validator = spec.data.train, spec.data.order, spec.data.validation
            self.notes = list(spec.notes)
            self._build_model()
            self._build_engine()
            self._build_metrics()
        except BaseException:
            self.close()
            raise

    # -- built from the run's spec ----------------------------------------------------------------------

    def _build_model(self) -> None:
        from ..model.adapters import DTYPES, build_model, count_parameters
        from ..tokenizer.merged import subword_spellings

        cfg, spec, vocab = self.cfg, self.spec, self.spec.inputs.vocab
        sub = subword_spellings(vocab) if spec.new_row_init == "subword" else None
        self.loss_kernel, why = "torch", "the hf loss"
        if cfg.model.loss == "chunked":
            from ..model.loss import resolve_kernel

            try:
                self.loss_kernel, why = resolve_kernel(cfg.model.loss_kernel, self.device)
            except ValueError as exc:
                raise UserError(f"model.loss_kernel: {exc}") from None
        self.loss_note = f"loss {cfg.model.loss}" + (f", kernel {self.loss_kernel} ({why})"
                                                       if cfg.model.loss == "chunked" else "")
        self.model_dtype = DTYPES[spec.engine.dtype]
        ds = spec.engine.ds_config
        self.model, self._keep_alive = build_model(cfg.model, cfg.lora, cfg.seed, vocab.orig_vocab, vocab.new_vocab,
                                                   self.model_dtype, ds if spec.engine.zero_stage == 3 else None, sub,
                                                   packed_rows=spec.inputs.rows_kept_apart and self.plan.micro > 1,
                                                   loss_kernel=self.loss_kernel)
        self.counts = count_parameters(self.model)
        self.attn = self.model.config._attn_implementation  # model.attn_implementation resolved (auto: adapters.py)
        self.copier = DeviceCopier(lambda rows: model_inputs(rows, self.device, self.attn, self.model_dtype),
                                   self.device)

    def _build_engine(self) -> None:
        if self.schedule.freezes:  # before DeepSpeed's own hooks, so that a frozen group's gradients reach it as zeros
            self.schedule.gates = Gates(self.model)
        self.engine = engines.initialize(self.model, self.cfg.optim, self.spec.engine.ds_config)
        resume = self.spec.resume
        if resume.path:
            self.checkpointer.load(self.engine, resume.path, resume.universal)
        self.start_step = resume.step

    def _build_metrics(self) -> None:
        cfg, spec = self.cfg, self.spec
        llama, vocab = spec.inputs.llama, spec.inputs.vocab
        self.flops = flops.run_flops(llama, vocab.orig_vocab, vocab.new_vocab, cfg.model.embeddings, self.plan.block,
                                     self.counts.lora,
                                     flops.checkpoint_share(llama.num_hidden_layers, cfg.model.gradient_checkpointing,
                                                            cfg.model.checkpoint_scope))
        peak = cfg.logging.peak_tflops or (flops.peak_tflops(torch.cuda.get_device_name())
                                           if self.device.startswith("cuda") else 0.0)
        self.peak_flops = peak * 1e12
        trackers: list = []

        def open_on_main() -> None:
            if cfg.logging.trackers and dist.is_main():
                from .trackers import open_trackers

                trackers.extend(open_trackers(cfg.logging.trackers, self.run_dir, to_dict(cfg), cfg.logging))

        dist.agree("opening the trackers", open_on_main)  # a tracker that is not installed stops every rank
        self.logger = Logger(self.run_dir, cfg.logging.tensorboard, self.start_step if spec.resume.path else -1,
                             trackers)
        self.throughput = Throughput(self.plan.tokens_per_step, self.plan.world, self.device, self.flops, self.peak_flops)
        dist.on_main("writing the run's settings", self._write_settings)
        self._announce()

    def _write_settings(self) -> None:
        """config.yaml records the run as it started; a resume with other settings writes config-step-N.yaml
        beside it instead of rewriting the run's history. ds_config.json is the DeepSpeed JSON as resolved."""
        text = dump_yaml(self.cfg)
        first = self.run_dir / "config.yaml"
        if not first.is_file():
            write_atomic(first, text)
        elif first.read_text() != text and self.spec.resume.path:
            later = self.run_dir / f"config-step-{self.start_step}.yaml"
            write_atomic(later, text)
            self.notes.append(f"note: the settings differ from {first}; recorded in {later}")
        write_atomic(self.run_dir / "ds_config.json", json.dumps(self.spec.engine.ds_config, indent=2) + "\n")
        if self.spec.resume.schedule_change:
            self.logger.log({"type": "note", "step": self.start_step, "schedule_change": self.spec.resume.schedule_change})

    def _announce(self) -> None:
        c, say, m, spec = self.counts, self.logger.say, self.cfg.model, self.spec
        inputs, eng, vocab = spec.inputs, spec.engine, spec.inputs.vocab
        say(f"cllama train: {self.plan.describe()}")
        from ..model.adapters import is_extended

        extended = is_extended(m, inputs.llama.vocab_size, vocab.orig_vocab, vocab.new_vocab)  # a merged model
        rows = spec.identity.rows
        if rows and (rows["rows"] != vocab.new_vocab or spec.identity.tied):
            say(f"  vocabulary rows: the base has {rows['base_rows']:,} rows for {rows['base_tokens']:,} tokens, the "
                f"trained model {rows['rows']:,} for {rows['tokens']:,} (padding rows reused first)"
                + ("; embeddings tied: lm_head is embed_tokens, one block of new rows" if spec.identity.tied else ""))
        init = "from the model" if extended else spec.new_row_init
        say(f"  vocabulary {vocab.orig_vocab:,} -> {vocab.new_vocab:,} ({m.embeddings}, init {init}); "
            f"DeepSpeed ZeRO-{eng.zero_stage}, {eng.dtype}, "
            f"gradient checkpointing {m.checkpoint_scope + ' layers' if m.gradient_checkpointing else 'off'}, "
            f"{self.attn} attention, {self.loss_note}, device {self.device}")
        say(f"  parameters: total {c.total:,}, LoRA {c.lora:,}, new rows {c.new_rows:,}, trainable {c.trainable:,} "
            f"({100 * c.share:.2f}%); optimizer state {c.optimizer_bytes(eng.dtype != 'fp32') / 2**20:,.1f} MiB")
        say(f"  FLOPs per token: {self.flops['actual'] / 1e9:,.3f} G as computed (LoRA: ~4N + recompute + attention), "
            f"{self.flops['conventional'] / 1e9:,.3f} G conventional (6N + 12LHs)"
            + ("" if self.peak_flops else "; MFU not reported (unknown device peak: set logging.peak_tflops)"))
        v = inputs.verified
        say(f"  shards verified: {v['shards']} on this rank ({v['bytes'] / 1e6:,.1f} MB hashed in {v['seconds']:.1f} s, "
            f"{v['from_record']} unchanged since an earlier check), all ranks agreeing")
        say(f"  DeepSpeed config {eng.name} ({eng.reason}); resolved copy in {self.run_dir / 'ds_config.json'}")
        fb, where = eng.frozen.choice, "GPU" if self.device.startswith("cuda") else "process"
        sizes = {ch: engines.expected_bytes(ch, c.total, c.trainable, self.plan.world, self.model_dtype.itemsize)
                 / 2**30 for ch in ("resident", "partitioned")}
        other = "partitioned" if fb == "resident" else "resident"
        say(f"  frozen base {fb} ({eng.frozen.reason}; engine.frozen_base): weights + optimizer state "
            f"{sizes[fb]:,.2f} GiB per {where} before activations ({other}: {sizes[other]:,.2f} GiB)")
        if extended:
            say(f"  the model's vocabulary is already extended ({m.path}: a merged model): rows "
                f"{vocab.orig_vocab:,}..{vocab.new_vocab - 1:,} train from their values there, "
                f"rows below stay frozen")
        if inputs.sft:
            man = inputs.manifest
            t = man["splits"]["train"]
            say(f"  instruction tuning: {t['examples']:,} examples in {t['rows']:,} {man['layout']} rows, template "
                f"{man['template']['name']}; loss on the {t['response_tokens']:,} response tokens of "
                f"{t['tokens']:,}, averaged per token over each global batch"
                + ("; packed examples attend only within themselves" if man["layout"] == "packed" else ""))
        elif self.cfg.data.document_mask:
            say("  documents kept apart (data.document_mask): attention within each document only, positions "
                "restarting at each, no document's first token predicted from the one before")
        for line in self.schedule.describe():
            say(f"  {line}")
        for note in self.notes:
            say(f"  {note}")
        if spec.resume.path:
            say(f"  resumed from {spec.resume.path} at step {self.start_step} "
                f"(sample {self.start_step * self.plan.global_batch:,})"
                + (f", in stage {self.schedule.at(self.start_step).name!r}" if self.schedule.staged else ""))

    # -- one step ---------------------------------------------------------------------------------------

    def to_device(self, rows: dict[str, np.ndarray]) -> dict[str, torch.Tensor]:
        """The model's forward arguments for ``rows`` (trainer/batches.py), on this rank's device, with the
        rows' labels under "labels" where they have any (popped before the forward)."""
        return self.copier.take(rows)

    def micro_batch_loss(self, rows: dict[str, np.ndarray], step: int, micro: int) -> torch.Tensor:
        """The loss of one micro-batch (``micro`` of ``plan.accum`` in optimizer step ``step``, from 0)."""
        inputs = dict(self.to_device(rows))
        labels = inputs.pop("labels", None)
        if not self.train_blocks.token_loss:  # plain pre-training blocks: every micro-batch has the same count
            return self.engine(input_ids=inputs["input_ids"], labels=inputs["input_ids"]).loss
        # Summed NLL over the loss tokens (responses; with data.document_mask every token but document starts),
        # divided by the step's loss-token count over all ranks and scaled by world x accum, which DeepSpeed's
        # gradient averaging and accumulation divide by again: the gradient is that of the mean over every loss
        # token of the global batch.
        nll = summed_nll(self.engine, inputs, inputs["input_ids"] if labels is None else labels)
        return nll * (self.plan.world * self.plan.accum / max(self.step_loss_tokens, 1))

    def train_step(self, step: int) -> float | None:
        """One optimizer step; returns the mean loss over all processes, or None when it was skipped.

        One host synchronisation for the whole step (docs/hazards.md#h18): the micro-batches' losses and a
        non-finite flag are accumulated on the device, every micro-batch runs its backward, then one all-reduce
        of [loss sum, non-finite count] and one read of it decide, on every rank alike, between the optimizer
        step and a skip. A skipped step's gradients (NaN ones included) are discarded before anything uses
        them: the optimizer never sees them, and ZeRO's next micro-batch overwrites its gradient partitions.
        """
        g = self.plan.global_batch
        positions = step_positions(step, g, self.plan.micro, dist.rank(), self.plan.world)
        if self.train_blocks.token_loss:
            # The whole step's rows (every rank's) are looked up once: their masks give the loss-token count, and
            # this rank's micro-batches are slices of them.
            step_rows = self.order.indices(np.arange(step * g, (step + 1) * g))
            self.step_loss_tokens = self.train_blocks.loss_tokens(step_rows)
        # float64, as the host-side sum of per-micro-batch values it replaces was.
        totals = torch.zeros(2, dtype=torch.float64, device=self.device)  # [loss sum, non-finite micro-batches]
        micro = (self.train_blocks.rows(step_rows[p - step * g] if self.train_blocks.token_loss else self.order.indices(p))
                 for p in positions)
        for k, rows in enumerate(self.copier.stream(micro)):  # the next micro-batch copied while this one computes
            self.engine.set_gradient_accumulation_boundary(k == len(positions) - 1)
            loss = self.micro_batch_loss(rows, step, k)
            value = loss.detach().double()
            totals += torch.stack([value, (~torch.isfinite(value)).double()])
            # Backward even of a non-finite loss: every rank runs the same collectives whatever its values,
            # and the decision waits for the step's end.
            self.engine.backward(loss)
        loss_sum, nonfinite = dist.sum_on_device(totals).tolist()  # the step's one host read
        if nonfinite:
            engines.discard_gradients(self.engine)
            return None
        self.engine.step()
        return loss_sum / (len(positions) * self.plan.world)

    def save(self, step: int, reason: str) -> Path:
        self._write_pending()  # every record up to a checkpoint is on disk before it (resume truncates past it)
        spec = self.spec
        inputs = spec.inputs
        state = TrainerState(step=step, world_size=self.plan.world, samples_consumed=step * self.plan.global_batch,
                             orig_vocab=inputs.vocab.orig_vocab, new_vocab=inputs.vocab.new_vocab, reason=reason,
                             config=to_dict(self.cfg), template=inputs.manifest.get("template") if inputs.sft else None,
                             base_vocab=inputs.llama.vocab_size, stage=self.schedule.at(max(step - 1, 0)).name,
                             **spec.identity.record())
        # fp32 master weights + two Adam moments + the weights themselves: at most 16 bytes a trainable parameter.
        path = self.checkpointer.save(self.engine, state, expected_bytes=16 * self.counts.trainable)
        self.logger.say(f"saved checkpoint {path} ({reason})")
        self.throughput.restart()  # a save is not training time
        return path

    def validate(self, step: int) -> None:
        self._write_pending()  # train records before the eval record of the same step
        result = self.validator.run(self.engine, self.to_device)
        if result is not None:
            self.logger.log({"type": "eval", "step": step, **result})
            self.logger.say(self.validator.line(step, result))
        self.last_validated = step

    # -- the loop ---------------------------------------------------------------------------------------

    def run(self) -> int:
        cfg, plan = self.cfg, self.plan
        stop = dist.StopFlag(self.run_dir / STOP_FILE)
        bar = Progress("train", total=plan.max_steps, unit="step", enabled=dist.is_main())
        bar.update(self.start_step)
        step, bad_in_row, self.last_validated = self.start_step, 0, None
        self.pending: list[dict] = []  # train records whose grad_norm is not read yet
        try:
            if cfg.validation.at_start and step == 0:
                self.validate(0)
            self.throughput.restart()
            while step < plan.max_steps:
                lrs = self.schedule.enter(self.engine, step)  # this step's stage: its gates, rates, state
                loss = self.train_step(step)
                step += 1
                self.throughput.step()
                if loss is None:
                    bad_in_row += 1
                    if self._skipped(step, bad_in_row):
                        return EXIT_NONFINITE
                    continue
                bad_in_row = 0
                # The gradient norm is a device tensor under ZeRO-3: its record waits, unread, until the next
                # logging step (or save, validation, skip, end), where all waiting norms are read at once.
                record = {"type": "train", "step": step, "loss": loss, **lrs,
                          "grad_norm": self.engine.get_global_grad_norm(), "time": round(time.time(), 3)}
                if not self.spec.inputs.single:
                    record.update({f"epochs/{k}": v for k, v in self.order.epochs(step * plan.global_batch).items()})
                self.pending.append(record)
                if step % cfg.logging.log_every == 0 or step == plan.max_steps:
                    record.update(self.throughput.report())
                    self._write_pending()
                    self.logger.say(train_line(record))
                bar.update(1, f"loss {loss:.4f}")
                if cfg.validation.every and step % cfg.validation.every == 0:
                    self.validate(step)
                if stop.should_stop():
                    self.logger.say(f"stop requested (signal or {STOP_FILE} file): saving at step {step} and exiting")
                    self.save(step, "signal")
                    return EXIT_STOPPED
                if self.checkpointer.due(step, plan.max_steps):
                    self.save(step, "periodic")
            if self.last_validated != step:
                self.validate(step)
            if self.checkpointer.needs_final(step):
                self.save(step, "end")
            return EXIT_DONE
        finally:
            self._write_pending()
            bar.close()
            stop.restore()
            self.logger.close()

    def _write_pending(self) -> None:
        """Log the waiting train records, their gradient norms read from the device in one go."""
        pending, self.pending = getattr(self, "pending", []), []
        if not pending:
            return
        norms = [r["grad_norm"] for r in pending]
        tensors = [n for n in norms if torch.is_tensor(n)]
        values = iter(torch.stack([t.detach().double().reshape(()) for t in tensors]).tolist() if tensors else [])
        for r, n in zip(pending, norms):
            r["grad_norm"] = next(values) if torch.is_tensor(n) else (None if n is None else float(n))
            self.logger.log(r)

    def close(self) -> None:
        """Release the run folder (rank 0's lock)."""
        if getattr(self, "lock", None) is not None:
            self.lock.release()
            self.lock = None

    def _skipped(self, step: int, in_row: int) -> bool:
        """Log a skipped step; after max_nonfinite_steps in a row save the last good state. True: stop."""
        self._write_pending()
        self.logger.say(f"step {step}: non-finite loss, step skipped ({in_row} in a row)")
        self.logger.log({"type": "train", "step": step, "loss": float("nan"), "skipped": True})
        if in_row < self.cfg.optim.max_nonfinite_steps:
            return False
        self.logger.say(f"stopping: {in_row} non-finite losses in a row (optim.max_nonfinite_steps); "
                        "the checkpoint holds the last good weights")
        self.save(step, "non-finite loss")
        return True


def train(cfg: TrainConfig) -> int:
    try:
        trainer = Trainer(cfg)
        try:
            return trainer.run()
        finally:
            trainer.close()
            dist.barrier()
    finally:
        # The process groups end here, not in the interpreter's exit: gloo's worker threads torn down by static
        # destructors can abort the process ("terminate called without an active exception", exit 134 / 250
        # through the launcher; seen once in the non-finite test, whose exit status is 4).
        dist.close()
