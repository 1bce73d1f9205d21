"""Evaluate a model on held-out text: loss, perplexity, and bits per character.

    cllama eval --model BASE [--adapter ADAPTER] --inputs heldout.jsonl [--generate [--template auto|none|NAME|FILE]]
    cllama eval --model MERGED --shards shards/ [--split validation]
    cllama eval --model MERGED --instructions heldout_instructions.jsonl      (exact-match share: instructions.py)

Token perplexity depends on the tokenizer: a tokenizer that cuts the same text into half as many tokens
makes each token harder to predict, so the base LLaMA and the extended model cannot be compared by it.
Bits per character can: the summed negative log-likelihood of a text, in bits, divided by its length in
characters, is the cost of encoding that text under the model whatever the tokenization. Bits per UTF-8
byte are reported too (the unit of byte-level models and of compression tables).

How the text is scored: each document is encoded on its own as [BOS] + tokens (no EOS), and every one
of its tokens is predicted exactly once, given everything before it in its window. A document longer
than a window continues in the next one, which starts with the previous window's last token; so the
sum of the token losses is -log p(document) under the model, to within the context cut at window edges.
"""

from __future__ import annotations

import functools
import json
import math
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from ..config import to_dict
from ..errors import UserError
from ..files import check_file_output, check_not_input, write_atomic
from ..model.config import resolve_dtype
from ..model.scoring import causal_nll
from ..progress import Progress
from .config import EvalConfig

LN2 = math.log(2)


# --------------------------------------------------------------------------------------------------
# Loading.


class Tokenizer:
    """A SentencePiece tokenizer (tokenizer.model), or a Hugging Face one where a folder has no .model."""

    def __init__(self, path: Path):
        from ..tokenizer import spm

        self.path = path
        model_file = path if path.is_file() else path / spm.MODEL_FILE
        if model_file.is_file():
            self.sp = spm.processor(model_file)
            self.hf = None
            self.size = self.sp.get_piece_size()
            self.bos_id = self.sp.bos_id()
            self.model_file = model_file
        else:
            from transformers import AutoTokenizer

            try:
                self.hf = AutoTokenizer.from_pretrained(str(path))
            except (OSError, ValueError):
                raise UserError(f"no tokenizer in {path} (neither tokenizer.model nor a Hugging Face tokenizer; "
                                "pass --tokenizer)") from None
            self.sp = None
            self.size = len(self.hf)
            self.bos_id = self.hf.bos_token_id if self.hf.bos_token_id is not None else -1
            self.model_file = None

    @functools.cached_property
    def fingerprint(self) -> dict | None:
        """What shards are checked against (hashing the file: only computed when shards are evaluated)."""
        from ..tokenizer import spm

        return spm.fingerprint(self.model_file) if self.model_file is not None else None

    def encode(self, texts: list[str]) -> list[list[int]]:
        if self.sp is not None:
            return self.sp.encode(texts)
        return [self.hf.encode(t, add_special_tokens=False) for t in texts]

    def decode(self, ids: list[int]) -> str:
        return self.sp.decode(ids) if self.sp is not None else self.hf.decode(ids, skip_special_tokens=True)


def pick_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise UserError(f"--device {name}: no CUDA device on this machine")
    return torch.device(name)


