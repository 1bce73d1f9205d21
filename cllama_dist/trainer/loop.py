"""The training loop: extend the vocabulary, train LoRA + new rows under DeepSpeed, evaluate, log, save.

One step = ``accum`` micro-batches per process, then one optimizer update. Set-up is a sequence of
``_setup_*`` steps; everything that can be refused is checked before the model is built. The pieces
live beside this file: the batch plan and schedule (plan.py), the DeepSpeed engine (engine.py),
checkpoints (checkpoint.py), metrics (metrics.py), validation (validate.py); the data order in
data/loader.py; every collective in distributed.py.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np
import torch

from .. import distributed as dist
from ..config import dump_yaml, to_dict
from ..files import LOCK, Lock, check_not_input, claim_folder, write_atomic
from ..data.loader import step_positions
from ..data.shards import SFT_FORMAT
from ..errors import UserError
from ..model import flops
from ..model.config import resolve_dtype
from ..model.identity import base_fingerprint
from ..model.scoring import summed_nll
from ..progress import Progress
from . import engine as engines
from . import mixture
from .batches import DeviceCopier, model_inputs
from .checkpoint import Checkpointer, TrainerState, read_state
from .config import TrainConfig
from .metrics import Logger, Throughput, train_line
from .plan import Plan, lr_factor
from .stages import Gates, Schedule
from .validate import Validators

EXIT_DONE, EXIT_STOPPED, EXIT_NONFINITE = 0, 3, 4
STOP_FILE = "STOP"  # touched by slurm/pretrain.sh (or a user) to ask every rank to save and stop
START_MODEL = "start-model"  # model.path + model.adapter, merged (model.adapter)


class Trainer:
    def __init__(self, cfg: TrainConfig):
        self.cfg = cfg
        self.device = dist.init(cfg.engine.timeout_minutes)
        self.run_dir = Path(cfg.output_dir or "runs/train")
        self.notes: list[str] = []
        self.lock: Lock | None = None
        # Each step that can fail on one rank alone runs under an agreement (distributed.agree/on_main): a
        # failure on any rank stops every rank at once with its message, instead of leaving the others in
        # the next collective until its timeout.
        try:
            dist.on_main("checking the run folder", self._setup_run_folder)
            if cfg.model.adapter:
                dist.on_main("merging the starting adapter into its base", self._setup_start_model)
                cfg.model.path = str(self.run_dir / START_MODEL)
            dist.agree("reading the tokenizer and the shards", self._setup_inputs)
            dist.agree("verifying the shards", self._verify_shards)
            self.resume = dist.on_main("choosing the checkpoint", self._choose_checkpoint)
            self._setup_resume()
            self._setup_model()
            self._setup_engine()
            self._setup_metrics()
        except BaseException:
            self.close()
            raise

    # -- set-up -----------------------------------------------------------------------------------------

    def _setup_run_folder(self) -> None:
        """Rank 0: the run folder may not touch an input; it is ours (marked) and ours alone (locked)."""
        m = self.cfg.model
        shards = {f"shards{'' if not self.cfg.data.sets else ' of set ' + s.name}": s.path
                  for s in self.cfg.data.mixture()}
        check_not_input(self.run_dir, {"base model": m.path, "tokenizer": m.tokenizer, **shards}, "training run")
        claim_folder(self.run_dir, "run", reuse=True)
        self.lock = Lock(self.run_dir / LOCK, "training run").acquire()
        note = self.lock.describe_takeover()
        if note:
            self.notes.append(note)
        (self.run_dir / STOP_FILE).unlink(missing_ok=True)  # a stop request of an earlier attempt

    def _setup_start_model(self) -> None:
        """Rank 0: model.path + model.adapter merged once into RUN/start-model, the model this run trains on (a
        folder already merged from the same base and adapter is reused, so a resume trains on the same weights)."""
        from ..export.run import export_merged

        m, target = self.cfg.model, self.run_dir / START_MODEL
        record = target / "cllama_export.json"
        if record.is_file() and (target / "config.json").is_file():
            done = json.loads(record.read_text())
            if done.get("base") == str(m.path) and done.get("adapter") == str(m.adapter):
                self.notes.append(f"note: starting from {target} ({m.path} + {m.adapter}, merged earlier)")
                return
        export_merged(m.path, m.adapter, target, overwrite=True)
        self.notes.append(f"note: starting from {m.path} + adapter {m.adapter}, merged into {target}")

    def _setup_inputs(self) -> None:
        from ..model.adapters import load_llama_config
        from ..tokenizer.merged import read_merged

        cfg = self.cfg
        self.llama = load_llama_config(cfg.model)
        self.vocab = read_merged(cfg.model.tokenizer, self.llama.vocab_size, cfg.model.extended_vocab)
        self.single = not cfg.data.sets  # one folder: the order and records it always had
        self.sets, block = mixture.read_sets(cfg.data, self.vocab.fingerprint)
        # Pre-training blocks or instruction-tuning rows: the manifests' format decides (trainer/batches.py).
        self.manifest = self.sets[0].manifest
        self.sft = self.manifest.get("format") == SFT_FORMAT
        if block > self.llama.max_position_embeddings:
            raise UserError(f"block size {block} exceeds the model's max_position_embeddings "
                            f"{self.llama.max_position_embeddings}")
        self.block = block

    def _verify_shards(self) -> None:
        """Every shard checked against the manifest (size, sha256, schema, ids below the vocabulary) before any
        step: each rank checks its share, and a record in the run folder lets a resume skip unchanged shards."""
        self.verified = mixture.verify(self.sets, self.vocab.new_vocab, self.run_dir, dist.rank(), dist.world_size(),
                                       self.single)
        cfg = self.cfg
        self.train_blocks, self.order = mixture.train_data(self.sets, cfg.seed, self.single)
        self.validator = Validators(self.sets, cfg.data.micro_batch_size, cfg.validation.sequences, self.single)
        self.notes += self.validator.notes
        # A staged schedule (trainer/stages.py): its steps are the run's.
        self.stages = Schedule(cfg.stages, cfg.optim) if cfg.stages else None
        max_steps = self.stages.max_steps if self.stages else cfg.optim.max_steps
        self.plan = Plan.make(cfg.data, max_steps, dist.world_size(), self.block, len(self.train_blocks),
                              None if self.single else self.order)

    def _choose_checkpoint(self) -> dict:
        """Rank 0: the checkpoint to resume (the newest valid one) and its state, or a fresh start."""
        self.checkpointer = Checkpointer(self.run_dir, self.cfg.checkpoint)
        path = self.checkpointer.find_resume()
        notes = list(self.checkpointer.notes)
        if path is None:
            notes += self._set_aside_history()
        return {"path": str(path) if path else None, "state": read_state(path) if path else None, "notes": notes}

    def _set_aside_history(self) -> list[str]:
        """A fresh start in a folder holding an earlier attempt's metrics (killed before its first checkpoint):
        those records would interleave with this run's, so they are moved aside, never deleted."""
        old = [p for p in (self.run_dir / "metrics.jsonl", self.run_dir / "tb") if p.exists()]
        if not old:
            return []
        aside = self.run_dir / "previous" / time.strftime("%Y%m%d-%H%M%S")
        aside.mkdir(parents=True, exist_ok=True)
        for p in old:
            p.rename(aside / p.name)
        return [f"note: no checkpoint to resume; the earlier attempt's {', '.join(p.name for p in old)} moved to {aside}"]

    def _setup_resume(self) -> None:
        self.checkpointer = Checkpointer(self.run_dir, self.cfg.checkpoint)
        self.resume_from = Path(self.resume["path"]) if self.resume["path"] else None
        self.resume_state = self.resume["state"]
        self.notes += self.resume["notes"]
        self.universal = bool(self.resume_state) and self.resume_state["world_size"] != self.plan.world
        self.dtype = resolve_dtype(self.cfg.engine.dtype, self.device.startswith("cuda"))
        nodes = max(1, self.plan.world // dist.local_world_size())
        cuda = self.device.startswith("cuda")
        self.ds_name, self.ds_reason = engines.choose_deepspeed_json(self.cfg.engine, nodes, cuda)
        self.frozen = engines.choose_frozen_base(
            self.cfg.engine, engines.read_deepspeed_zero(self.cfg, self.ds_name), self.plan.world, cuda,
            self._model_sizes, lambda: int(dist.minimum(torch.cuda.mem_get_info()[0])),
            self.resume_state.get("zero_stage") if self.resume_state else None)
        self.ds_config = engines.resolve(self.cfg, self.plan, self.dtype, self.universal, nodes, cuda, self.frozen)
        self.base_model = dist.on_main("fingerprinting the base model",
                                       lambda: base_fingerprint(self.cfg.model, self.cfg.seed))
        if self.resume_state:
            Checkpointer.check_resumable(self.resume_from, self.resume_state, self._identity())
            self._check_schedule(self.resume_state.get("schedule"))

    def _model_sizes(self) -> tuple[int, int, int]:
        """(parameters, trainable, bytes per weight) of the model about to be built, counted on the meta device."""
        from ..model.adapters import DTYPES, dry_run

        counts = dry_run(self.cfg.model, self.cfg.lora, self.vocab.new_vocab)[self.cfg.model.embeddings]
        return counts.total, counts.trainable, DTYPES[self.dtype].itemsize

    def _identity(self) -> dict:
        """What must not change between a checkpoint and the run that resumes it."""
        return {"global_batch": self.plan.global_batch, "tokenizer_sha256": self.vocab.fingerprint,
                "embeddings": self.cfg.model.embeddings, "block_size": self.plan.block,
                "zero_stage": engines.zero_stage(self.ds_config), "base_model": self.base_model,
                "mixture": mixture.identity(self.sets, self.order, self.single),
                "document_mask": bool(self.cfg.data.document_mask and not self.sft)}

    def _schedule(self) -> dict:
        o = self.cfg.optim
        return {"max_steps": self.plan.max_steps, "lr": o.lr, "embedding_lr": o.embedding_lr or o.lr,
                "warmup_steps": o.warmup_steps or int(o.warmup_ratio * self.plan.max_steps),
                "min_lr_ratio": o.min_lr_ratio, "stages": self.stages.record() if self.stages else []}

    def _check_schedule(self, theirs: dict | None) -> None:
        mine = self._schedule()
        if theirs is not None:  # a checkpoint from before staged schedules had none: adding stages is a change
            theirs = {"stages": [], **theirs}
        changed = {k: (theirs[k], v) for k, v in mine.items() if theirs and k in theirs and theirs[k] != v}
        if not changed:
            return
        text = ", ".join(f"{k} {a} -> {b}" for k, (a, b) in changed.items())
        if not self.cfg.checkpoint.allow_schedule_change:
            raise UserError(f"cannot resume {self.resume_from}: the schedule would change ({text}), reshaping the "
                            "learning-rate curve mid-run; keep the run's settings, or set "
                            "checkpoint.allow_schedule_change: true to change it on purpose (it is recorded)")
        self.schedule_change = {k: {"was": a, "now": b} for k, (a, b) in changed.items()}
        self.notes.append(f"note: schedule changed on purpose at step {self.resume_state['step']}: {text}")

    def _setup_model(self) -> None:
        from ..model.adapters import DTYPES, build_model, count_parameters
        from ..tokenizer.merged import subword_spellings

        cfg = self.cfg
        sub = subword_spellings(self.vocab) if cfg.model.new_row_init == "subword" else None
        zero3 = engines.zero_stage(self.ds_config) == 3
        self.loss_kernel, why = "torch", "the hf loss"
        if cfg.model.loss == "chunked":
            from ..model.loss import resolve_kernel

            try:
                self.loss_kernel, why = resolve_kernel(cfg.model.loss_kernel, self.device)
            except ValueError as exc:
                raise UserError(f"model.loss_kernel: {exc}") from None
        self.loss_note = f"loss {cfg.model.loss}" + (f", kernel {self.loss_kernel} ({why})"
                                                       if cfg.model.loss == "chunked" else "")
        self.model, self._keep_alive = build_model(cfg.model, cfg.lora, cfg.seed, self.vocab.orig_vocab,
                                                   self.vocab.new_vocab, DTYPES[self.dtype],
                                                   self.ds_config if zero3 else None, sub,
                                                   packed_rows=self._rows_kept_apart() and self.plan.micro > 1,
                                                   loss_kernel=self.loss_kernel)
        self.counts = count_parameters(self.model)
        self.model_dtype = DTYPES[self.dtype]
        self.attn = self.model.config._attn_implementation  # model.attn_implementation resolved (auto: adapters.py)
        self.copier = DeviceCopier(lambda rows: model_inputs(rows, self.device, self.attn, self.model_dtype),
                                   self.device)

    def _rows_kept_apart(self) -> bool:
        """Micro-batch rows hold several examples or documents that must not attend to each other."""
        return (self.sft and self.manifest.get("layout") == "packed") or (not self.sft and self.cfg.data.document_mask)

    def _setup_engine(self) -> None:
        if self.stages:  # before DeepSpeed's own hooks, so that a frozen group's gradients reach it as zeros
            self.stages.gates = Gates(self.model)
        self.engine = engines.initialize(self.model, self.cfg.optim, self.ds_config)
        self.start_step = 0
        if self.resume_from:
            self.checkpointer.load(self.engine, self.resume_from, self.universal)
            self.start_step = self.resume_state["step"]

    def _setup_metrics(self) -> None:
        cfg = self.cfg
        self.flops = flops.run_flops(self.llama, self.vocab.orig_vocab, self.vocab.new_vocab, cfg.model.embeddings,
                                     self.plan.block, self.counts.lora,
                                     flops.checkpoint_share(self.llama.num_hidden_layers, cfg.model.gradient_checkpointing,
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
        self.logger = Logger(self.run_dir, cfg.logging.tensorboard, self.start_step if self.resume_from else -1,
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
        elif first.read_text() != text and self.resume_from:
            later = self.run_dir / f"config-step-{self.start_step}.yaml"
            write_atomic(later, text)
            self.notes.append(f"note: the settings differ from {first}; recorded in {later}")
        write_atomic(self.run_dir / "ds_config.json", json.dumps(self.ds_config, indent=2) + "\n")
        if getattr(self, "schedule_change", None):
            self.logger.log({"type": "note", "step": self.start_step, "schedule_change": self.schedule_change})

    def _announce(self) -> None:
        c, say, m = self.counts, self.logger.say, self.cfg.model
        say(f"cllama train: {self.plan.describe()}")
        extended = self.llama.vocab_size == self.vocab.new_vocab  # a merged model: its rows are the start
        init = "from the model" if extended else m.new_row_init
        say(f"  vocabulary {self.vocab.orig_vocab:,} -> {self.vocab.new_vocab:,} ({m.embeddings}, init {init}); "
            f"DeepSpeed ZeRO-{engines.zero_stage(self.ds_config)}, {self.dtype}, "
            f"gradient checkpointing {m.checkpoint_scope + ' layers' if m.gradient_checkpointing else 'off'}, "
            f"{self.attn} attention, {self.loss_note}, device {self.device}")
        say(f"  parameters: total {c.total:,}, LoRA {c.lora:,}, new rows {c.new_rows:,}, trainable {c.trainable:,} "
            f"({100 * c.share:.2f}%); optimizer state {c.optimizer_bytes(self.dtype != 'fp32') / 2**20:,.1f} MiB")
        say(f"  FLOPs per token: {self.flops['actual'] / 1e9:,.3f} G as computed (LoRA: ~4N + recompute + attention), "
            f"{self.flops['conventional'] / 1e9:,.3f} G conventional (6N + 12LHs)"
            + ("" if self.peak_flops else "; MFU not reported (unknown device peak: set logging.peak_tflops)"))
        v = self.verified
        say(f"  shards verified: {v['shards']} on this rank ({v['bytes'] / 1e6:,.1f} MB hashed in {v['seconds']:.1f} s, "
            f"{v['from_record']} unchanged since an earlier check), all ranks agreeing")
        say(f"  DeepSpeed config {self.ds_name} ({self.ds_reason}); resolved copy in {self.run_dir / 'ds_config.json'}")
        fb, where = self.frozen.choice, "GPU" if self.device.startswith("cuda") else "process"
        sizes = {ch: engines.expected_bytes(ch, c.total, c.trainable, self.plan.world, self.model_dtype.itemsize)
                 / 2**30 for ch in ("resident", "partitioned")}
        other = "partitioned" if fb == "resident" else "resident"
        say(f"  frozen base {fb} ({self.frozen.reason}; engine.frozen_base): weights + optimizer state "
            f"{sizes[fb]:,.2f} GiB per {where} before activations ({other}: {sizes[other]:,.2f} GiB)")
        if extended:
            say(f"  the model's vocabulary is already extended ({m.path}: a merged model): rows "
                f"{self.vocab.orig_vocab:,}..{self.vocab.new_vocab - 1:,} train from their values there, "
                f"rows below stay frozen")
        if self.sft:
            t, man = self.manifest["splits"]["train"], self.manifest
            say(f"  instruction tuning: {t['examples']:,} examples in {t['rows']:,} {man['layout']} rows, template "
                f"{man['template']['name']}; loss on the {t['response_tokens']:,} response tokens of "
                f"{t['tokens']:,}, averaged per token over each global batch"
                + ("; packed examples attend only within themselves" if man["layout"] == "packed" else ""))
        elif self.cfg.data.document_mask:
            say("  documents kept apart (data.document_mask): attention within each document only, positions "
                "restarting at each, no document's first token predicted from the one before")
        for line in self.stages.describe() if self.stages else []:
            say(f"  {line}")
        for note in self.notes:
            say(f"  {note}")
        if self.resume_from:
            say(f"  resumed from {self.resume_from} at step {self.start_step} "
                f"(sample {self.start_step * self.plan.global_batch:,})"
                + (f", in stage {self.stages.at(self.start_step).name!r}" if self.stages else ""))

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
        state = TrainerState(step=step, world_size=self.plan.world, global_batch=self.plan.global_batch,
                             samples_consumed=step * self.plan.global_batch,
                             tokenizer_sha256=self.vocab.fingerprint["sha256"], orig_vocab=self.vocab.orig_vocab,
                             new_vocab=self.vocab.new_vocab, embeddings=self.cfg.model.embeddings,
                             block_size=self.plan.block, zero_stage=engines.zero_stage(self.ds_config),
                             reason=reason, base_model=self.base_model, schedule=self._schedule(),
                             mixture=mixture.identity(self.sets, self.order, self.single),
                             config=to_dict(self.cfg), template=self.manifest.get("template") if self.sft else None,
                             base_vocab=self.llama.vocab_size,
                             document_mask=bool(self.cfg.data.document_mask and not self.sft),
                             stage=self.stages.at(max(step - 1, 0)).name if self.stages else "")
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
                if self.stages:
                    lrs = self.stages.enter(self.engine, step)  # this step's stage: its gates, rates, state
                else:
                    lr_scale = lr_factor(step, cfg.optim, plan.max_steps)
                    engines.set_lr(self.engine, lr_scale)
                    lrs = {"lr": cfg.optim.lr * lr_scale}
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
                if not self.single:
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
                if cfg.checkpoint.save_every and step % cfg.checkpoint.save_every == 0 and step < plan.max_steps:
                    self.save(step, "periodic")
            if self.last_validated != step:
                self.validate(step)
            saved = self.checkpointer.complete()
            if not saved or saved[-1].name != f"step-{step:08d}":
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
