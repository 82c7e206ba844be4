"""Counterfactual role-reversal distillation of a causal LM (Gupta et al., Findings of ACL 2022).

A teacher causal LM is distilled into a smaller GPT-2 student with the loss

    L = kd_weight * T^2 * KL(p_teacher^T || p_student^T) + lm_weight * CE(student, next token)

on next-token distributions at temperature T, and up to two counterfactual role-reversal changes
("Mitigating Gender Bias in Distilled Language Models via Counterfactual Role Reversal"):

* **Counterfactual data augmentation (CDA)**: the training text's gender words are swapped
  (he <-> she, king <-> queen, ... with `WordPairs.swap`). `cda = "two-sided"` trains on the
  original and the swapped corpus together, `"one-sided"` on the swapped corpus only
  (`training_stream`).
* **Teacher prediction perturbation**: for a context x the teacher also reads its counterfactual
  x' (the same tokens, gendered ones replaced by their counterparts) and its two next-token
  distributions are combined with the gendered tokens of the second mapped back to their
  counterparts, q(v) = p(c(v) | x'):

      max      p~(v) ∝ max(p(v | x), q(v))         (the paper's "max", the default)
      mean     p~(v) = (p(v | x) + q(v)) / 2        (average of the two role-reversed worlds)
      geomean  p~(v) ∝ sqrt(p(v | x) q(v))          (mean of log-probabilities)
      swap     p~(v) = q(v)                         (the counterfactual prediction alone)

  computed on the temperature-T distributions and renormalised. After a gender-neutral context
  (x' = x) every pair gets max(p(he), p(she)) or their mean: the teacher no longer prefers one
  gender. Scope `"all"` combines every token (so gender-stereotyped content words such as
  "he works" / "she cooks" are also averaged over the two worlds); `"gendered"` changes only
  tokens with a counterpart and keeps the teacher's other probabilities.
  The paper's full text could not be consulted offline: variants follow its description
  (a max and a mean of the original and role-reversed teacher predictions, renormalised).

The token-level counterpart map (`fedtrust.fairness.wordtokenizer.counterpart_map`) works over any
tokenizer: with the demo's word-level tokenizer every gendered word of the corpus is one token;
with GPT-2's BPE only words that are single tokens in both forms (" he"/" she", ...) are mapped.
Disparity is measured on BOLD gender prompts (`fedtrust.fairness.bold`), utility as held-out
`perplexity`. The experiment (config, teacher and students, report) is
`fedtrust.simulations.distill` (`fedtrust fairness distill`).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from fedtrust.errors import FairnessError

from .wordtokenizer import CounterpartMap

VARIANTS = ("plain", "cda", "perturb", "cda+perturb")
PERTURBATIONS = ("max", "mean", "geomean", "swap")
SCOPES = ("all", "gendered")
CDA_MODES = ("two-sided", "one-sided")


def perturb_log_probs(
    log_p: torch.Tensor,
    log_p_cf: torch.Tensor,
    counterparts: torch.Tensor,
    variant: str = "max",
    scope: str = "all",
) -> torch.Tensor:
    """Teacher prediction perturbation: combine p(.|x) with the role-reversed p(c(.)|x').

    `log_p`, `log_p_cf`: (..., V) log-probabilities on the context and on its counterfactual;
    `counterparts`: (V,) involution of token ids. Returns normalised log-probabilities; see the
    module docstring for the variants and scopes.
    """
    counterparts = counterparts.to(log_p.device)
    mapped = log_p_cf.index_select(-1, counterparts)  # mapped[..., v] = log p(c(v) | x')
    if variant == "max":
        combined = torch.maximum(log_p, mapped)
    elif variant == "mean":
        combined = torch.logaddexp(log_p, mapped) - math.log(2.0)
    elif variant == "geomean":
        combined = (log_p + mapped) / 2
    elif variant == "swap":
        combined = mapped
    else:
        raise FairnessError(f"unknown perturbation {variant!r} (one of {', '.join(PERTURBATIONS)})")
    if scope == "gendered":
        gendered = counterparts != torch.arange(len(counterparts), device=counterparts.device)
        combined = torch.where(gendered, combined, log_p)
    elif scope != "all":
        raise FairnessError(f"unknown perturbation scope {scope!r} (all or gendered)")
    return combined - combined.logsumexp(-1, keepdim=True)


def distillation_loss(
    student_logits: torch.Tensor,
    teacher_log_probs: torch.Tensor,
    labels: torch.Tensor,
    temperature: float,
    kd_weight: float,
    lm_weight: float,
) -> tuple[torch.Tensor, dict[str, float]]:
    """kd_weight * T^2 * KL(teacher^T || student^T) + lm_weight * CE; per predicted token."""
    vocab = student_logits.shape[-1]
    log_q = F.log_softmax(student_logits.reshape(-1, vocab) / temperature, dim=-1)
    kd = F.kl_div(
        log_q, teacher_log_probs.reshape(-1, vocab), log_target=True, reduction="batchmean"
    )
    kd = kd * temperature**2
    lm = F.cross_entropy(student_logits.reshape(-1, vocab), labels.reshape(-1))
    loss = kd_weight * kd + lm_weight * lm
    return loss, {"kd": float(kd.detach()), "lm": float(lm.detach())}


@torch.no_grad()
def teacher_targets(
    teacher: nn.Module,
    inputs: torch.Tensor,
    temperature: float,
    counterparts: CounterpartMap | None = None,
    variant: str = "max",
    scope: str = "all",
) -> torch.Tensor:
    """The teacher's next-token log-probabilities at `temperature`, perturbed if asked."""
    log_p = F.log_softmax(teacher(input_ids=inputs).logits.float() / temperature, dim=-1)
    if counterparts is None:
        return log_p
    swapped = counterparts.swap_ids(inputs)
    log_p_cf = log_p.clone()  # a context without gendered tokens is its own counterfactual
    rows = (swapped != inputs).any(dim=1)
    if rows.any():
        logits_cf = teacher(input_ids=swapped[rows]).logits.float()
        log_p_cf[rows] = F.log_softmax(logits_cf / temperature, dim=-1)
    return perturb_log_probs(log_p, log_p_cf, counterparts.ids, variant, scope)


def training_stream(
    train: torch.Tensor, train_swapped: torch.Tensor, variant: str, cda: str = "two-sided"
) -> torch.Tensor:
    """The token stream a student of `variant` trains on: the original text, or with CDA the
    swapped text alone (one-sided) or after the original (two-sided)."""
    if variant not in VARIANTS:
        raise FairnessError(f"unknown variant {variant!r} (one of {', '.join(VARIANTS)})")
    if "cda" not in variant:
        return train
    if cda == "one-sided":
        return train_swapped
    if cda != "two-sided":
        raise FairnessError(f"unknown CDA mode {cda!r} (one of {', '.join(CDA_MODES)})")
    return torch.cat([train, train_swapped])


def teacher_perturbation(variant: str, counterparts: CounterpartMap) -> CounterpartMap | None:
    """The counterpart map a student of `variant` perturbs its teacher with (None: no
    perturbation)."""
    return counterparts if "perturb" in variant else None


@torch.no_grad()
def perplexity(
    model: nn.Module, stream: torch.Tensor, context: int, batch_size: int = 32, max_tokens: int = 0
) -> float:
    """exp(mean next-token NLL) over consecutive windows of the held-out stream."""
    model.eval()
    if max_tokens:
        stream = stream[: max_tokens + 1]
    starts = list(range(0, len(stream) - 1, context))
    nll, count = 0.0, 0
    for i in range(0, len(starts), batch_size):
        windows = [stream[s : s + context + 1] for s in starts[i : i + batch_size]]
        length = min(len(w) for w in windows)
        batch = torch.stack([w[:length] for w in windows])
        if length < 2:
            continue
        logits = model(input_ids=batch[:, :-1]).logits.float()
        nll += float(
            F.cross_entropy(
                logits.reshape(-1, logits.shape[-1]), batch[:, 1:].reshape(-1), reduction="sum"
            )
        )
        count += batch[:, 1:].numel()
    return math.exp(min(nll / max(count, 1), 50.0))