def load(cfg: EvalConfig):
    """(model, tokenizer, description, device) for a model folder, optionally with an adapter on top.

    ``cfg`` is any config with model, adapter, tokenizer, device and dtype (EvalConfig, ChatConfig).
    """
    from transformers import AutoConfig, AutoModelForCausalLM

    from ..model.adapters import DTYPES

    device = pick_device(cfg.device)
    dtype = DTYPES[resolve_dtype(cfg.dtype, device.type == "cuda")]
    try:
        config = AutoConfig.from_pretrained(cfg.model)
    except (OSError, ValueError) as exc:
        raise UserError(f"--model {cfg.model} is not a Hugging Face model folder: {exc}") from None
    tok_path = Path(cfg.tokenizer or cfg.adapter or cfg.model)
    tokenizer = Tokenizer(tok_path)
    try:
        model = AutoModelForCausalLM.from_pretrained(cfg.model, dtype=dtype)
    except OSError as exc:  # transformers' "no file named model.safetensors ..." and unreadable files
        raise UserError(f"cannot load the model {cfg.model}: {str(exc).splitlines()[0]}") from None
    except Exception as exc:
        from safetensors import SafetensorError

        if isinstance(exc, SafetensorError):  # a truncated or damaged weights file
            raise UserError(f"cannot load the model {cfg.model}: its weights are truncated or damaged "
                            f"({str(exc).splitlines()[0]})") from None
        raise
    what = f"{cfg.model}"
    if cfg.adapter:
        from peft import PeftModel

        from ..export.run import read_adapter

        meta, _ = read_adapter(cfg.adapter, cfg.model, config.vocab_size,
                               tokenizer=tokenizer.path if cfg.tokenizer else None)
        # The trained model's rows (more than the tokens where padding rows remain); PEFT restores the new ones.
        model.resize_token_embeddings(meta.get("rows") or meta["new_vocab"], mean_resizing=False)
        try:
            model = PeftModel.from_pretrained(model, cfg.adapter)
        except (RuntimeError, ValueError, KeyError) as exc:
            raise UserError(f"the adapter {cfg.adapter} does not fit the base {cfg.model} (another architecture?): "
                            f"{str(exc).splitlines()[0]}") from None
        what += f" + adapter {cfg.adapter}"
    rows = model.get_input_embeddings().weight.shape[0]
    if tokenizer.size > rows:
        raise UserError(f"the tokenizer {tok_path} has {tokenizer.size:,} pieces but the model {cfg.model} has "
                        f"{rows:,} embedding rows: a merged tokenizer with the base model? Pass the adapter "
                        "(--adapter) or the merged model")
    model.to(device).eval()
    from ..model.adapters import install_loss_forward

    # Scores through the chunked loss (no full logits; a chat or generation call without labels is unchanged).
    install_loss_forward(model, getattr(cfg, "loss", "chunked"), "torch")
    return model, tokenizer, what, device


# --------------------------------------------------------------------------------------------------
# Scoring.


@dataclass
class Totals:
    nll: float = 0.0  # nats, summed over predicted tokens
    tokens: int = 0  # predicted tokens
    documents: int = 0
    chars: int = 0
    bytes: int = 0

    def figures(self, vocab_size: int = 0) -> dict:
        """``vocab_size``: also the uniform baseline, log2 V bits per token x tokens per character (what a model
        that knows nothing pays: the scale a bits-per-character figure is read on)."""
        if self.tokens == 0:
            raise UserError("nothing to evaluate: no tokens")
        loss = self.nll / self.tokens
        out = {"documents": self.documents, "tokens": self.tokens, "loss": loss,
               "perplexity": math.exp(min(loss, 700.0)), "characters": self.chars or None, "bytes": self.bytes or None,
               "bits_per_char": None, "bits_per_byte": None, "tokens_per_char": None}
        if self.chars:
            bits = self.nll / LN2
            out.update(bits_per_char=bits / self.chars, bits_per_byte=bits / self.bytes,
                       tokens_per_char=self.tokens / self.chars)
            if vocab_size:
                out["uniform_bits_per_char"] = math.log2(vocab_size) * self.tokens / self.chars
        return out


def windows(ids: list[int], bos: int, block: int) -> list[list[int]]:
    """Windows of at most `block` tokens over [BOS] + ids that predict each of `ids` exactly once.

    Window k holds stream[k(block-1) : k(block-1) + block]: consecutive windows share one token, the last
    of one being the first (context only) of the next.
    """
    stream = ([bos] if bos >= 0 else []) + ids
    step = block - 1
    return [stream[s:s + block] for s in range(0, max(len(stream) - 1, 1), step) if len(stream[s:s + block]) > 1]


