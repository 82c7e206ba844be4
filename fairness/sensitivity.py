"""Accumulated prediction sensitivity (Krishna et al., ACL 2022) and the counterfactual gap.

Reference: S. Krishna, R. Gupta, A. Verma, J. Dhamala, Y. Pruksachatkun, K.-W. Chang,
"Measuring Fairness of Text Classifiers via Prediction Sensitivity", ACL 2022 (arXiv:2203.08670).
A prediction is unfair to the degree that it changes when the input features that encode
membership of a protected group change. The features are the token embeddings; which of them
encode the group is read off a protected-status model (PSM) g by its gradient.

What this module computes, for one text with non-special tokens t = 1..T:

- x in R^{T x H}: the task classifier's (TC's) word embeddings of the tokens, the input features.
  The PSM is fed the *same* x (`inputs_embeds`), so both gradients live in one feature space;
  that is why the PSM must share the TC's tokenizer and embedding width (checked).
- f(x) in R^K: the TC's class probabilities; g(x): the PSM's, with predicted class c_g.
- feature weights w(x) = |d g_{c_g} / d x| / sum_{t,h} |d g_{c_g} / d x_{t,h}|
  (element-wise absolute gradient, L1-normalised: w >= 0 and sums to 1 over the T x H features).
- class weights v(x) in R^K: `"probs"` (default) v = f(x), the TC's own probabilities (only its
  `max_classes` most probable classes are summed, exact when K <= max_classes);
  `"predicted"` v = one-hot of argmax f(x); `"uniform"` v = 1/K.
  For a two-class softmax TC |d f_1/dx| = |d f_2/dx|, so all three give the same value.
- prediction sensitivity PS(x) = v^T |J_f(x)| w(x)
                               = sum_k v_k sum_{t,h} |d f_k / d x_{t,h}| w_{t,h},
  the paper's v^T |J| w with J the Jacobian of the TC's probabilities in the input features.
- accumulated prediction sensitivity over a dataset D: APS(D) = (1/|D|) sum_{x in D} PS(x), and
  per protected group G (e.g. gender = female) the same mean over D_G (`accumulated`).

The general form v^T |J| w leaves v, the normalisation of w and the feature set open; the choices
above are this module's: v = f(x) by default, w L1-normalised per example, special tokens
([CLS], [SEP]) and padding excluded (they are the same for every input), and APS a mean (the
dataset sum is |D| x APS).
Gradients are batched: examples in a batch do not interact (attention masks), so one backward
pass of sum_b f_{k_b}(x_b) gives every example's d f_{k_b}(x_b) / d x_b at once.

The counterfactual fairness metric it is compared with (`counterfactual_gap`): swap the gendered
words (or the EEC person) and measure |f_c(x) - f_c(x')| for the class c predicted on x, and how
often the predicted class flips.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
import torch
from scipy.stats import spearmanr
from torch import nn

from fedtrust.errors import FairnessError

ClassWeights = Literal["probs", "predicted", "uniform"]
REFERENCE = (
    "Krishna et al., Measuring Fairness of Text Classifiers via Prediction Sensitivity, ACL 2022"
)
FORMULA = (
    "PS(x) = sum_k v_k sum_{t,h} |df_k/dx_{t,h}| w_{t,h}, w = |dg_c/dx| / sum |dg_c/dx|; "
    "x = TC token embeddings (special tokens, padding excluded), f = TC probabilities, "
    "g = PSM probabilities (c = PSM's predicted class), v = TC probabilities; "
    "APS = mean of PS over the dataset or a group"
)


class SensitivityError(FairnessError):
    """Bad input to a fairness metric: incompatible models, empty groups, unequal lengths."""


def check_compatible(
    tc_model: nn.Module,
    psm_model: nn.Module,
    tc_tokenizer: Any,
    psm_tokenizer: Any | None = None,
    tc_name: str = "task classifier",
    psm_name: str = "protected-status model",
) -> None:
    """Raise SensitivityError unless the PSM reads the TC's tokens in the TC's embedding space."""
    tc_emb, psm_emb = tc_model.get_input_embeddings(), psm_model.get_input_embeddings()
    if tc_emb.num_embeddings != psm_emb.num_embeddings:
        raise SensitivityError(
            f"{psm_name} has a vocabulary of {psm_emb.num_embeddings} tokens but {tc_name} has "
            f"{tc_emb.num_embeddings}: the PSM must use the task classifier's tokenizer"
        )
    if tc_emb.embedding_dim != psm_emb.embedding_dim:
        raise SensitivityError(
            f"{psm_name} embeds tokens in {psm_emb.embedding_dim} dimensions but {tc_name} in "
            f"{tc_emb.embedding_dim}: the PSM must share the task classifier's embedding space"
        )
    if psm_tokenizer is not None and psm_tokenizer is not tc_tokenizer:
        a, b = tc_tokenizer.get_vocab(), psm_tokenizer.get_vocab()
        if a != b:
            diff = sorted(set(a.items()) ^ set(b.items()))[:3]
            raise SensitivityError(
                f"{psm_name} was built for a different tokenizer than {tc_name} "
                f"({len(b)} vs {len(a)} tokens; first differences {diff})"
            )


def _encode(tokenizer: Any, texts: Sequence[str], max_length: int) -> dict[str, torch.Tensor]:
    enc = tokenizer(
        list(texts),
        padding=True,
        truncation=True,
        max_length=max_length,
        return_tensors="pt",
        return_special_tokens_mask=True,
    )
    return dict(enc)


def _forward(model: nn.Module, x: torch.Tensor, enc: dict[str, torch.Tensor]) -> torch.Tensor:
    kwargs = {"inputs_embeds": x, "attention_mask": enc["attention_mask"]}
    if "token_type_ids" in enc:
        kwargs["token_type_ids"] = enc["token_type_ids"]
    return torch.softmax(model(**kwargs).logits.float(), dim=-1)


def sensitivity_from_gradients(
    tc_grads: torch.Tensor,
    class_weights: torch.Tensor,
    psm_grad: torch.Tensor,
    feature_mask: torch.Tensor,
) -> torch.Tensor:
    """PS = sum_r v_r sum_{t,h} |tc_grads_r| w, w = |psm_grad| / sum |psm_grad| over features.

    tc_grads (R, B, T, H): gradients of the R weighted TC outputs; class_weights (R, B): their
    weights v; psm_grad (B, T, H); feature_mask (B, T): 1 for the tokens that are features.
    Returns (B,). An example whose PSM gradient vanishes gets w = 0 and so PS = 0.
    """
    mask = feature_mask[:, :, None].to(psm_grad.dtype)
    w = psm_grad.abs() * mask
    w = w / w.sum(dim=(1, 2), keepdim=True).clamp_min(1e-30)
    per_output = (tc_grads.abs() * w[None]).sum(dim=(2, 3))  # (R, B)
    return (class_weights * per_output).sum(dim=0)


def prediction_sensitivity(
    tc_model: nn.Module,
    psm_model: nn.Module,
    tokenizer: Any,
    texts: Sequence[str],
    batch_size: int = 32,
    class_weights: ClassWeights = "probs",
    max_classes: int = 8,
    max_length: int = 64,
) -> np.ndarray:
    """Per-example prediction sensitivity v^T |J_f| w (see the module docstring), shape (N,)."""
    if class_weights not in ("probs", "predicted", "uniform"):
        raise SensitivityError(
            f"class_weights must be probs, predicted or uniform, not {class_weights!r}"
        )
    if not texts:
        raise SensitivityError("no texts to measure")
    check_compatible(tc_model, psm_model, tokenizer)
    was_training = tc_model.training, psm_model.training
    tc_model.eval()
    psm_model.eval()
    out = []
    try:
        for start in range(0, len(texts), batch_size):
            enc = _encode(tokenizer, texts[start : start + batch_size], max_length)
            out.append(_batch_sensitivity(tc_model, psm_model, enc, class_weights, max_classes))
    finally:
        tc_model.train(was_training[0])
        psm_model.train(was_training[1])
    return np.concatenate(out)


def _batch_sensitivity(
    tc_model: nn.Module,
    psm_model: nn.Module,
    enc: dict[str, torch.Tensor],
    class_weights: ClassWeights,
    max_classes: int,
) -> np.ndarray:
    with torch.no_grad():
        x = tc_model.get_input_embeddings()(enc["input_ids"]).float()
    x.requires_grad_(True)
    feature_mask = enc["attention_mask"] * (1 - enc["special_tokens_mask"])
    rows = torch.arange(x.shape[0])

    g = _forward(psm_model, x, enc)
    (psm_grad,) = torch.autograd.grad(g[rows, g.argmax(-1)].sum(), x)

    f = _forward(tc_model, x, enc)
    num_classes = f.shape[-1]
    if num_classes < 2:
        raise SensitivityError(
            "the task classifier has one output (a regression head), not classes"
        )
    if class_weights == "predicted":
        classes, weights = f.argmax(-1, keepdim=True).T, torch.ones(1, x.shape[0])
    elif class_weights == "uniform":
        classes = torch.arange(num_classes)[:, None].expand(num_classes, x.shape[0])
        weights = torch.full((num_classes, x.shape[0]), 1.0 / num_classes)
    else:
        top = f.detach().topk(min(max_classes, num_classes), dim=-1)
        classes, weights = top.indices.T, top.values.T
    grads = []
    for r in range(classes.shape[0]):
        (grad,) = torch.autograd.grad(
            f[rows, classes[r]].sum(), x, retain_graph=r < classes.shape[0] - 1
        )
        grads.append(grad)
    ps = sensitivity_from_gradients(torch.stack(grads), weights, psm_grad, feature_mask)
    return ps.detach().numpy().astype(np.float64)


def accumulated(
    scores: np.ndarray | Sequence[float],
    groups: Mapping[str, Sequence[str]] | None = None,
    required: Mapping[str, Sequence[str]] | None = None,
) -> dict[str, Any]:
    """Accumulate per-example scores: the mean over the dataset and over each protected group.

    `groups` maps a column (e.g. "gender") to each example's group; "" or None = no group in that
    column (e.g. EEC noun phrases have no race). `required` lists groups that must have examples;
    a required group without any is an error naming it. Returns
    {"overall", "count", "groups": {column: {group: mean}}, "counts", "disparity": {column: max -
    min of its group means}}.
    """
    values = np.asarray(scores, dtype=np.float64)
    if values.ndim != 1 or values.size == 0:
        raise SensitivityError("no scores to accumulate (empty dataset)")
    out: dict[str, Any] = {
        "overall": float(values.mean()),
        "count": int(values.size),
        "groups": {},
        "counts": {},
        "disparity": {},
    }
    required = required or {}
    for column in required:
        if column not in (groups or {}):
            raise SensitivityError(f"group column {column!r} is required but not given")
    for column, labels in (groups or {}).items():
        if len(labels) != values.size:
            raise SensitivityError(
                f"group column {column!r} has {len(labels)} entries for {values.size} scores"
            )
        names = [str(x) for x in dict.fromkeys(labels) if x not in ("", None)]
        for name in required.get(column, []):
            if name not in names:
                raise SensitivityError(
                    f"group {column}={name} is empty: no example of it among {values.size}"
                )
        if not names:
            raise SensitivityError(f"group column {column!r} has no example in any group")
        labels_arr = np.array([str(x) if x is not None else "" for x in labels])
        means, counts = {}, {}
        for name in sorted(names):
            sel = labels_arr == name
            means[name], counts[name] = float(values[sel].mean()), int(sel.sum())
        out["groups"][column], out["counts"][column] = means, counts
        out["disparity"][column] = max(means.values()) - min(means.values())
    return out


@torch.no_grad()
def predict_proba(
    model: nn.Module,
    tokenizer: Any,
    texts: Sequence[str],
    batch_size: int = 64,
    max_length: int = 64,
) -> np.ndarray:
    """Class probabilities (N, K) of a sequence classifier."""
    was_training = model.training
    model.eval()
    out = []
    try:
        for start in range(0, len(texts), batch_size):
            enc = tokenizer(
                list(texts[start : start + batch_size]),
                padding=True,
                truncation=True,
                max_length=max_length,
                return_tensors="pt",
            )
            out.append(torch.softmax(model(**enc).logits.float(), dim=-1).numpy())
    finally:
        model.train(was_training)
    return np.concatenate(out).astype(np.float64)


@dataclass
class CounterfactualGap:
    """Counterfactual fairness: how much the prediction moves when gender is swapped."""

    delta: np.ndarray  # per example |f_c(x) - f_c(x')|, c = class predicted on x
    flipped: np.ndarray  # per example: the predicted class changed
    mean_abs_delta: float
    flip_rate: float

    def summary(self) -> dict[str, float]:
        return {"mean_abs_delta": self.mean_abs_delta, "flip_rate": self.flip_rate}


def counterfactual_gap(
    model: nn.Module,
    tokenizer: Any,
    texts: Sequence[str],
    swapped_texts: Sequence[str],
    batch_size: int = 64,
    max_length: int = 64,
) -> CounterfactualGap:
    """Mean |Δp| of the predicted class and the label flip rate between texts and their swaps."""
    if len(texts) != len(swapped_texts):
        raise SensitivityError(
            f"{len(texts)} texts but {len(swapped_texts)} swapped texts: they must pair up"
        )
    if not texts:
        raise SensitivityError("no texts to measure")
    p = predict_proba(model, tokenizer, texts, batch_size, max_length)
    q = predict_proba(model, tokenizer, swapped_texts, batch_size, max_length)
    pred = p.argmax(-1)
    rows = np.arange(len(pred))
    delta = np.abs(p[rows, pred] - q[rows, pred])
    flipped = q.argmax(-1) != pred
    return CounterfactualGap(delta, flipped, float(delta.mean()), float(flipped.mean()))


def spearman(a: np.ndarray | Sequence[float], b: np.ndarray | Sequence[float]) -> float:
    """Spearman rank correlation (average ranks for ties); nan when either side is constant
    (checked first, so scipy's ConstantInputWarning never fires)."""
    x, y = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    if x.size < 2 or np.ptp(x) == 0 or np.ptp(y) == 0:
        return float("nan")
    return float(spearmanr(x, y).statistic)


def audit(
    name: str,
    tc_model: nn.Module,
    psm_model: nn.Module,
    tokenizer: Any,
    texts: Sequence[str],
    swapped_texts: Sequence[str],
    groups: Mapping[str, Sequence[str]],
    required: Mapping[str, Sequence[str]] | None = None,
    labels: Sequence[int] | None = None,
    batch_size: int = 32,
    class_weights: ClassWeights = "probs",
) -> dict[str, Any]:
    """Both metrics for one classifier: accumulated sensitivity (overall, per group), the
    counterfactual gap (overall, per group), their per-example rank correlation, and accuracy
    when `labels` are given. Per-example values are under "examples" (for the report)."""
    ps = prediction_sensitivity(
        tc_model, psm_model, tokenizer, texts, batch_size, class_weights=class_weights
    )
    gap = counterfactual_gap(tc_model, tokenizer, texts, swapped_texts, batch_size)
    result: dict[str, Any] = {
        "name": name,
        "examples_measured": len(texts),
        "sensitivity": accumulated(ps, groups, required),
        "counterfactual": {
            **gap.summary(),
            "by_group": accumulated(gap.delta, groups, required)["groups"],
        },
        "spearman_sensitivity_vs_delta": spearman(ps, gap.delta),
    }
    if labels is not None:
        pred = predict_proba(tc_model, tokenizer, texts, batch_size).argmax(-1)
        result["accuracy"] = float(np.mean(pred == np.asarray(labels)))
    result["examples"] = [
        {"text": t, "swapped": s, "sensitivity": float(p), "delta": float(d), "flipped": bool(f)}
        | {column: str(values[i]) for column, values in groups.items()}
        for i, (t, s, p, d, f) in enumerate(zip(texts, swapped_texts, ps, gap.delta, gap.flipped))
    ]
    return result
