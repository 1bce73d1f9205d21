"""The real base (SmolLM2-135M-Instruct, `cllama base fetch`) measured with the project's own stages.

    CLLAMA_FIXTURES=../shared/fixtures python3 bench/real_base.py [--json docs/real-base.json] [--work /tmp/real_base]

Held-out Chinese: every 8th document (index % 8 == 0) of the fixture corpus zh_open_mix.jsonl, as in
tests/real/test_bpe_real.py; the rest trains the extension. Measures, on the converted fp32 model:
- tokens per character of the held-out Chinese (`cllama tokenizer report`);
- bits per character on the first 40 held-out Chinese documents and on held-out English prose (the demo's
  held-out docstrings), through `cllama eval`'s table (eval/run.py: [BOS] + tokens per document, every token
  predicted once);
- seconds of one forward + backward of 4 x 128 tokens with gradient checkpointing (median of 3 after a warm-up);
- the 20,000-piece Chinese extension (`cllama tokenizer train --base`, `cllama tokenizer merge`) and tokens per
  character after it.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

from common import REPO, commit

sys.path.insert(0, str(REPO))

from cllama_dist import stages  # noqa: E402
from cllama_dist.bases.config import BaseFetchConfig  # noqa: E402
from cllama_dist.eval.config import EvalConfig  # noqa: E402
from cllama_dist.recipes.demo.recipe import english_text  # noqa: E402
from cllama_dist.tokenizer.config import MergeConfig, ReportConfig, TokenizerTrainConfig  # noqa: E402

HELDOUT_DOCS = 40


def split(corpus: Path, work: Path) -> dict:
    lines = corpus.read_text(encoding="utf-8").splitlines()
    held = [l for i, l in enumerate(lines) if i % 8 == 0]
    files = {"train": [l for i, l in enumerate(lines) if i % 8], "heldout": held, "heldout40": held[:HELDOUT_DOCS]}
    for name, rows in files.items():
        (work / f"{name}.jsonl").write_text("\n".join(rows) + "\n", encoding="utf-8")
    return {k: str(work / f"{k}.jsonl") for k in files}


def step_seconds(folder: str, text: str, repeats: int = 3) -> dict:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(folder)
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    model.gradient_checkpointing_enable()
    model.train()
    ids = tok.encode(text[:4000], add_special_tokens=False)[: 4 * 128]  # 4,000 Chinese characters: ~6,900 tokens
    x = torch.tensor(ids).view(4, 128)
    times = []
    for i in range(repeats + 1):
        t0 = time.perf_counter()
        loss = model(input_ids=x, labels=x).loss
        loss.backward()
        model.zero_grad(set_to_none=True)
        if i:  # the first is a warm-up
            times.append(time.perf_counter() - t0)
    return {"batch": [4, 128], "gradient_checkpointing": True, "seconds_median": round(statistics.median(times), 2),
            "seconds": [round(t, 2) for t in times], "torch_threads": torch.get_num_threads()}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--json", default=str(REPO / "docs" / "real-base.json"))
    ap.add_argument("--work", default="/tmp/real_base_bench")
    ap.add_argument("--skip-extension", action="store_true")
    args = ap.parse_args()
    fixtures = Path(os.environ.get("CLLAMA_FIXTURES", REPO.parent / "shared" / "fixtures"))
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    r: dict = {"commit": commit(), "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
               "machine": f"{platform.machine()}, {os.cpu_count()} cores", "load_before": os.getloadavg()}
    t0 = time.time()
    base = stages.base_fetch(BaseFetchConfig())
    r["fetch"] = {"folder": base["folder"], "reused": base["reused"], "seconds": round(time.time() - t0, 1),
                  "conversion_seconds": base["seconds"], "model": base["model"]}
    folder = base["folder"]
    files = split(fixtures / "zh_open_mix.jsonl", work)
    en = english_text(work)["heldout_en"]

    rep = stages.report(ReportConfig(tokenizers=[folder], inputs=[files["heldout"]]))
    r["tokens_per_char_base"] = rep["tokenizers"][0]["tokens_per_char"]
    print(f"tokens/char (held-out Chinese, base): {r['tokens_per_char_base']:.3f}", flush=True)

    t0 = time.time()
    ev = stages.evaluate(EvalConfig(model=folder, text=[f"zh={files['heldout40']}", f"en={en}"], device="cpu",
                                    dtype="fp32", json_out=str(work / "eval.json")))
    cells = next(iter(ev["table"]["cells"].values()))
    r["bits_per_char"] = {k: {f: cells[k][f] for f in ("bits_per_char", "tokens_per_char", "tokens")} |
                          {"characters": cells[k].get("characters")} for k in ("zh", "en")}
    r["eval_seconds"] = round(time.time() - t0, 1)
    print(f"bits/char: zh {cells['zh']['bits_per_char']:.3f}, en {cells['en']['bits_per_char']:.3f} "
          f"({r['eval_seconds']} s)", flush=True)

    held_text = "".join(json.loads(l)["text"] for l in Path(files["heldout"]).read_text(encoding="utf-8").splitlines())
    r["forward_backward"] = step_seconds(folder, held_text)
    print(f"forward+backward 4 x 128, checkpointing: {r['forward_backward']['seconds_median']} s", flush=True)

    if not args.skip_extension:
        t0 = time.time()
        stages.tokenizer_train(TokenizerTrainConfig(inputs=[files["train"]], output=str(work / "zh"),
                                                    vocab_size=20000, base=folder))
        t1 = time.time()
        m = stages.merge(MergeConfig(base=folder, add=str(work / "zh.json"), out=str(work / "merged"), overwrite=True))
        t2 = time.time()
        rep = stages.report(ReportConfig(tokenizers=[folder, str(work / "merged")], inputs=[files["heldout"]]))
        before, after = rep["tokenizers"]
        r["extension"] = {"vocab_size": 20000, "added": m["added"], "first_new_id": m["first_new_id"],
                          "tokens_after": after["vocab_size"], "tokens_per_char_before": before["tokens_per_char"],
                          "tokens_per_char_after": after["tokens_per_char"],
                          "base_language_changed": after["extension_of_first"]["base_language_changed"],
                          "train_seconds": round(t1 - t0, 1), "merge_seconds": round(t2 - t1, 1)}
        print(f"extension: {before['tokens_per_char']:.3f} -> {after['tokens_per_char']:.3f} tokens/char "
              f"({m['added']:,} added)", flush=True)
    r["load_after"] = os.getloadavg()
    Path(args.json).write_text(json.dumps(r, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