@torch.no_grad()
def score(model, batch: list[list[int]], device: torch.device) -> float:
    """Summed negative log-likelihood (nats) of every token but the first of each window (padded to one length)."""
    n = max(len(w) for w in batch)
    x = torch.zeros(len(batch), n, dtype=torch.long)
    mask = torch.zeros(len(batch), n, dtype=torch.long)
    for i, w in enumerate(batch):
        x[i, :len(w)] = torch.tensor(w)
        mask[i, :len(w)] = 1
    nll, _ = causal_nll(model, x.to(device), mask.to(device))
    return float(nll.double().sum())


def eval_text(model, tokenizer: Tokenizer, cfg: EvalConfig, block: int, device: torch.device) -> Totals:
    from ..data.corpus import RecordReader, resolve_inputs

    import numpy as np

    reader = RecordReader(cfg.text_field, cfg.strict)
    t = Totals()
    # Encoding first (fast: SentencePiece) gives the progress its total and so an ETA; the ids are kept as int32
    # arrays, 4 bytes a token.
    docs: list[np.ndarray] = []
    for src in resolve_inputs(cfg.inputs):
        for doc in reader.read(src):
            ids = tokenizer.encode([doc.text])[0]
            if not ids:
                continue
            t.documents += 1
            t.chars += len(doc.text)
            t.bytes += len(doc.text.encode("utf-8"))
            t.tokens += len(ids)
            docs.append(np.asarray(ids, np.int32))
            if cfg.max_documents and t.documents >= cfg.max_documents:
                break
        if cfg.max_documents and t.documents >= cfg.max_documents:
            break
    if t.documents == 0:
        raise UserError(f"no usable document in {cfg.inputs}")
    pending: list[list[int]] = []
    with Progress("eval", total=t.tokens, unit="tok") as bar:
        for ids in docs:
            pending.extend(windows(ids.tolist(), tokenizer.bos_id, block))
            while len(pending) >= cfg.batch_size:
                batch, pending = pending[:cfg.batch_size], pending[cfg.batch_size:]
                t.nll += score(model, batch, device)
                bar.update(sum(len(w) - 1 for w in batch))
        if pending:
            t.nll += score(model, pending, device)
            bar.update(sum(len(w) - 1 for w in pending))
    if reader.skipped:
        print(f"eval: skipped {dict(reader.skipped)}")
    return t


def eval_shards(model, tokenizer: Tokenizer, cfg: EvalConfig, device: torch.device) -> Totals:
    from ..data.loader import TokenBlocks, text_sizes
    from ..data.shards import check_manifest, load_manifest, verify_shards

    manifest = load_manifest(cfg.shards)
    if tokenizer.fingerprint is None:
        raise UserError("--shards needs a SentencePiece tokenizer (tokenizer.model) to check the shards against")
    check_manifest(manifest, tokenizer.fingerprint, manifest["block_size"], where=cfg.shards)
    # A damaged shard would be scored as text it is not, and an id >= the vocabulary would crash the model.
    verify_shards(cfg.shards, manifest, tokenizer.size, checksums=True)
    if cfg.split not in manifest["splits"] or not manifest["splits"][cfg.split]["sequences"]:
        raise UserError(f"{cfg.shards} has no {cfg.split} split; it has {sorted(manifest['splits'])} (--split)")
    blocks = TokenBlocks(cfg.shards, manifest, cfg.split)
    n = len(blocks) if not cfg.max_documents else min(len(blocks), cfg.max_documents)
    t = Totals(documents=n)
    import numpy as np

    sizes = text_sizes(cfg.shards, manifest, cfg.split)  # format /2: the text of each block, for bits per character
    if sizes is not None:
        t.chars, t.bytes = int(sizes[0][:n].sum()), int(sizes[1][:n].sum())

    with Progress("eval", total=n, unit="blocks") as bar:
        for start in range(0, n, cfg.batch_size):
            rows = blocks.take(np.arange(start, min(start + cfg.batch_size, n))).astype(np.int64)
            t.nll += score(model, [list(r) for r in rows], device)
            t.tokens += rows.shape[0] * (rows.shape[1] - 1)
            bar.update(rows.shape[0])
    return t


