"""The demo: the whole pipeline on the shipped Chinese corpus, on a CPU, in minutes.

    cllama demo [--out runs/demo] [--base-tokenizer llama/tokenizer.model] [--force] [--until STAGE] [--replay 0.1]

Retention: the eval stage scores held-out Chinese and held-out English (Python docstrings the base model was
not trained on) under the base, base + adapter and merged models, so the summary shows what training on
Chinese cost in English. ``--replay SHARE`` also trains the same model on a mixture (data.sets) in which
SHARE of the sequences replay the base's own English text, and puts that run's figures beside (about the
time of the training stage again, so it is a flag).

STAGES below is the recipe: each stage is reused on a re-run while its inputs are unchanged (unless
--force); the training stage resumes an interrupted run from its last checkpoint. Every stage calls the
same stage API as the CLI (cllama_dist/stages.py) with a config object.
"""

from __future__ import annotations

import json
import shlex
import subprocess
from pathlib import Path

from ... import PROJECT_ROOT, stages
from ...assets import ZH_PROMPTS, corpus_path
from ...data.config import PreprocessConfig
from ...errors import UserError
from ...files import check_not_input, claim_folder
from ...eval.config import EvalConfig
from ...export.config import ExportAdapterConfig, ExportMergedConfig
from ...model.presets import DEMO as DEMO_MODEL
from ...tokenizer.config import MergeConfig, ReportConfig, TokenizerTrainConfig
from ..runner import Reached, RecipeStep, StageRunner, file_key
from .config import DemoConfig

HELD_OUT_EVERY = 8  # every 8th shipped document is held out from tokenizer and model training
DEMO_ZH_VOCAB = 3000  # what ~150 KB of Chinese supports; the paper used 20,000 on 20 GB
DEMO_BASE_VOCAB = 4000
DEMO_BLOCK = 128
DEMO_PROCS = 2
DEMO_SFT_LENGTH = 128  # the shipped instructions are short; packed rows of 128 tokens hold several
BASE_TEXT_CHARS = 600_000  # the docstrings the demo's base model is trained on (base_model.py)
EN_HELDOUT_CHARS = 20_000  # the next docstrings: English the base never saw
EN_REPLAY_CHARS = 150_000  # replayed English: a part of the base's own training text


# ------------------------------------------------------------------------------ the stages


def split_corpus(folder: Path, r: dict) -> dict:
    """Every 8th shipped document held out from tokenizer and model training."""
    lines = corpus_path().read_text(encoding="utf-8").splitlines()
    train = [l for i, l in enumerate(lines) if i % HELD_OUT_EVERY != HELD_OUT_EVERY - 1]
    held = [l for i, l in enumerate(lines) if i % HELD_OUT_EVERY == HELD_OUT_EVERY - 1]
    (folder / "train.jsonl").write_text("\n".join(train) + "\n", encoding="utf-8")
    (folder / "heldout.jsonl").write_text("\n".join(held) + "\n", encoding="utf-8")
    return {"train": str(folder / "train.jsonl"), "heldout": str(folder / "heldout.jsonl"),
            "train_documents": len(train), "heldout_documents": len(held)}


def base_tokenizer(given: str):
    """A LLaMA-style base tokenizer built offline, or the one given (--base-tokenizer)."""

    def run(folder: Path, r: dict) -> dict:
        if given:
            from ...tokenizer import hf, spm

            proto = spm.load_proto(given, "base tokenizer")
            hf.write_folder(folder, spm.model_path(given).read_bytes(), proto)
            return {"tokenizer": str(folder), "source": given}
        from ...tokenizer.base import build_base_tokenizer

        build_base_tokenizer(folder, vocab_size=DEMO_BASE_VOCAB)
        return {"tokenizer": str(folder), "source": "built from Python standard-library docstrings, LLaMA trainer settings"}

    return run


def chinese_tokenizer(folder: Path, r: dict) -> dict:
    out = stages.tokenizer_train(TokenizerTrainConfig(inputs=[r["corpus"]["train"]], output=str(folder / "zh"),
                                                      vocab_size=DEMO_ZH_VOCAB))
    return {"model": out["model"], "vocab_size": DEMO_ZH_VOCAB, "sentences": out["sentences_sampled"]}


