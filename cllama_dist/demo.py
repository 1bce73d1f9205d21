"""The whole pipeline on the shipped Chinese corpus, on a CPU, in minutes.

    cllama demo [--out runs/demo] [--base-tokenizer llama/tokenizer.model] [--force]

Stages (each reused on a re-run when its inputs are unchanged, unless --force):
  1. corpus     split the shipped corpus into training and held-out documents
  2. base       a LLaMA-style base tokenizer (built offline) or the one given
  3. tokenizer  train a Chinese SentencePiece model on the training documents
  4. merge      append its new pieces to the base tokenizer, ids unchanged
  5. report     tokens per character before and after, on held-out text
  6. shards     tokenize the corpus offline into packed Arrow shards (the trainer's input)
  7. model      a tiny LLaMA-architecture base model that knows the base tokenizer's language: built from a
                config and trained briefly on the English text the base tokenizer came from (it stands in
                for LLaMA, which knows little Chinese)
  8. train      LoRA + the new embedding rows, DeepSpeed ZeRO-3 on 2 processes through the deepspeed
                launcher, gradient checkpointing, checkpoints (a killed run resumes from its last one)
  9. export     the PEFT adapter and the merged Hugging Face model
 10. eval       bits per character on held-out Chinese: the base (its tokenizer) against base + adapter and
                the merged model (the merged tokenizer)
 11. generate   reload the merged model with stock transformers and continue a few Chinese prompts
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable

from . import PROJECT_ROOT
from .assets import corpus_path
from .config import MergeConfig, PreprocessConfig, ReportConfig, TokenizerTrainConfig
from .errors import UserError

HELD_OUT_EVERY = 8  # every 8th shipped document is held out from tokenizer and model training
DEMO_ZH_VOCAB = 3000  # what ~150 KB of Chinese supports; the paper used 20,000 on 20 GB
DEMO_BASE_VOCAB = 4000
DEMO_BLOCK = 128
# A LLaMA in miniature: same architecture (RMSNorm, RoPE, SwiGLU, grouped-query attention, untied head).
DEMO_MODEL = dict(hidden_size=128, intermediate_size=344, num_hidden_layers=4, num_attention_heads=4,
                  num_key_value_heads=2, max_position_embeddings=512, tie_word_embeddings=False, rms_norm_eps=1e-5)
BASE_PRETRAIN_STEPS = 200  # enough for the base to model English docstrings, not Chinese
DEMO_STEPS = 60  # ~3.5 passes over the demo's 36K training tokens; more only overfits them
DEMO_PROCS = 2
PROMPTS = ["中国的首都是", "人工智能", "春天来了，"]
STAGES = ("corpus", "base", "tokenizer", "merge", "report", "shards", "model", "train", "export", "eval", "generate")


class _Reached(Exception):
    """Raised after the stage named by --until."""


class Stages:
    """Runs named stages once; a stage is reused while its key (what it was built from) is unchanged."""

    def __init__(self, out: Path, force: bool, total: int, until: str | None = None):
        self.out, self.force, self.total, self.n, self.until = out, force, total, 0, until
        self.summary: dict[str, dict] = {}

    def run(self, name: str, key: dict, fn: Callable[[Path], dict], resumable: bool = False) -> dict:
        """resumable: an unfinished earlier attempt with the same key is continued, not wiped (training)."""
        self.n += 1
        folder = self.out / name
        marker = folder / ".done.json"
        digest = hashlib.sha256(json.dumps(key, sort_keys=True, default=str).encode()).hexdigest()
        if not self.force and marker.is_file():
            done = json.loads(marker.read_text())
            if done.get("key") == digest:
                print(f"[{self.n}/{self.total}] {name}: reusing {folder} (finished earlier; --force to redo)", flush=True)
                self.summary[name] = done["result"]
                if name == self.until:
                    raise _Reached(name)
                return done["result"]
        started = folder / ".started.json"
        if resumable and not self.force and started.is_file() and json.loads(started.read_text()).get("key") == digest:
            print(f"[{self.n}/{self.total}] {name}: resuming the unfinished stage in {folder}", flush=True)
        else:
            if folder.exists():
                shutil.rmtree(folder)
            folder.mkdir(parents=True)
            started.write_text(json.dumps({"key": digest}) + "\n")
        print(f"[{self.n}/{self.total}] {name} ...", flush=True)
        t0 = time.time()
        result = fn(folder)
        result["seconds"] = round(time.time() - t0, 1)
        marker.write_text(json.dumps({"key": digest, "result": result}, indent=2, ensure_ascii=False) + "\n")
        print(f"[{self.n}/{self.total}] {name}: done in {result['seconds']}s", flush=True)
        self.summary[name] = result
        if name == self.until:
            raise _Reached(name)
        return result


def _file_key(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def run_demo(out: str = "runs/demo", base_tokenizer: str | None = None, force: bool = False,
             steps: int = DEMO_STEPS, until: str | None = None) -> dict:
    """Run the stages (up to and including `until`); returns every stage's result by name."""
    if steps < 1:
        raise UserError(f"--steps must be at least 1, got {steps}")
    if until is not None and until not in STAGES:
        raise UserError(f"--until {until}: not a stage; the stages are {', '.join(STAGES)}")
    root = Path(out)
    root.mkdir(parents=True, exist_ok=True)
    stages = Stages(root, force, total=len(STAGES), until=until)
    try:
        _pipeline(stages, root, base_tokenizer, steps)
    except _Reached:
        print(f"stopped after stage '{until}' (--until); run without --until to continue from here")
    (root / "summary.json").write_text(json.dumps(stages.summary, indent=2, ensure_ascii=False) + "\n")
    return stages.summary