# --------------------------------------------------------------------------------------------------
# Generation.


@torch.no_grad()
def generate(model, tokenizer: Tokenizer, cfg: EvalConfig, device: torch.device, template=None) -> list[dict]:
    """Continuations of ``cfg.prompts``: raw (BOS + the prompt, exactly max_new_tokens sampled, the speed
    figure), or, with a chat template, answers to each prompt as a single-turn instruction (the ids training
    saw before an answer, ``sft.encode.encode_prompt``), ending at EOS."""
    torch.manual_seed(cfg.seed)
    out = []
    for prompt in cfg.prompts:
        if template is not None:
            out.append(_answer(model, tokenizer, cfg, device, template, prompt))
            continue
        ids = tokenizer.encode([prompt])[0]
        if tokenizer.bos_id >= 0:
            ids = [tokenizer.bos_id] + ids
        x = torch.tensor([ids], device=device)
        sampling = dict(do_sample=True, temperature=cfg.temperature, top_p=cfg.top_p) if cfg.temperature > 0 else \
            dict(do_sample=False)
        t0 = time.perf_counter()
        y = model.generate(input_ids=x, attention_mask=torch.ones_like(x), max_new_tokens=cfg.max_new_tokens,
                           min_new_tokens=cfg.max_new_tokens, use_cache=True, pad_token_id=0, **sampling)
        seconds = time.perf_counter() - t0
        new = y[0, len(ids):].tolist()
        out.append({"prompt": prompt, "continuation": tokenizer.decode(new), "new_tokens": len(new),
                    "seconds": seconds, "tokens_per_second": len(new) / seconds})
    return out


def _answer(model, tokenizer: Tokenizer, cfg: EvalConfig, device: torch.device, template, prompt: str) -> dict:
    from ..chat import Sampling, generate_ids, user_turn
    from ..sft.encode import encode_prompt

    ids = encode_prompt(user_turn(prompt), template, tokenizer.sp)
    room = cfg.max_new_tokens
    max_pos = getattr(model.config, "max_position_embeddings", None)
    if max_pos:
        room = min(room, max_pos - len(ids))
        if room < 1:
            raise UserError(f"--prompts {prompt[:40]!r}: the prompt is {len(ids):,} tokens through template "
                            f"{template.name}, the model's context {max_pos:,}")
    t0 = time.perf_counter()
    new, stop = generate_ids(model, ids, tokenizer.sp.eos_id(), Sampling(room, cfg.temperature, cfg.top_p), device)
    seconds = time.perf_counter() - t0
    return {"prompt": prompt, "continuation": tokenizer.decode(new), "new_tokens": len(new), "stop": stop,
            "template": template.name, "prompt_tokens": len(ids), "seconds": seconds,
            "tokens_per_second": len(new) / seconds}


def templates_for(cfg: EvalConfig):
    """(template for --generate or None, template for --instructions or None), chosen before the model loads."""
    from ..chat import pick_template

    gen = pick_template(cfg.template, cfg.model, cfg.adapter, cfg.tokenizer, required=False) if cfg.generate else None
    inst = (pick_template(cfg.template, cfg.model, cfg.adapter, cfg.tokenizer, required=True)
            if cfg.instructions else None)
    return gen, inst


# --------------------------------------------------------------------------------------------------