def merged_tokenizer(folder: Path, r: dict) -> dict:
    # The stage folder is the stage runner's (its markers); the tokenizer folder is the merge's own.
    out = stages.merge(MergeConfig(base=r["base"]["tokenizer"], add=r["tokenizer"]["model"], out=str(folder / "tokenizer")))
    return {"tokenizer": str(folder / "tokenizer"), "orig_vocab_size": out["orig_vocab_size"],
            "new_vocab_size": out["new_vocab_size"], "added": out["added"]}


def tokenizer_report(folder: Path, r: dict) -> dict:
    from ...tokenizer.report import format_table

    out = stages.report(ReportConfig(tokenizers=[r["base"]["tokenizer"], r["merge"]["tokenizer"]],
                                     inputs=[r["corpus"]["heldout"]], json_out=str(folder / "report.json")))
    (folder / "report.txt").write_text(format_table(out) + "\n", encoding="utf-8")
    b, e = out["tokenizers"]
    return {"tokens_per_char_before": round(b["tokens_per_char"], 3), "tokens_per_char_after": round(e["tokens_per_char"], 3),
            "reduction": round(e["reduction_vs_first"], 2), "table": str(folder / "report.txt")}


def shards(folder: Path, r: dict) -> dict:
    # 5% of the training documents' blocks form the validation split the trainer evaluates on.
    out = folder / "shards"  # the stage's folder is the stage runner's; the shards folder is the preprocessor's
    m = stages.preprocess(PreprocessConfig(inputs=[r["corpus"]["train"]], tokenizer=r["merge"]["tokenizer"],
                                           output=str(out), block_size=DEMO_BLOCK, validation_fraction=0.05))
    return {"folder": str(out), "block_size": DEMO_BLOCK, "train_sequences": m["splits"]["train"]["sequences"],
            "validation_sequences": m["splits"]["validation"]["sequences"], "train_tokens": m["splits"]["train"]["tokens"]}


