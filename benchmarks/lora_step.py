"""Stage I step time under LoRA with and without LoRA dropout, and under full fine-tuning.

    python benchmarks/lora_step.py [--batch 32] [--steps 5]

The regime study's candidates (finedefics/reporting/regimes.yaml) adapt the tiny base with LoRA r=16 and no
LoRA dropout, where the paper (and `model.lora.dropout`'s default) has 0.05. PEFT draws a
dropout mask on every adapted linear layer's input, a random number per activation, which on CPU
costs more than the tiny layers themselves. Same world rows, same model (the default bootstrap
sizes, random weights); a step is forward + backward of eq. 8, median of `--steps` after one
warm-up; reports the ratios measured in this run.
"""

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from peft import LoraConfig, get_peft_model
from stage1_step import step_inputs

from finedefics.align.losses import LossForm, Temperatures
from finedefics.align.steps import Stage1
from finedefics.config import TinyMLLMConfig
from finedefics.models.families import family_of
from finedefics.models.mllm import MLLM
from finedefics.models.tiny import TinySizes, build_idefics2


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--steps", type=int, default=5)
    args = parser.parse_args()
    torch.set_num_threads(2)
    with tempfile.TemporaryDirectory() as tmp:
        rows, tok, index = step_inputs(Path(tmp), args.batch)
        m = TinyMLLMConfig()

        def timed(dropout: float | None) -> float:
            """ms per step; `dropout` None: full fine-tuning."""
            torch.manual_seed(0)
            model, processor = build_idefics2(tok, TinySizes.from_config(m, 64))
            if dropout is not None:
                targets = family_of(model).lora_targets(["text_model", "connector"])
                model = get_peft_model(
                    model, LoraConfig(r=16, lora_alpha=32, lora_dropout=dropout, target_modules=targets)
                )
            stage = Stage1(
                MLLM(model.train(), processor),
                Temperatures(0.07, two=False, learn=True),
                "obj-att-cat",
                True,
                index,
                LossForm(),
            )
            times = []
            for step in range(args.steps + 1):  # the first step warms up
                start = time.perf_counter()
                loss, _ = stage.loss(rows)
                loss.backward()
                model.zero_grad(set_to_none=True)
                if step:
                    times.append(time.perf_counter() - start)
            return 1000 * float(np.median(times))

        with_dropout, without, full = timed(0.05), timed(0.0), timed(None)
    print(
        f"Stage I step, batch {args.batch}, K=3, tiny Idefics2 (default sizes), torch threads 2, median of {args.steps}"
    )
    print(f"LoRA r=16, dropout 0.05: {with_dropout:8.1f} ms/step")
    print(f"LoRA r=16, dropout 0:    {without:8.1f} ms/step  ({with_dropout / without:.2f}x faster)")
    print(f"full fine-tuning:        {full:8.1f} ms/step")


if __name__ == "__main__":
    main()