def evaluate(cfg: EvalConfig) -> dict:
    if cfg.text or cfg.shard_sets:
        from .table import evaluate_table

        check_outputs(cfg)
        return evaluate_table(cfg)
    check_outputs(cfg)
    gen_template, inst_template = templates_for(cfg)  # a missing template is refused before the model loads
    model, tokenizer, what, device = load(cfg)
    if (gen_template or inst_template) and tokenizer.sp is None:
        raise UserError(f"a chat template needs a SentencePiece tokenizer (tokenizer.model) in {tokenizer.path}: "
                        "prompts are encoded as training encoded them; pass --tokenizer")
    result = {"model": what, "tokenizer": str(tokenizer.path), "vocab_size": tokenizer.size, "device": str(device)}
    if cfg.inputs or cfg.shards:
        max_pos = getattr(model.config, "max_position_embeddings", cfg.block_size) or cfg.block_size
        block = min(cfg.block_size, max_pos)
        t0 = time.time()
        totals = eval_text(model, tokenizer, cfg, block, device) if cfg.inputs else eval_shards(model, tokenizer, cfg, device)
        result.update({"data": cfg.shards or cfg.inputs, "block_size": block, **totals.figures(tokenizer.size),
                       "seconds": round(time.time() - t0, 2)})
    if cfg.generate:
        result["generations"] = generate(model, tokenizer, cfg, device, gen_template)
    if cfg.instructions:
        from .instructions import evaluate_instructions

        result["instructions"] = evaluate_instructions(cfg, model, tokenizer, device, template=inst_template)
    if cfg.choices:
        from .choices import evaluate_choices

        result["choices"] = evaluate_choices(cfg, model, tokenizer, device)
    result["config"] = to_dict(cfg)
    if cfg.json_out:
        write_atomic(cfg.json_out, json.dumps(result, indent=2, ensure_ascii=False) + "\n")
    return result


def check_outputs(cfg: EvalConfig) -> None:
    """Before any work: the JSON output is a file path that touches no input."""
    if cfg.json_out:
        check_file_output(cfg.json_out, "eval JSON")
        check_not_input(cfg.json_out, {"model": cfg.model, "adapter": cfg.adapter, "tokenizer": cfg.tokenizer,
                                       "corpus": cfg.inputs, "shards": cfg.shards, "instructions": cfg.instructions,
                                       "multiple-choice files": list(cfg.choices) + list(cfg.choices_dev),
                                       "named inputs": [p for i in list(cfg.text) + list(cfg.shard_sets)
                                                        for p in i.partition("=")[2].split(",")],
                                       "compared models": [p for i in cfg.compare
                                                           for p in i.partition("=")[2].split("+")]},
                        "eval JSON")


def format_result(r: dict) -> str:
    if "table" in r:
        from .table import format_table

        return "\n".join(format_table(r))
    lines = [f"model      {r['model']}", f"tokenizer  {r['tokenizer']} ({r['vocab_size']:,} pieces)"]
    if "loss" in r:
        unit = "blocks" if isinstance(r.get("data"), str) else "documents"  # a shards folder, or text inputs
        lines += [(f"data       {r['documents']:,} {unit}, {r['tokens']:,} tokens "
                   f"predicted, window {r['block_size']}"),
                  f"loss       {r['loss']:.4f} nats/token, perplexity {r['perplexity']:.2f}"]
    if r.get("bits_per_char") is not None:
        lines.append(f"bits/char  {r['bits_per_char']:.4f}   bits/byte {r['bits_per_byte']:.4f}   "
                     f"tokens/char {r['tokens_per_char']:.3f}   ({r['characters']:,} characters)")
        if r.get("uniform_bits_per_char"):
            lines.append(f"baseline   {r['uniform_bits_per_char']:.4f} bits/char for a uniform guess (log2 "
                         f"{r['vocab_size']:,} x {r['tokens_per_char']:.3f} tokens/char): the model saves "
                         f"{100 * (1 - r['bits_per_char'] / r['uniform_bits_per_char']):.1f}% of it")
    for g in r.get("generations", []):
        how = f", template {g['template']}, stop: {g['stop']}" if g.get("template") else ""
        lines.append(f"generate   {g['prompt']}|{g['continuation']}  ({g['new_tokens']} tokens, "
                     f"{g['tokens_per_second']:.1f} tokens/s{how})")
    if "instructions" in r:
        from .instructions import format_instructions

        lines += format_instructions(r["instructions"])
    if "choices" in r:
        from .choices import format_choices

        lines += format_choices(r["choices"])
    return "\n".join(lines)
