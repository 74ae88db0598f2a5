"""One training step of each stage, and the object-category alignment metric (Table 8)."""

from __future__ import annotations

from dataclasses import dataclass

import pandas as pd
import torch
import torch.nn.functional as F

from finedefics.align.losses import (
    Batch,
    LossForm,
    Temperatures,
    contrastive_set,
    contrastive_terms,
    object_category_terms,
    stage1_total,
)
from finedefics.models.mllm import MLLM
from finedefics.models.representations import Representations, Visual, last, pixels, text_ids
from finedefics.models.sft import ChatExample, answer_loss, chat_loss, encode
from finedefics.protocol import describe_question


def lm_loss(mllm: MLLM, examples: list[ChatExample]) -> torch.Tensor:
    """The token-mean cross-entropy of the labelled tokens of a batch of chat examples (as the release)."""
    return chat_loss(mllm, examples, per_example=False)


@dataclass
class Stage1:
    """Stage I (eq. 8) over rows of stage1.parquet: `objective` obj-att-cat | obj-cat | none;
    `negative_terms` False drops the hard-negative terms (param `negatives: none`). The other fields are the
    align.* and train.generation_loss switches between our form and the release's."""

    mllm: MLLM  # the model being trained (PEFT-wrapped or not) with its processor
    temperature: Temperatures
    objective: str
    negative_terms: bool
    class_index: dict[str, int]  # category name -> id, for same-class masking
    form: LossForm = LossForm()  # align.mask_same_class, .ccc, .negatives_scope, .contrastive_batch
    text_bos: bool = False  # align.text_bos
    whole_sequence: bool = False  # train.generation_loss sequence: L_G on every token, not the answer alone
    grouped: bool = True  # distinct descriptions, then distinct names, a pass each (False: a pass per kind)

    @property
    def reader(self) -> Representations:
        return Representations(self.mllm.model, self.mllm.tokenizer.eos_token_id)

    def _ids(self, texts: list[str]) -> list[list[int]]:
        return text_ids(self.mllm.tokenizer, texts, self.text_bos)

    def _distinct(self, texts: list[str]) -> torch.Tensor:
        """The representation of each text, each distinct text run through the LLM once (a hard
        negative's description or name recurs within a step)."""
        where = {t: i for i, t in enumerate(dict.fromkeys(texts))}
        reps = self.reader.encode_texts(self._ids(list(where)))
        return reps[torch.tensor([where[t] for t in texts], device=reps.device)]

    def representations(self, rows: pd.DataFrame, visual: Visual) -> Batch:
        """ô, â, ĉ (and the negatives' â, ĉ) of a micro-batch whose images' visual tokens are `visual`."""
        reader, B = self.reader, len(rows)
        device = visual.tokens[0].device
        o = last(*reader.visual_states(visual))
        descriptions = list(rows.description)
        neg_descriptions = [d for ds in rows.negative_descriptions for d in ds] if self.negative_terms else []
        categories = list(rows.category)
        neg_categories = [c for cs in rows.negative_categories for c in cs] if self.negative_terms else []
        K = len(neg_categories) // B if B else 0
        if self.grouped:  # two padded passes, each text once: the 80-token descriptions, then the names
            c_all = self._distinct(categories + neg_categories)
            c, c_hn = c_all[:B], c_all[B:].view(B, K, -1) if K else None
            a_all = self._distinct(descriptions + neg_descriptions) if self.objective == "obj-att-cat" else None
        else:
            encode = lambda texts: reader.encode_texts(self._ids(texts)) if texts else None  # noqa: E731
            a_all = (
                torch.cat([x for x in (encode(descriptions), encode(neg_descriptions)) if x is not None])
                if self.objective == "obj-att-cat"
                else None
            )
            c = encode(categories)
            c_hn = encode(neg_categories).view(B, K, -1) if K else None
        a = a_hn = None
        if self.objective == "obj-att-cat":
            a = a_all[:B]
            a_hn = a_all[B:].view(B, K, -1) if K else None
        labels = torch.tensor([self.class_index[n] for n in categories], device=device)
        return Batch(o, a, c, labels, a_hn, c_hn)

    def generation_loss(self, rows: pd.DataFrame, visual: Visual) -> torch.Tensor:
        """L_G^att: the description as the answer to "Describe this {super_category} in detail.", the
        images' visual tokens (`visual`) shared with the representations."""
        examples = [
            ChatExample(describe_question(r.super_category), r.description, r.path, whole=self.whole_sequence)
            for r in rows.itertuples()
        ]
        batch = self.reader.with_visual(encode(self.mllm, examples), visual)
        return answer_loss(self.mllm.model, batch, per_example=False)

    def loss(self, rows: pd.DataFrame) -> tuple[torch.Tensor, dict[str, float]]:
        taus = self.temperature()
        visual = self.reader.visual(pixels(self.mllm, list(rows.path)))  # the vision tower once per step
        terms: dict[str, torch.Tensor] = {}
        if self.objective != "none":
            batch = contrastive_set(self.representations(rows, visual), self.form)
            if self.objective == "obj-att-cat":
                terms = contrastive_terms(batch, taus, self.form)
            else:
                terms = object_category_terms(batch, taus, self.form)
        generation = self.generation_loss(rows, visual) if self.objective != "obj-cat" else None
        total = stage1_total(terms, generation)
        values = {f"loss_{k}": v.item() for k, v in terms.items()}
        if generation is not None:
            values["loss_generation"] = generation.item()
        values.update({"loss": total.item(), "temperature": taus.object_attribute.item()})
        if taus.attribute_category is not taus.object_attribute:  # align.temperatures: two
            values["temperature_ac"] = taus.attribute_category.item()
        return total, values