def english_text(folder: Path) -> dict:
    """Held-out English (docstrings past the base model's training text) and a replay set (part of that text)."""
    from ...tokenizer.base import stdlib_docstrings

    seen = stdlib_docstrings(max_chars=BASE_TEXT_CHARS)
    held = stdlib_docstrings(max_chars=BASE_TEXT_CHARS + EN_HELDOUT_CHARS)[len(seen):]
    replay = stdlib_docstrings(max_chars=EN_REPLAY_CHARS)
    out = {}
    for name, docs in (("heldout_en", held), ("replay_en", replay)):
        (folder / f"{name}.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in docs), encoding="utf-8")
        out[name] = str(folder / f"{name}.jsonl")
    return out


def replay_shards(folder: Path, r: dict) -> dict:
    """The English replay set as shards of the merged tokenizer (its validation split: English bits per character
    during training)."""
    text = english_text(folder)
    out = folder / "shards"
    m = stages.preprocess(PreprocessConfig(inputs=[text["replay_en"]], tokenizer=r["merge"]["tokenizer"],
                                           output=str(out), block_size=DEMO_BLOCK, validation_fraction=0.05))
    return {"folder": str(out), "train_sequences": m["splits"]["train"]["sequences"],
            "validation_sequences": m["splits"]["validation"]["sequences"]}


def base_model(steps: int):
    def run(folder: Path, r: dict) -> dict:
        from .base_model import build_base_model

        return build_base_model(folder, r["base"]["tokenizer"], DEMO_MODEL, steps)

    return run


def run_config(r: dict, steps: int) -> dict:
    """The training stage's run config (nested, as a user's YAML would be)."""
    every = max(steps // 4, 1)
    return {
        "model": {"path": r["model"]["folder"], "tokenizer": r["merge"]["tokenizer"], "new_row_init": "subword",
                  "gradient_checkpointing": True},
        "lora": {"rank": 8, "alpha": 16, "dropout": 0.0},
        "data": {"path": r["shards"]["folder"], "block_size": DEMO_BLOCK, "micro_batch_size": 4, "global_batch_size": 16},
        "optim": {"max_steps": steps, "lr": 2e-3, "embedding_lr": 5e-3, "warmup_steps": 10},
        "engine": {"dtype": "fp32", "deepspeed_config": str(PROJECT_ROOT / "deepspeed_configs" / "zero3.json"),
                   # tiny weights would otherwise stay whole on every rank; partition them as a 7B's would be
                   "deepspeed_overrides": {"zero_optimization": {"stage3_param_persistence_threshold": 0}}},
        "checkpoint": {"save_every": every, "keep_last": 2},
        "validation": {"every": every, "sequences": 64},
        "logging": {"log_every": 10},
    }


def replay_config(r: dict, steps: int, share: float) -> dict:
    """The training stage's run config with SHARE of the sequences drawn from the English replay set."""
    cfg = run_config(r, steps)
    cfg["data"] = {**{k: v for k, v in cfg["data"].items() if k != "path"},
                   "sets": [{"name": "zh", "path": r["shards"]["folder"], "weight": 1 - share},
                            {"name": "en", "path": r["replay_shards"]["folder"], "weight": share}]}
    return cfg


def train(steps: int, share: float = 0.0):
    def run(folder: Path, r: dict) -> dict:
        if not share:
            return train_stage(folder, run_config(r, steps))
        return train_stage(folder, replay_config(r, steps, share)) | {"share": share}

    return run


def train_command(config: Path, nproc: int) -> list[str]:
    """The command a user pastes to run this stage's training by hand: the same launcher, processes, config
    and environment (cllama train sets DS_ACCELERATOR=cpu and the threads on a CPU, as ``environment`` does)."""
    return ["cllama", "train", "--config", str(Path(config).resolve()), "--nproc-per-node", str(nproc),
            "--launcher", "deepspeed"]


def train_stage(folder: Path, run_cfg: dict, nproc: int = DEMO_PROCS) -> dict:
    """LoRA + new rows under ZeRO-3 on ``nproc`` processes, started by DeepSpeed's launcher."""
    import torch
    import yaml

    from ...launch.local import command, environment
    from ...trainer.metrics import read_metrics

    run = folder / "run"
    config = folder / "run.yaml"
    config.write_text(yaml.safe_dump({**run_cfg, "output_dir": str(run)}, sort_keys=False, allow_unicode=True))
    cmd = command(["--config", str(config)], nproc, launcher="deepspeed")
    env = environment(cpu=not torch.cuda.is_available(), nproc=nproc)
    print("  $ " + shlex.join(train_command(config, nproc)), flush=True)
    log = folder / "train.log"
    # The job stays in the demo's process group, as `cllama train --launcher deepspeed` does: a terminal's
    # Ctrl-C reaches the workers (they save at the next step boundary; DeepSpeed's launcher SIGTERMs them too
    # and SIGKILLs them 30 s later), and whatever kills the demo's group kills the job with it. In a session of
    # its own (as before) a killed demo left the job running on, orphaned, writing to a pipe nobody read.
    with open(log, "a") as fh:
        proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        try:
            for line in proc.stdout:
                fh.write(line)
                # The trainer's own lines (progress, metrics, notes) are shown; DeepSpeed's INFO chatter
                # stays in train.log.
                if not line.startswith("[20") or "[train]" in line or "ERROR" in line:
                    print("  | " + line.rstrip(), flush=True)
        except KeyboardInterrupt:
            print("  interrupted: the training processes save a checkpoint at their next step (the next "
                  f"`cllama demo` resumes it); their output goes on into {log}", flush=True)
            drain(proc, fh)
            raise
        code = proc.wait()
    if code != 0:
        tail = "".join(log.read_text(errors="replace").splitlines(True)[-15:])
        raise UserError(f"training failed (exit {code}); the whole log is {log}. Its end:\n{tail}")
    losses = {rec["step"]: rec["loss"] for rec in read_metrics(run, "train") if not rec.get("skipped")}
    evals = read_metrics(run, "eval")
    return {"run": str(run), "log": str(log), "config": str(config),
            "losses": {"first": losses[min(losses)], "last": losses[max(losses)], "steps": max(losses)},
            "validation_loss": evals[-1]["loss"] if evals else float("nan"),
            "validation": {str(e["step"]): e["loss"] for e in evals},
            # per set for a mixture (zh/bits_per_char, en/bits_per_char), else the one folder's
            "validation_bits_per_char": {k: v for k, v in (evals[-1] if evals else {}).items()
                                         if k.endswith("bits_per_char")}}


def drain(proc, fh) -> None:
    """The rest of an interrupted job's output into its log until it exits: the processes still print while
    they save, and a pipe nobody reads would block them or break their writes. A second Ctrl-C stops waiting
    (the workers, interrupted twice, exit without saving)."""
    try:
        for line in proc.stdout:
            fh.write(line)
        proc.wait()
    except KeyboardInterrupt:
        pass


def export(folder: Path, r: dict, which: str = "train") -> dict:
    meta = stages.export_adapter(ExportAdapterConfig(run=r[which]["run"], out=str(folder / "adapter")))
    merged = stages.export_merged(ExportMergedConfig(base=r["model"]["folder"], adapter=str(folder / "adapter"),
                                                     out=str(folder / "merged"), dtype="fp32"))
    size = (folder / "adapter" / "adapter_model.safetensors").stat().st_size
    return {"adapter": str(folder / "adapter"), "merged": merged["out"], "step": meta["step"],
            "trained_parameters": meta["trained_parameters"], "adapter_bytes": size}


def evaluate(folder: Path, r: dict) -> dict:
    """Bits per character on held-out Chinese and English: the base (its own tokenizer) against base + adapter and
    merged (and, with --replay, the merged model of the replay run), in one `cllama eval` table call."""
    from ...eval.run import format_result

    text = english_text(folder)
    compare = [f"merged={r['export']['merged']}"]
    if "export_replay" in r:
        compare.append(f"merged+replay={r['export_replay']['merged']}")
    cfg = EvalConfig(model=r["model"]["folder"], adapter=r["export"]["adapter"], compare_base=True, compare=compare,
                     text=[f"zh={r['corpus']['heldout']}", f"en={text['heldout_en']}"], block_size=DEMO_BLOCK * 2,
                     device="cpu", dtype="fp32", json_out=str(folder / "table.json"))
    result = stages.evaluate(cfg)
    (folder / "table.txt").write_text(format_result(result) + "\n", encoding="utf-8")
    keys = ("loss", "perplexity", "bits_per_char", "bits_per_byte", "tokens_per_char", "tokens")
    out = {}
    for column, cells in result["table"]["cells"].items():
        name = column.replace(" + ", "+")
        out[name] = {k: cells["zh"][k] for k in keys} | {"en_bits_per_char": cells["en"]["bits_per_char"]}
    return out | {"folder": str(folder), "table": str(folder / "table.txt")}


def generate(folder: Path, r: dict, max_new_tokens: int = 32) -> dict:
    """Reload the merged model with stock transformers (the tokenizer through its folder's tokenization_cllama.py),
    and continue a few prompts."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from ...inference.generate import Sampling, continue_ids

    merged = r["export"]["merged"]
    # Stock loading on purpose (not inference/load.py): this stage shows that the exported folder is all a user
    # of transformers needs. The folder's own tokenizer class (tokenization_cllama.py): SentencePiece's ids and
    # decode, so byte-fallback pieces print as characters; transformers 5's stock class, without
    # trust_remote_code, prints them as <0xE4>...
    tok = AutoTokenizer.from_pretrained(merged, trust_remote_code=True)
    model = AutoModelForCausalLM.from_pretrained(merged).eval()
    torch.manual_seed(0)
    samples, new_tokens, seconds = [], 0, 0.0
    for prompt in ZH_PROMPTS:
        ids = tok(prompt)["input_ids"]
        new, took = continue_ids(model, ids, Sampling(max_new_tokens, temperature=0.7, top_p=0.9), model.device,
                                 pad_id=tok.eos_token_id)
        seconds += took
        new_tokens += len(new)
        samples.append({"prompt": prompt, "continuation": tok.decode(new, skip_special_tokens=True)})
        print(f"  {prompt}|{samples[-1]['continuation']}", flush=True)
    (folder / "generations.json").write_text(json.dumps(samples, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    # The time is kept as measured (three short prompts on a shared CPU), not turned into a rate for the summary:
    # a speed figure belongs to a benchmark (bench/), not to one demo run.
    return {"file": str(folder / "generations.json"), "samples": samples, "new_tokens": new_tokens,
            "seconds": seconds}


# ------------------------------------------------------------------------------ instruction tuning (the Alpaca half)


def sft_shards(folder: Path, r: dict) -> dict:
    """The shipped instruction set (sft/shipped.py) rendered through the paper's Alpaca template, tokenized with
    the merged tokenizer that the pre-trained model carries, packed into rows without attention across examples."""
    from ...data.config import SFTPreprocessConfig
    from ...sft.shipped import train_files

    out = folder / "shards"
    m = stages.preprocess_sft(SFTPreprocessConfig(inputs=[str(p) for p in train_files()],
                                                  tokenizer=r["export"]["merged"], output=str(out), template="alpaca",
                                                  max_length=DEMO_SFT_LENGTH, layout="packed",
                                                  validation_fraction=0.05))
    t, v = m["splits"]["train"], m["splits"]["validation"]
    return {"folder": str(out), "template": m["template"]["name"], "train_examples": t["examples"],
            "validation_examples": v["examples"], "train_rows": t["rows"], "response_tokens": t["response_tokens"]}


def sft_run_config(r: dict, steps: int) -> dict:
    """The instruction-tuning run: a fresh LoRA (the paper's r 8 / alpha 32) plus the Chinese rows, on the merged
    pre-trained model; validation (response tokens only) before the first step and after the last."""
    every = max(steps // 2, 1)
    merged = r["export"]["merged"]
    return {
        "model": {"path": merged, "tokenizer": merged, "gradient_checkpointing": True},
        "lora": {"rank": 8, "alpha": 32, "dropout": 0.0},
        "data": {"path": r["sft-shards"]["folder"], "micro_batch_size": 4, "global_batch_size": 16},
        "optim": {"max_steps": steps, "lr": 3e-3, "warmup_ratio": 0.03, "weight_decay": 0.0},
        "engine": {"dtype": "fp32", "deepspeed_config": str(PROJECT_ROOT / "deepspeed_configs" / "zero3.json"),
                   "deepspeed_overrides": {"zero_optimization": {"stage3_param_persistence_threshold": 0}}},
        "checkpoint": {"save_every": every, "keep_last": 2},
        "validation": {"every": every, "at_start": True},
        "logging": {"log_every": 10},
    }


def sft_train(steps: int):
    def run(folder: Path, r: dict) -> dict:
        return train_stage(folder, sft_run_config(r, steps))

    return run


def sft_export(folder: Path, r: dict) -> dict:
    """The instruction-tuned adapter (its chat template in the tokenizer config) and the merged chat model."""
    meta = stages.export_adapter(ExportAdapterConfig(run=r["sft-train"]["run"], out=str(folder / "adapter")))
    merged = stages.export_merged(ExportMergedConfig(base=r["export"]["merged"], adapter=str(folder / "adapter"),
                                                     out=str(folder / "merged"), dtype="fp32"))
    return {"adapter": str(folder / "adapter"), "merged": merged["out"], "step": meta["step"],
            "chat_template": (meta.get("chat_template") or {}).get("name")}


def sft_chat(folder: Path, r: dict) -> dict:
    """Held-out mechanical instructions (copy, reverse, ... of phrases no training record holds), answered greedily
    through the template by the pre-trained and the instruction-tuned model: the share answered exactly."""
    from ...eval.instructions import evaluate_instructions
    from ...sft.shipped import instructions_dir

    held = instructions_dir() / "mechanical_heldout.jsonl"
    out = {}
    for name, model in (("pre-trained", r["export"]["merged"]), ("instruction-tuned", r["sft-export"]["merged"])):
        res = evaluate_instructions(EvalConfig(model=model, instructions=str(held), template="alpaca", device="cpu",
                                               dtype="fp32"))
        (folder / f"{name}.json").write_text(json.dumps(res, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
        out[name] = {"exact": res["exact"], "records": res["records"], "share": res["share"],
                     "by_task": {k: v["share"] for k, v in res["by_task"].items()}}
    answers = json.loads((folder / "instruction-tuned.json").read_text(encoding="utf-8"))["answers"]
    samples = [{"instruction": a["instruction"], "answer": a["answer"], "expected": a["expected"]}
               for a in answers[::max(len(answers) // 3, 1)][:3]]
    for s in samples:
        print(f"  {s['instruction']} -> {s['answer']}", flush=True)
    return out | {"folder": str(folder), "samples": samples}


# ------------------------------------------------------------------------------ the recipe


def recipe(cfg: DemoConfig) -> list[RecipeStep]:
    given = cfg.base_tokenizer
    given_key = file_key(Path(given)) if given and Path(given).is_file() else given
    return [
        RecipeStep("corpus", split_corpus, lambda r: {"shipped": file_key(corpus_path())}),
        RecipeStep("base", base_tokenizer(given), lambda r: {"given": given_key, "vocab": DEMO_BASE_VOCAB}),
        RecipeStep("tokenizer", chinese_tokenizer, lambda r: {"corpus": r["corpus"], "vocab": DEMO_ZH_VOCAB}),
        RecipeStep("merge", merged_tokenizer, lambda r: {"base": r["base"], "zh": r["tokenizer"]}),
        RecipeStep("report", tokenizer_report, lambda r: {"merge": r["merge"], "heldout": r["corpus"]["heldout"]}),
        RecipeStep("shards", shards, lambda r: {"merge": r["merge"], "corpus": r["corpus"], "block": DEMO_BLOCK}),
        RecipeStep("model", base_model(cfg.base_steps), lambda r: {"base": r["base"], "model": DEMO_MODEL,
                                                                   "steps": cfg.base_steps}),
        RecipeStep("train", train(cfg.steps), lambda r: {"model": r["model"], "shards": r["shards"],
                                                    "config": run_config(r, cfg.steps)}, resumable=True),
        RecipeStep("export", export, lambda r: {"train": r["train"]}),
        *(replay_stages(cfg) if cfg.replay else []),
        RecipeStep("eval", evaluate, lambda r: {"export": r["export"], "heldout": r["corpus"]["heldout"],
                                           "english": [BASE_TEXT_CHARS, EN_HELDOUT_CHARS],
                                           "replay": r.get("export_replay")}),
        RecipeStep("generate", generate, lambda r: {"export": r["export"], "prompts": ZH_PROMPTS}),
        RecipeStep("sft-shards", sft_shards, lambda r: {"export": r["export"], "shipped": _shipped_key(),
                                                   "length": DEMO_SFT_LENGTH}),
        RecipeStep("sft-train", sft_train(cfg.sft_steps), lambda r: {"shards": r["sft-shards"],
                                                                "config": sft_run_config(r, cfg.sft_steps)},
              resumable=True),
        RecipeStep("sft-export", sft_export, lambda r: {"train": r["sft-train"]}),
        RecipeStep("sft-chat", sft_chat, lambda r: {"export": r["sft-export"], "shipped": _shipped_key()}),
    ]


def _shipped_key() -> dict:
    from ...sft.shipped import instructions_dir

    return {p.name: file_key(p) for p in sorted(instructions_dir().glob("*.jsonl"))}


def replay_stages(cfg: DemoConfig) -> list[RecipeStep]:
    """--replay: the English replay set, the same training on the mixture, and its export."""
    return [
        RecipeStep("replay_shards", replay_shards, lambda r: {"merge": r["merge"], "chars": EN_REPLAY_CHARS,
                                                         "block": DEMO_BLOCK}),
        RecipeStep("train_replay", train(cfg.steps, cfg.replay),
              lambda r: {"model": r["model"], "shards": r["shards"], "replay": r["replay_shards"],
                         "config": replay_config(r, cfg.steps, cfg.replay)}, resumable=True),
        RecipeStep("export_replay", lambda folder, r: export(folder, r, "train_replay"), lambda r: {"train": r["train_replay"]}),
    ]


def run(cfg: DemoConfig) -> dict:
    """Run the stages (up to and including ``cfg.until``); returns every stage's result by name."""
    if cfg.base_tokenizer and not Path(cfg.base_tokenizer).exists():
        raise UserError(f"--base-tokenizer {cfg.base_tokenizer} not found")
    root = Path(cfg.out)
    check_not_input(root, {"base tokenizer": cfg.base_tokenizer}, "demo")
    claim_folder(root, "demo", reuse=True)  # its stages replace their own folders inside it, nothing else
    steps = recipe(cfg)
    runner = StageRunner(root, cfg.force, total=len(steps), until=cfg.until or None)
    try:
        runner.run_all(steps)
        print_summary(runner.summary)
    except Reached:
        print_summary(runner.summary)  # what the stages so far measured
        print(f"stopped after stage '{cfg.until}' (--until); run without --until to continue from here")
    (root / "summary.json").write_text(json.dumps(runner.summary, indent=2, ensure_ascii=False) + "\n")
    return runner.summary


def print_summary(s: dict) -> None:
    """The figures of the stages that ran (all of them, or those up to --until from ``eval`` on)."""
    if "eval" not in s:
        return
    rep, m, tr, ev = s["report"], s["merge"], s["train"], s["eval"]
    loss = tr["losses"]
    print()
    print("cllama demo summary")
    print(f"  tokens / character, held-out Chinese   {rep['tokens_per_char_before']} -> {rep['tokens_per_char_after']} "
          f"({rep['reduction']}x fewer tokens; {m['orig_vocab_size']:,} -> {m['new_vocab_size']:,} pieces)")
    print(f"  training loss (merged tokenizer)       {loss['first']:.3f} at step 1 -> {loss['last']:.3f} at step "
          f"{loss['steps']}; validation {tr['validation_loss']:.3f}")
    print(f"  bits / character, held-out Chinese     {ev['base']['bits_per_char']:.3f} (base model, base tokenizer) -> "
          f"{ev['merged']['bits_per_char']:.3f} (merged model; base + adapter: {ev['base+adapter']['bits_per_char']:.3f})")
    print(f"  bits / character, held-out English     {ev['base']['en_bits_per_char']:.3f} (base) -> "
          f"{ev['merged']['en_bits_per_char']:.3f} (merged): what training on Chinese cost in English")
    if "merged+replay" in ev:
        rp = ev["merged+replay"]
        print(f"  with English replay ({100 * s['train_replay']['share']:.0f}% of sequences)  Chinese "
              f"{rp['bits_per_char']:.3f} (without: {ev['merged']['bits_per_char']:.3f}), English "
              f"{rp['en_bits_per_char']:.3f} (without: {ev['merged']['en_bits_per_char']:.3f}, base "
              f"{ev['base']['en_bits_per_char']:.3f})")
    gen = s.get("generate")
    if gen:
        print(f"  generation (merged, stock transformers) "
              f"{gen['samples'][0]['prompt']}|{gen['samples'][0]['continuation'][:40]}")
    st, sc = s.get("sft-train"), s.get("sft-chat")
    if st and sc:
        before, after = st["validation"]["0"], st["validation_loss"]
        pre, tuned = sc["pre-trained"], sc["instruction-tuned"]
        print(f"  instruction tuning, response-only loss {before:.3f} before -> {after:.3f} after "
              f"{st['losses']['steps']} steps (validation, {s['sft-shards']['validation_examples']} held-out examples)")
        print(f"  held-out mechanical tasks, exact       {pre['exact']}/{pre['records']} (pre-trained) -> "
              f"{tuned['exact']}/{tuned['records']} (instruction-tuned, template {s['sft-shards']['template']})")
    print("  artefacts")
    ex = s["export"]
    for label, where in (("base tokenizer", s["base"]["tokenizer"]), ("Chinese tokenizer", s["tokenizer"]["model"]),
                         ("merged tokenizer", m["tokenizer"]), ("tokenizer report", rep["table"]),
                         ("shards", s["shards"]["folder"]), ("base model", s["model"]["folder"]),
                         ("training run", f"{tr['run']} (metrics.jsonl, tb/, checkpoints/)"),
                         ("adapter (PEFT)", f"{ex['adapter']} ({ex['adapter_bytes'] / 1e6:.2f} MB)"),
                         ("merged model", ex["merged"]), ("evaluation", ev["table"]),
                         ("generations", gen and gen["file"]), ("SFT shards", s.get("sft-shards", {}).get("folder")),
                         ("SFT run", st and st["run"]),
                         ("chat model", sc and f"{s['sft-export']['merged']} (cllama chat --model ...)"),
                         ("held-out answers", sc and sc["folder"])):
        if where:
            print(f"    {label:<18} {where}")
