"""The Stage I contrastive losses of paper §3.2, eqs. 5-8, on global representations.

Notation of the paper: o (objects), a (attribute descriptions), c (category names) of the batch
B; A_hn / C_hn the hard-negative descriptions / categories of each object (K per object).
Similarities are cosines divided by a temperature. The paper's sums over B are means here.
Same-class entries of the batch other than the positive are left out of the denominators
when `mask_same_class` is on (the paper does not say; with several images of a class in a
batch they would be false negatives).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

TEMPERATURE_MIN, TEMPERATURE_MAX = 0.001, 0.5


@dataclass(frozen=True)
class LossForm:
    """How the Stage I losses are computed. `mask_same_class`: see above. `ccc`: the form of eq. 7
    (see category_category). `negatives_scope`: "own", each sample against its own K negatives as in
    the paper; "batch", against all B*K negatives of the batch, as the authors' release does (its
    collator concatenates the negatives of a micro-batch). `contrastive_batch`: see `contrastive_set`."""

    mask_same_class: bool = True
    ccc: str = "bounded"
    negatives_scope: str = "own"
    contrastive_batch: str = "global"

    def __post_init__(self):
        known = (
            self.ccc in ("bounded", "logsumexp", "release")
            and self.negatives_scope in ("own", "batch")
            and self.contrastive_batch in ("global", "device")
        )
        if not known:
            raise ValueError(f"unknown loss form {self}")


@dataclass(frozen=True)
class StepTemperatures:
    """The temperatures of one step: for the object-attribute terms (also eq. 7 and every
    object-category term) and for the attribute-category terms."""

    object_attribute: torch.Tensor
    attribute_category: torch.Tensor


class Temperatures(torch.nn.Module):
    """The temperatures, clamped to [0.001, 0.5] as in the authors' code, starting at `value`
    (align.temperature). `two`: separate ones for oa and ac (the release's ia_temp / ac_temp), else
    one for both. `learn`: parameters, else fixed buffers (the release's PEFT model leaves its
    temperatures frozen)."""

    def __init__(self, value: float, two: bool, learn: bool):
        super().__init__()
        self.two = two
        for name in ("oa", "ac") if two else ("oa",):
            tensor = torch.tensor(float(value))
            if learn:
                self.register_parameter(name, torch.nn.Parameter(tensor))
            else:
                self.register_buffer(name, tensor)

    def forward(self) -> StepTemperatures:
        oa = self.oa.clamp(TEMPERATURE_MIN, TEMPERATURE_MAX)
        return StepTemperatures(oa, self.ac.clamp(TEMPERATURE_MIN, TEMPERATURE_MAX) if self.two else oa)


def similarity(x: torch.Tensor, y: torch.Tensor, tau: torch.Tensor) -> torch.Tensor:
    """Cosine similarity of every row of x with every row of y, over the temperature."""
    return F.normalize(x, dim=-1) @ F.normalize(y, dim=-1).T / tau


def _nll(positive: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
    """-log exp(positive) / sum(exp(logits)), averaged; masked logits are -inf."""
    return (torch.logsumexp(logits, dim=1) - positive).mean()


def _with_hn(batch_logits: torch.Tensor, hn_logits: torch.Tensor | None) -> torch.Tensor:
    return batch_logits if hn_logits is None else torch.cat([batch_logits, hn_logits], dim=1)


def same_class_mask(labels: torch.Tensor) -> torch.Tensor:
    """True where row and column share a class but are different entries."""
    same = labels[:, None] == labels[None, :]
    return same & ~torch.eye(len(labels), dtype=torch.bool, device=labels.device)


@dataclass
class Batch:
    """Global representations of one step. hn tensors are (B, K, d), or None without negatives."""

    o: torch.Tensor
    a: torch.Tensor
    c: torch.Tensor
    labels: torch.Tensor
    a_hn: torch.Tensor | None = None
    c_hn: torch.Tensor | None = None


def _pairwise(
    x: torch.Tensor, y: torch.Tensor, labels: torch.Tensor, tau: torch.Tensor, mask_same_class: bool
) -> torch.Tensor:
    logits = similarity(x, y, tau)
    if mask_same_class:
        logits = logits.masked_fill(same_class_mask(labels), float("-inf"))
    return logits


def _hn(x: torch.Tensor, hn: torch.Tensor | None, tau: torch.Tensor, scope: str) -> torch.Tensor | None:
    """Each x_i against its own K negatives, (B, K), or against all B*K of the batch, (B, B*K)."""
    if hn is None:
        return None
    if scope == "batch":
        return similarity(x, hn.flatten(0, 1), tau)
    return torch.einsum("bd,bkd->bk", F.normalize(x, dim=-1), F.normalize(hn, dim=-1)) / tau


def category_category(c: torch.Tensor, c_hn: torch.Tensor, tau: torch.Tensor, form: LossForm) -> torch.Tensor:
    """Eq. 7 in the form `form.ccc`. `logsumexp`, as written: log sum_k exp Sim(c_i, c_k) over the
    negative categories, unbounded below (it rewards pushing names ever further apart). `bounded`:
    the same negatives against the name itself as the positive, -log exp Sim(c_i, c_i) /
    (exp Sim(c_i, c_i) + sum_k exp Sim(c_i, c_k)), which is 0 at best. `release`, what the authors'
    code computes: every name c_i against [c_1..c_B; all B*K negatives of the batch] with column 0
    as the target of every row, so rows i > 0 are pulled towards c_1 (whatever the scope)."""
    if form.ccc == "release":
        logits = similarity(c, torch.cat([c, c_hn.flatten(0, 1)]), tau)
        return _nll(logits[:, 0], logits)
    hn = _hn(c, c_hn, tau, form.negatives_scope)
    if form.ccc == "logsumexp":
        return torch.logsumexp(hn, dim=1).mean()
    itself = torch.ones_like(hn[:, :1]) / tau  # cosine of a name with itself
    return _nll(itself[:, 0], torch.cat([itself, hn], dim=1))


def contrastive_terms(b: Batch, taus: StepTemperatures, form: LossForm) -> dict[str, torch.Tensor]:
    """The terms of eqs. 5-7: OA (with negatives), AO, AC (with negatives), CA (with negatives), CCC."""
    oa = _pairwise(b.o, b.a, b.labels, taus.object_attribute, form.mask_same_class)  # oa[i, j] = Sim(o_i, a_j)
    ac = _pairwise(b.a, b.c, b.labels, taus.attribute_category, form.mask_same_class)  # ac[i, j] = Sim(a_i, c_j)
    positive_oa, positive_ac, scope = oa.diagonal(), ac.diagonal(), form.negatives_scope
    terms = {
        "oa": _nll(positive_oa, _with_hn(oa, _hn(b.o, b.a_hn, taus.object_attribute, scope))),  # eq. 5a
        "ao": _nll(positive_oa, oa.T),  # eq. 5b: sum over objects o_k for each a_i
        "ac": _nll(positive_ac, _with_hn(ac, _hn(b.a, b.c_hn, taus.attribute_category, scope))),  # eq. 6a
        # eq. 6b: Sim(a_j, c_i), Sim(a_w, c_i)
        "ca": _nll(positive_ac, _with_hn(ac.T, _hn(b.c, b.a_hn, taus.attribute_category, scope))),
    }
    if b.c_hn is not None:  # eq. 7: -log 1 / sum_k exp Sim(c_i, c_k), c_k in C_hn^i
        terms["ccc"] = category_category(b.c, b.c_hn, taus.object_attribute, form)
    return terms


def object_category_terms(b: Batch, taus: StepTemperatures, form: LossForm) -> dict[str, torch.Tensor]:
    """Objects against categories directly, no attributes (Table 3b "CL (obj.-cat.)"); all at taus.object_attribute."""
    oc = _pairwise(b.o, b.c, b.labels, taus.object_attribute, form.mask_same_class)
    positive = oc.diagonal()
    terms = {
        "oc": _nll(positive, _with_hn(oc, _hn(b.o, b.c_hn, taus.object_attribute, form.negatives_scope))),
        "co": _nll(positive, oc.T),
    }
    if b.c_hn is not None:
        terms["ccc"] = category_category(b.c, b.c_hn, taus.object_attribute, form)
    return terms


def stage1_total(terms: dict[str, torch.Tensor], generation: torch.Tensor | None) -> torch.Tensor:
    """Eq. 8: L_G^att + (L_OAC + L_ACC + L_CCC) / 2; for obj-cat (L_OCC + L_CCC) / 2."""
    contrastive = 0.0
    if "oa" in terms:
        contrastive = (terms["oa"] + terms["ao"]) / 2 + (terms["ac"] + terms["ca"]) / 2
    elif "oc" in terms:
        contrastive = (terms["oc"] + terms["co"]) / 2
    total = (contrastive + terms.get("ccc", 0.0)) / 2
    return total if generation is None else generation + total


def contrastive_set(b: Batch, form: LossForm) -> Batch:
    """The batch the contrastive terms see: `global`, every process's micro-batch (`gather`);
    `device`, this process's alone, as the release (no gathering; one process: the same)."""
    return gather(b) if form.contrastive_batch == "global" else b


def gather(b: Batch) -> Batch:
    """The batch of every process, with gradients (as open_clip's ClipLoss with gather_with_grad),
    so the denominators hold the negatives of all devices. Identity in a single process."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return b
    from torch.distributed.nn.functional import all_gather

    def cat(x: torch.Tensor | None) -> torch.Tensor | None:
        return None if x is None else torch.cat(all_gather(x.contiguous()), dim=0)

    return Batch(cat(b.o), cat(b.a), cat(b.c), cat(b.labels), cat(b.a_hn), cat(b.c_hn))