@dataclass
class Stage2:
    """Stage II (eq. 9): the generation loss of classification-centred instruction data, on the
    answer or (`whole_sequence`, train.generation_loss sequence) on every token."""

    mllm: MLLM
    whole_sequence: bool = False

    def loss(self, rows: pd.DataFrame) -> tuple[torch.Tensor, dict[str, float]]:
        examples = [ChatExample(r.question, r.answer, r.path, whole=self.whole_sequence) for r in rows.itertuples()]
        loss = lm_loss(self.mllm, examples)
        return loss, {"loss": loss.item(), "loss_classification": loss.item()}


@torch.no_grad()
def alignment(
    mllm: MLLM, images: list[str], categories: list[str], text_bos: bool, batch_size: int = 32
) -> dict[str, float]:
    """Object-category alignment of test images (Table 8), from the global representations:
    `alignment` the mean cosine of each object with its category name (the paper's measure);
    `alignment_margin` that cosine minus the mean cosine with the other category names (immune
    to a common offset of all representations, which the raw cosine rewards);
    `alignment_top1` how often the own name is the most similar one."""
    reader = Representations(mllm.model, mllm.tokenizer.eos_token_id)
    device = next(mllm.model.parameters()).device
    names = sorted(set(categories))
    c = F.normalize(reader.encode_texts(text_ids(mllm.tokenizer, names, text_bos)).float(), dim=-1)
    own = torch.tensor([names.index(n) for n in categories], device=device)
    sims = []
    for start in range(0, len(images), batch_size):
        o = reader.encode_objects(pixels(mllm, images[start : start + batch_size])).float()
        sims.append(F.normalize(o, dim=-1) @ c.T)
    sims = torch.cat(sims)
    positive = sims[torch.arange(len(own)), own]
    others = (sims.sum(1) - positive) / max(1, len(names) - 1)
    return {
        "alignment": float(positive.mean()),
        "alignment_margin": float((positive - others).mean()),
        "alignment_top1": float((sims.argmax(1) == own).float().mean()),
    }