def _pipeline(stages: Stages, root: Path, base_tokenizer: str | None, steps: int) -> None:
    shipped = corpus_path()

    def split_corpus(folder: Path) -> dict:
        lines = shipped.read_text(encoding="utf-8").splitlines()
        train = [l for i, l in enumerate(lines) if i % HELD_OUT_EVERY != HELD_OUT_EVERY - 1]
        held = [l for i, l in enumerate(lines) if i % HELD_OUT_EVERY == HELD_OUT_EVERY - 1]
        (folder / "train.jsonl").write_text("\n".join(train) + "\n", encoding="utf-8")
        (folder / "heldout.jsonl").write_text("\n".join(held) + "\n", encoding="utf-8")
        return {"train": str(folder / "train.jsonl"), "heldout": str(folder / "heldout.jsonl"),
                "train_documents": len(train), "heldout_documents": len(held)}

    corpus = stages.run("corpus", {"shipped": _file_key(shipped)}, split_corpus)

    def base(folder: Path) -> dict:
        if base_tokenizer:
            from .tokenizer import spm as spmio

            proto = spmio.load_proto(base_tokenizer, "base tokenizer")
            spmio.write_hf_folder(folder, spmio.model_path(base_tokenizer).read_bytes(), proto)
            return {"tokenizer": str(folder), "source": str(base_tokenizer)}
        from .tokenizer.base import build_base_tokenizer

        build_base_tokenizer(folder, vocab_size=DEMO_BASE_VOCAB)
        return {"tokenizer": str(folder), "source": "built from Python standard-library docstrings, LLaMA trainer settings"}

    base_key = {"given": _file_key(Path(base_tokenizer)) if base_tokenizer and Path(base_tokenizer).is_file() else base_tokenizer,
                "vocab": DEMO_BASE_VOCAB}
    if base_tokenizer and not Path(base_tokenizer).exists():
        raise UserError(f"--base-tokenizer {base_tokenizer} not found")
    base_res = stages.run("base", base_key, base)

    def zh_tokenizer(folder: Path) -> dict:
        from .tokenizer.train import train

        r = train(TokenizerTrainConfig(inputs=[corpus["train"]], output=str(folder / "zh"), vocab_size=DEMO_ZH_VOCAB))
        return {"model": r["model"], "vocab_size": DEMO_ZH_VOCAB, "sentences": r["sentences_sampled"]}

    zh = stages.run("tokenizer", {"corpus": corpus, "vocab": DEMO_ZH_VOCAB}, zh_tokenizer)

    def merged(folder: Path) -> dict:
        from .tokenizer.merge import merge

        r = merge(MergeConfig(base=base_res["tokenizer"], add=zh["model"], out=str(folder), overwrite=True))
        return {"tokenizer": str(folder), "orig_vocab_size": r["orig_vocab_size"],
                "new_vocab_size": r["new_vocab_size"], "added": r["added"]}

    m = stages.run("merge", {"base": base_res, "zh": zh}, merged)

    def report_stage(folder: Path) -> dict:
        from .tokenizer.report import format_table, report

        r = report(ReportConfig(tokenizers=[base_res["tokenizer"], m["tokenizer"]], inputs=[corpus["heldout"]],
                                json_out=str(folder / "report.json")))
        (folder / "report.txt").write_text(format_table(r) + "\n", encoding="utf-8")
        b, e = r["tokenizers"]
        return {"tokens_per_char_before": round(b["tokens_per_char"], 3),
                "tokens_per_char_after": round(e["tokens_per_char"], 3),
                "reduction": round(e["reduction_vs_first"], 2), "table": str(folder / "report.txt")}

    rep = stages.run("report", {"merge": m, "heldout": corpus["heldout"]}, report_stage)

    def shards(folder: Path) -> dict:
        from .data.preprocess import preprocess

        # 5% of the training documents' blocks form the validation split the trainer evaluates on.
        mf = preprocess(PreprocessConfig(inputs=[corpus["train"]], tokenizer=m["tokenizer"], output=str(folder),
                                         block_size=DEMO_BLOCK, validation_fraction=0.05, overwrite=True))
        return {"folder": str(folder), "block_size": DEMO_BLOCK, "train_sequences": mf["splits"]["train"]["sequences"],
                "validation_sequences": mf["splits"]["validation"]["sequences"],
                "train_tokens": mf["splits"]["train"]["tokens"]}

    sh = stages.run("shards", {"merge": m, "corpus": corpus, "block": DEMO_BLOCK}, shards)

    model = stages.run("model", {"base": base_res, "model": DEMO_MODEL, "steps": BASE_PRETRAIN_STEPS},
                       lambda folder: build_base_model(folder, base_res["tokenizer"]))

    run_cfg = dict(model=model["folder"], tokenizer=m["tokenizer"], data=sh["folder"], block_size=DEMO_BLOCK,
                   micro_batch_size=4, global_batch_size=16, max_steps=steps, lr=2e-3, embedding_lr=5e-3,
                   warmup_steps=10, lora_rank=8, lora_alpha=16, lora_dropout=0.0, new_row_init="subword",
                   gradient_checkpointing=True, eval_every=max(steps // 4, 1), eval_sequences=64, log_every=10,
                   save_every=max(steps // 4, 1), keep_last=2, dtype="fp32",
                   deepspeed_config=str(PROJECT_ROOT / "deepspeed_configs" / "zero3.json"),
                   # tiny weights would otherwise stay whole on every rank; partition them as a 7B's would be
                   deepspeed_overrides={"zero_optimization": {"stage3_param_persistence_threshold": 0}})
    trained = stages.run("train", {"model": model, "shards": sh, "config": run_cfg},
                         lambda folder: train_stage(folder, run_cfg), resumable=True)

    def export_stage(folder: Path) -> dict:
        from .export import export_adapter, export_merged

        meta = export_adapter(trained["run"], folder / "adapter")
        merged_info = export_merged(model["folder"], folder / "adapter", folder / "merged", dtype="fp32")
        size = (folder / "adapter" / "adapter_model.safetensors").stat().st_size
        return {"adapter": str(folder / "adapter"), "merged": merged_info["out"], "step": meta["step"],
                "trained_parameters": meta["trained_parameters"], "adapter_bytes": size}

    ex = stages.run("export", {"train": trained}, export_stage)

    def eval_stage(folder: Path) -> dict:
        from .config import EvalConfig
        from .eval import evaluate

        common = dict(inputs=[corpus["heldout"]], block_size=DEMO_BLOCK * 2, device="cpu", dtype="fp32")
        before = evaluate(EvalConfig(model=model["folder"], json_out=str(folder / "base.json"), **common))
        adapter = evaluate(EvalConfig(model=model["folder"], adapter=ex["adapter"],
                                      json_out=str(folder / "base+adapter.json"), **common))
        merged = evaluate(EvalConfig(model=ex["merged"], json_out=str(folder / "merged.json"), **common))
        keys = ("loss", "perplexity", "bits_per_char", "bits_per_byte", "tokens_per_char", "tokens")
        return {name: {k: r[k] for k in keys} for name, r in
                (("base", before), ("base+adapter", adapter), ("merged", merged))} | {"folder": str(folder)}

    ev = stages.run("eval", {"export": ex, "heldout": corpus["heldout"]}, eval_stage)

    gen = stages.run("generate", {"export": ex, "prompts": PROMPTS},
                     lambda folder: generate_stage(folder, ex["merged"]))

    loss = trained["losses"]
    print()
    print("cllama demo summary")
    print(f"  tokens / character, held-out Chinese   {rep['tokens_per_char_before']} -> {rep['tokens_per_char_after']} "
          f"({rep['reduction']}x fewer tokens; {m['orig_vocab_size']:,} -> {m['new_vocab_size']:,} pieces)")
    print(f"  training loss (merged tokenizer)       {loss['first']:.3f} at step 1 -> {loss['last']:.3f} at step "
          f"{loss['steps']}; validation {trained['validation_loss']:.3f}")
    print(f"  bits / character, held-out Chinese     {ev['base']['bits_per_char']:.3f} (base model, base tokenizer) -> "
          f"{ev['merged']['bits_per_char']:.3f} (merged model; base + adapter: {ev['base+adapter']['bits_per_char']:.3f})")
    print(f"  generation (merged, stock transformers) {gen['tokens_per_second']:.0f} tokens/s: "
          f"{gen['samples'][0]['prompt']}|{gen['samples'][0]['continuation'][:40]}")
    print("  artefacts")
    for label, where in (("base tokenizer", base_res["tokenizer"]), ("Chinese tokenizer", zh["model"]),
                         ("merged tokenizer", m["tokenizer"]), ("tokenizer report", rep["table"]),
                         ("shards", sh["folder"]), ("base model", model["folder"]),
                         ("training run", f"{trained['run']} (metrics.jsonl, tb/, checkpoints/)"),
                         ("adapter (PEFT)", f"{ex['adapter']} ({ex['adapter_bytes'] / 1e6:.2f} MB)"),
                         ("merged model", ex["merged"]), ("evaluation", ev["folder"]),
                         ("generations", gen["file"])):
        print(f"    {label:<18} {where}")


# --------------------------------------------------------------------------------------------------
# Stages 7, 8 and 11.


def build_base_model(folder: Path, tokenizer_dir: str, steps: int = BASE_PRETRAIN_STEPS, seed: int = 0) -> dict:
    """A tiny LLaMA trained briefly on the base tokenizer's English text, saved as a Hugging Face folder.

    This is a plain single-process loop on purpose: it stands in for a pretrained LLaMA and is not part
    of what the project trains. Its data goes through the project's own preprocessor.
    """
    import numpy as np
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from .config import PreprocessConfig
    from .data.loader import TokenBlocks
    from .data.preprocess import preprocess
    from .data.shards import load_manifest
    from .tokenizer import spm as spmio
    from .tokenizer.base import stdlib_docstrings

    text = folder / "english.jsonl"
    text.write_text("".join(json.dumps({"text": t}) + "\n" for t in stdlib_docstrings(max_chars=600_000)))
    preprocess(PreprocessConfig(inputs=[str(text)], tokenizer=tokenizer_dir, output=str(folder / "shards"),
                                block_size=DEMO_BLOCK, validation_fraction=0.0, overwrite=True))
    blocks = TokenBlocks(folder / "shards", load_manifest(folder / "shards"), "train")
    vocab = spmio.fingerprint(tokenizer_dir)["vocab_size"]
    torch.manual_seed(seed)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=vocab, **DEMO_MODEL))
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.01, betas=(0.9, 0.95))
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=3e-3, total_steps=steps, pct_start=0.1)
    rng = np.random.default_rng(seed)
    from .progress import Progress

    losses = []
    with Progress("base model", total=steps, unit="step", interval=5) as bar:
        for _ in range(steps):
            x = torch.from_numpy(blocks.take(rng.integers(0, len(blocks), 16)))
            loss = model(input_ids=x, labels=x).loss
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            sched.step()
            opt.zero_grad(set_to_none=True)
            losses.append(loss.item())
            bar.update(1, f"loss {loss.item():.3f}")
    model.save_pretrained(folder / "hf")
    for name in ("tokenizer.model", "tokenizer_config.json", "special_tokens_map.json"):
        shutil.copy(Path(tokenizer_dir) / name, folder / "hf" / name)
    shutil.rmtree(folder / "shards")
    return {"folder": str(folder / "hf"), "parameters": sum(p.numel() for p in model.parameters()),
            "vocab_size": vocab, "english_loss_first": losses[0], "english_loss_last": float(np.mean(losses[-10:]))}


