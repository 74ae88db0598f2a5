"""DVC stage `analyze`: the paper's representation analyses for the base and the final model.

Per dataset and model: linear probing on object features, last token against token average
(Table 1a), and on features of the model's own category descriptions (Table 1b); alignment
quality (Table 8); inter-class distance and intra-class variance of objects, inter-class
distance of category names, and the modality gap (Table 10). Plots: t-SNE of objects, category
names and both (Figures 2, 4); each model's confusion matrix (Figure 5) and per-class accuracy.
Numbers to metrics/analysis.json, images to plots/analysis/<model>/<dataset>/.
"""

from pathlib import Path

from finedefics import runner
from finedefics.config import load_or_exit

DESCRIBE = "Give a brief description of distinguishing features of {name}"
PER_CLASS = 12  # sampled descriptions per category: half to train the probe, half to test it


PLOTS, METRICS = Path("plots/analysis"), Path("metrics/analysis.json")


def main() -> None:
    params = load_or_exit("params.yaml")
    runner.writes(PLOTS, METRICS)

    from finedefics.models.paths import Role

    # each model's multiple-choice answers (evaluate@base, evaluate@finedefics), before a model loads
    answers = {
        role.value: {name: Path("results/predictions") / role.value / f"{name}.json" for name in params.datasets}
        for role in Role
    }
    runner.reads(*(path for paths in answers.values() for path in paths.values()))

    import torch

    from finedefics.io import atomic_path, write_json
    from finedefics.models.mllm import MLLM, ImageSettings
    from finedefics.models.paths import model_path
    from finedefics.tracking import stage_run

    results: dict = {}
    with stage_run("analyze", params) as run:
        with atomic_path(PLOTS) as plots:
            for role in Role:
                which = role.value
                torch.manual_seed(params.seed)
                mllm = MLLM.load(model_path(params.model, role), ImageSettings.from_config(params.model))
                results[which] = {
                    name: analyze(mllm, which, name, answers[which][name], params, plots / which / name)
                    for name in params.datasets
                }
                run.log_metrics(
                    {
                        f"{which}/{n}/{k}": v
                        for n, ms in results[which].items()
                        for k, v in ms.items()
                        if k != "per_class_accuracy"
                    }
                )
        run.log_artifact(PLOTS)
    write_json(METRICS, results)


def analyze(mllm, which: str, name: str, answers: Path, params, plots: Path) -> dict:
    """One model's representation analyses on one dataset; its plots in `plots`."""
    import numpy as np

    from finedefics.data.prepared import load_prepared
    from finedefics.evaluate import analysis as an
    from finedefics.evaluate import features
    from finedefics.io import read_json

    dataset = load_prepared(name)
    names, train, test = dataset.names, dataset.train, dataset.test
    o_train, o_test = features.objects(mllm, list(train.path)), features.objects(mllm, list(test.path))
    y_train, y_test = train.label.to_numpy(), test.label.to_numpy()
    cats = features.texts(mllm, names, params.align.text_bos)
    descriptions = describe(mllm, names, params.seed)
    d = features.texts(mllm, [t for ts in descriptions for t in ts], params.align.text_bos)
    d_labels = np.repeat(np.arange(len(names)), PER_CLASS)
    d_train = np.tile(np.arange(PER_CLASS) < PER_CLASS // 2, len(names))
    m = {
        "probe_object_last": an.probe_accuracy(o_train.last, y_train, o_test.last, y_test),
        "probe_object_mean": an.probe_accuracy(o_train.mean, y_train, o_test.mean, y_test),
        "probe_description_last": an.probe_accuracy(
            d.last[d_train], d_labels[d_train], d.last[~d_train], d_labels[~d_train]
        ),
        "probe_description_mean": an.probe_accuracy(
            d.mean[d_train], d_labels[d_train], d.mean[~d_train], d_labels[~d_train]
        ),
        "alignment": an.alignment_quality(o_test.last, y_test, cats.last),
        "object_inter_class_distance": an.inter_class_distance(o_test.last, y_test),
        "object_intra_class_variance": an.intra_class_variance(o_test.last, y_test),
        "category_inter_class_distance": an.inter_class_distance(cats.last, np.arange(len(names))),
        "modality_gap": an.modality_gap(o_test.last, cats.last),
    }
    predictions = read_json(answers)["predictions"]
    truth = [p["correct"] for p in predictions]  # FOCI: the ground-truth class name
    matrix = an.confusion(truth, [p["predicted"] for p in predictions], names)
    m["per_class_accuracy"] = {n: float(matrix[i, i] / max(1, matrix[i].sum())) for i, n in enumerate(names)}
    plot(which, name, (o_test.last, y_test), (cats.last, np.arange(len(names))), matrix, names, params.seed, plots)
    print(f"{which} on {name}: " + ", ".join(f"{k} {v:.3f}" for k, v in m.items() if k != "per_class_accuracy"))
    return m


def plot(which: str, name: str, objects, categories, matrix, names: list[str], seed: int, plots: Path) -> None:
    """t-SNE of the test objects, of the category names and of both (Figures 2, 4); the confusion matrix."""
    from finedefics.evaluate import analysis as an

    an.plot_tsne({"objects": objects}, f"{which}: objects ({name})", plots / "tsne_objects.png", seed)
    an.plot_tsne({"categories": categories}, f"{which}: category names ({name})", plots / "tsne_categories.png", seed)
    an.plot_tsne(
        {"objects": objects, "categories": categories},
        f"{which}: objects and categories ({name})",
        plots / "tsne_joint.png",
        seed,
    )
    an.plot_confusion(matrix, names, f"{which}: multiple choice ({name})", plots / "confusion.png")


def describe(mllm, names: list[str], seed: int) -> list[list[str]]:
    """PER_CLASS sampled descriptions per category from the model itself (text only), the
    category's name replaced by "this" so the probe cannot read the label (paper §2)."""
    import torch

    torch.manual_seed(seed)
    tok = mllm.tokenizer
    tok.padding_side = "left"
    prompts = [mllm.prompt(DESCRIBE.format(name=name), image=False) for name in names for _ in range(PER_CLASS)]
    inputs = tok(prompts, return_tensors="pt", padding=True, add_special_tokens=False)
    with torch.no_grad():  # every category's samples in one batch
        ids = mllm.model.generate(**inputs, max_new_tokens=40, do_sample=True, temperature=1.0, top_k=0)
    texts = tok.batch_decode(ids[:, inputs["input_ids"].shape[1] :], skip_special_tokens=True)
    return [
        [t.replace(name, "this").strip() or "this" for t in texts[i * PER_CLASS : (i + 1) * PER_CLASS]]
        for i, name in enumerate(names)
    ]


if __name__ == "__main__":
    runner.run(main)
