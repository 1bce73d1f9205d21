"""The whole pipeline on the shipped Chinese corpus, on a CPU, in minutes.

    cllama demo [--out runs/demo] [--base-tokenizer llama/tokenizer.model] [--force]

Stages (each reused on a re-run when its inputs are unchanged, unless --force):
  1. corpus     split the shipped corpus into training and held-out documents
  2. base       a LLaMA-style base tokenizer (built offline) or the one given
  3. tokenizer  train a Chinese SentencePiece model on the training documents
  4. merge      append its new pieces to the base tokenizer, ids unchanged
  5. report     tokens per character before and after, on held-out text
  6. shards     tokenize the corpus offline into packed Arrow shards (the trainer's input)
"""

from __future__ import annotations

import hashlib
import json
import shutil
import time
from pathlib import Path
from typing import Callable

from .assets import corpus_path
from .config import MergeConfig, PreprocessConfig, ReportConfig, TokenizerTrainConfig
from .errors import UserError

HELD_OUT_EVERY = 8  # every 8th shipped document is held out from tokenizer and model training
DEMO_ZH_VOCAB = 3000  # what ~150 KB of Chinese supports; the paper used 20,000 on 20 GB
DEMO_BASE_VOCAB = 4000
DEMO_BLOCK = 128


class Stages:
    """Runs named stages once; a stage is reused while its key (what it was built from) is unchanged."""

    def __init__(self, out: Path, force: bool, total: int):
        self.out, self.force, self.total, self.n = out, force, total, 0
        self.summary: dict[str, dict] = {}

    def run(self, name: str, key: dict, fn: Callable[[Path], dict]) -> dict:
        self.n += 1
        folder = self.out / name
        marker = folder / ".done.json"
        digest = hashlib.sha256(json.dumps(key, sort_keys=True, default=str).encode()).hexdigest()
        if not self.force and marker.is_file():
            done = json.loads(marker.read_text())
            if done.get("key") == digest:
                print(f"[{self.n}/{self.total}] {name}: reusing {folder} (finished earlier; --force to redo)", flush=True)
                self.summary[name] = done["result"]
                return done["result"]
        if folder.exists():
            shutil.rmtree(folder)
        folder.mkdir(parents=True)
        print(f"[{self.n}/{self.total}] {name} ...", flush=True)
        t0 = time.time()
        result = fn(folder)
        result["seconds"] = round(time.time() - t0, 1)
        marker.write_text(json.dumps({"key": digest, "result": result}, indent=2, ensure_ascii=False) + "\n")
        print(f"[{self.n}/{self.total}] {name}: done in {result['seconds']}s", flush=True)
        self.summary[name] = result
        return result


def _file_key(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def run_demo(out: str = "runs/demo", base_tokenizer: str | None = None, force: bool = False) -> dict:
    root = Path(out)
    root.mkdir(parents=True, exist_ok=True)
    stages = Stages(root, force, total=6)
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

        # Training shards from the training documents, validation shards from the held-out ones.
        out = {}
        for name, src, frac in (("train", corpus["train"], 0.0), ("heldout", corpus["heldout"], 0.0)):
            mf = preprocess(PreprocessConfig(inputs=[src], tokenizer=m["tokenizer"], output=str(folder / name),
                                             block_size=DEMO_BLOCK, validation_fraction=frac, overwrite=True))
            out[name] = {"folder": str(folder / name), "sequences": mf["splits"]["train"]["sequences"],
                         "tokens": mf["splits"]["train"]["tokens"]}
        return {"block_size": DEMO_BLOCK, **out}

    sh = stages.run("shards", {"merge": m, "corpus": corpus, "block": DEMO_BLOCK}, shards)

    print()
    print("cllama demo summary")
    print(f"  base tokenizer     {base_res['tokenizer']} ({m['orig_vocab_size']:,} pieces)")
    print(f"  merged tokenizer   {m['tokenizer']} ({m['new_vocab_size']:,} pieces, {m['added']:,} added)")
    print(f"  tokens / character on held-out Chinese: {rep['tokens_per_char_before']} -> "
          f"{rep['tokens_per_char_after']} ({rep['reduction']}x fewer tokens)")
    print(f"  report             {rep['table']}")
    print(f"  shards             {sh['train']['folder']} ({sh['train']['sequences']} x {DEMO_BLOCK} tokens), "
          f"held-out {sh['heldout']['folder']} ({sh['heldout']['sequences']})")
    (root / "summary.json").write_text(json.dumps(stages.summary, indent=2, ensure_ascii=False) + "\n")
    return stages.summary
