"""Salience metrics of DESIGN §3, each one small function over the option-letter logits."""
from __future__ import annotations

import torch


def option_log_probs(logits: torch.Tensor, letter_ids: list[int] | torch.Tensor) -> torch.Tensor:
    """Log-softmax of the first-generated-position logits restricted to the item's option letters (fp32).

    Every option letter takes part (A.. up to the option count): the authors' A–D restriction meant E+ could
    never be chosen.
    """
    return letter_log_probs(logits[..., letter_ids])


def letter_log_probs(letter_logits: torch.Tensor) -> torch.Tensor:
    """Log-softmax over logits already restricted to the option letters (last dim), in fp32: the one softmax
    every engine uses, also on attribution's first-order estimates of the masked logits."""
    return torch.log_softmax(letter_logits.float(), dim=-1)


def prob_choice(logp: torch.Tensor) -> torch.Tensor:
    """Probability accuracy's prediction: the index of the most likely option letter (per row)."""
    return torch.argmax(logp, dim=-1)


def kl_orig_masked(logp_orig: torch.Tensor, logp_masked: torch.Tensor) -> torch.Tensor:
    """KL(p_orig ‖ p_masked) = Σ p_orig (log p_orig − log p_masked) over the option letters, in nats.

    ≥ 0 always and exactly 0 for identical inputs. (The authors' ``kl_div(softmax(masked), softmax(orig))``
    with mean reduction was not a KL: all their values were negative.)
    """
    p = logp_orig.exp()
    kl = torch.sum(p * (logp_orig - logp_masked), dim=-1)
    return kl.clamp_min(0.0)  # float round-off can dip below zero
