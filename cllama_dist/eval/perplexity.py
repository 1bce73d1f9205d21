"""Loss, perplexity and bits per character of a model on text (each document scored once) or on shards.

    from cllama_dist.eval.perplexity import eval_text    (what `cllama eval --inputs` / `--shards` run)

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

import math
from dataclasses import dataclass

import torch

from ..errors import UserError
from ..inference.load import Tokenizer
from ..model.scoring import causal_nll
from ..progress import Progress

LN2 = math.log(2)


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


def eval_text(model, tokenizer: Tokenizer, cfg, block: int, device: torch.device) -> Totals:
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


def eval_shards(model, tokenizer: Tokenizer, cfg, device: torch.device) -> Totals:
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
