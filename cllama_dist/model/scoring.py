"""Scoring a causal language model: summed negative log-likelihood per sequence, written once.

Validation during training (trainer/validate.py) and ``cllama eval`` both call ``causal_nll``, so the two
report the same numbers for the same model and tokens: loss = total nll / total predicted tokens.

The NLL comes from the model's loss forward (model/adapters.install_loss_forward: by default the chunked loss,
which never builds the tokens x vocabulary logits); a model without one is scored from its logits, the
log-softmax in fp32 whatever their dtype (bf16 log-sum-exp over ~50K columns loses about two decimal digits).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def _per_token(model, inputs: dict, labels: torch.Tensor) -> torch.Tensor:
    """(B, T-1) NLL of labels[:, 1:] (0 where -100): through the model's loss forward when it has one
    (model/adapters.install_loss_forward: the chunked loss, no full logits), else from its logits."""
    from .adapters import installed_loss

    if installed_loss(model) is not None:
        return model(**inputs, labels=labels, loss_reduction="none").loss
    targets = labels[:, 1:]
    keep = targets != -100
    logits = model(**inputs).logits
    per_token = F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), targets.clamp(min=0).flatten(), reduction="none")
    return per_token.view(targets.shape) * keep.to(per_token.dtype)


def causal_nll(model, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed NLL and count of every token but the first of each row (its predecessors are its context).

    ``model`` is anything called like a Hugging Face causal LM (a DeepSpeed engine included); with an
    ``attention_mask`` (padded rows), padding positions are neither context nor predicted.
    """
    if attention_mask is None:
        nll = _per_token(model, {"input_ids": input_ids}, input_ids)
        return nll.sum(dim=1), torch.full((input_ids.shape[0],), input_ids.shape[1] - 1, dtype=torch.long,
                                           device=input_ids.device)
    labels = input_ids.masked_fill(attention_mask == 0, -100)
    nll = _per_token(model, {"input_ids": input_ids, "attention_mask": attention_mask}, labels)
    return nll.sum(dim=1), attention_mask[:, 1:].long().sum(dim=1)


def masked_nll(model, inputs: dict, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed NLL and count per row of the positions whose label is not -100 (instruction tuning: the
    response tokens), the model called with ``inputs`` (input_ids and, for packed rows, position_ids and a
    document mask). Labels are aligned with input_ids; the shift happens here, as in Hugging Face's loss."""
    nll = _per_token(model, inputs, labels)
    return nll.sum(dim=1), (labels[:, 1:] != -100).long().sum(dim=1)


def summed_nll(model, inputs: dict, labels: torch.Tensor) -> torch.Tensor:
    """The NLL of ``masked_nll`` summed over the whole batch, as one differentiable fp32 scalar: the training
    loss of instruction tuning (through a fused kernel where the model's loss forward uses one)."""
    from .adapters import installed_loss

    if installed_loss(model) is not None:
        return model(**inputs, labels=labels, loss_reduction="sum").loss
    return masked_nll(model, inputs, labels)[0].sum()