def launcher_command(config: Path, nproc: int) -> list[str]:
    """The deepspeed launcher on this machine's processes; DS_ACCELERATOR=cpu is set by the caller without CUDA."""
    from .distributed import free_port

    port = free_port()
    head = [shutil.which("deepspeed")] if shutil.which("deepspeed") else [sys.executable, "-m", "deepspeed.launcher.runner"]
    return [*head, "--num_gpus", str(nproc), "--master_port", str(port),
            str(PROJECT_ROOT / "cllama_dist" / "train.py"), "--config", str(config)]


def train_stage(folder: Path, run_cfg: dict, nproc: int = DEMO_PROCS) -> dict:
    import torch
    import yaml

    run = folder / "run"
    config = folder / "run.yaml"
    config.write_text(yaml.safe_dump({**run_cfg, "output_dir": str(run)}, sort_keys=False, allow_unicode=True))
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    if not torch.cuda.is_available():
        env.update(DS_ACCELERATOR="cpu", OMP_NUM_THREADS="1")
    env["PYTHONPATH"] = str(PROJECT_ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    cmd = launcher_command(config, nproc)
    print("  $ " + " ".join(cmd[:1] + [Path(c).name if c.startswith("/") and c.endswith(".py") else c
                                      for c in cmd[1:]]), flush=True)
    log = folder / "train.log"
    with open(log, "a") as fh:
        proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                start_new_session=True)
        try:
            for line in proc.stdout:
                fh.write(line)
                # The trainer's own lines (progress, metrics, notes) are shown; DeepSpeed's INFO chatter
                # stays in train.log.
                if not line.startswith("[20") or "[train]" in line or "ERROR" in line:
                    print("  | " + line.rstrip(), flush=True)
        except KeyboardInterrupt:
            import signal

            os.killpg(proc.pid, signal.SIGTERM)  # the trainer saves a checkpoint; the next demo resumes it
            proc.wait()
            raise
        code = proc.wait()
    if code != 0:
        tail = "".join(log.read_text(errors="replace").splitlines(True)[-15:])
        raise UserError(f"training failed (exit {code}); the whole log is {log}. Its end:\n{tail}")
    from .trainer import read_metrics

    train = {r["step"]: r["loss"] for r in read_metrics(run, "train") if not r.get("skipped")}
    evals = read_metrics(run, "eval")
    return {"run": str(run), "log": str(log), "config": str(config),
            "losses": {"first": train[min(train)], "last": train[max(train)], "steps": max(train)},
            "validation_loss": evals[-1]["loss"] if evals else float("nan")}


def generate_stage(folder: Path, merged: str, max_new_tokens: int = 32) -> dict:
    """Reload the merged model with nothing but stock transformers, and continue a few prompts."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(merged)
    model = AutoModelForCausalLM.from_pretrained(merged).eval()
    torch.manual_seed(0)
    samples, new_tokens, seconds = [], 0, 0.0
    for prompt in PROMPTS:
        x = tok(prompt, return_tensors="pt")
        t0 = time.perf_counter()
        with torch.no_grad():
            y = model.generate(**x, max_new_tokens=max_new_tokens, min_new_tokens=max_new_tokens, do_sample=True,
                               temperature=0.7, top_p=0.9, pad_token_id=tok.eos_token_id)
        seconds += time.perf_counter() - t0
        new = y[0, x["input_ids"].shape[1]:]
        new_tokens += len(new)
        samples.append({"prompt": prompt, "continuation": tok.decode(new, skip_special_tokens=True)})
        print(f"  {prompt}|{samples[-1]['continuation']}", flush=True)
    (folder / "generations.json").write_text(json.dumps(samples, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    return {"file": str(folder / "generations.json"), "samples": samples, "tokens_per_second": new_tokens / seconds}
