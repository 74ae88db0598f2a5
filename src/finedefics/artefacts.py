"""The parquet artefacts passed between stages, each with its columns declared once: checked when
its stage writes it and when a later stage reads it (`finedefics.io.Table`). They live here, below
every stage's code, so that a reader need not import its writer (mining would otherwise depend on
the attribute prompts)."""

import pyarrow as pa

from finedefics.io import Table

# data/prepared/<name>/images.parquet (prepare): one row per usable image
IMAGES = Table(
    {
        "image_id": pa.string(),  # path of the image within its dataset folder; unique per dataset
        "path": pa.string(),  # where the file is, relative to the repository root (or absolute)
        "split": pa.string(),  # train | test
        "label": pa.int64(),  # index into classes.json's classes
        "category": pa.string(),  # the category's name, exactly as the FOCI benchmark spells it
        "super_category": pa.string(),
        "foci_key": pa.string(),  # the image's path in FOCI's images/... form
        "sha1": pa.string(),  # of the file's bytes
        "width": pa.int64(),
        "height": pa.int64(),
        "attributes": pa.string(),  # JSON object of ground-truth attribute values, or "" when the source has none
        "deviation": pa.string(),  # world only: the attribute that deviates from the class profile, or ""
        "scene": pa.string(),  # world only: JSON of pose and background (ground truth of the general description)
    }
)

# data/attributes/<name>/values.parquet (extract): one VQA answer per train image and attribute key
VALUES = Table({"image_id": pa.string(), "key": pa.string(), "value": pa.string()})

# data/descriptions/<name>.parquet (summarize): one attribute description per train image
DESCRIPTIONS = Table({"image_id": pa.string(), "description": pa.string()})

# data/negatives/<name>.parquet (mine): one row per train image
NEGATIVES = Table(  # data/negatives/<name>.parquet, one row per train image
    {
        "image_id": pa.string(),
        "label": pa.int64(),
        "negative_labels": pa.list_(pa.int64()),  # K labels as the param `negatives` says (none for `none`)
        "negative_categories": pa.list_(pa.string()),
        "negative_image_ids": pa.list_(pa.string()),  # per negative, its train image most similar to the anchor
        "negative_descriptions": pa.list_(pa.string()),
        "distractors": pa.list_(pa.int64()),  # the K most CLIP-similar wrong labels (Stage II's options)
        "distractor_categories": pa.list_(pa.string()),
    }
)

# data/instructions/stage1.parquet (build_instructions): one (object, attribute, category) triple per train image
STAGE1 = Table(
    {
        "dataset": pa.string(),
        "image_id": pa.string(),
        "path": pa.string(),
        "super_category": pa.string(),
        "category": pa.string(),
        "description": pa.string(),
        "negative_categories": pa.list_(pa.string()),
        "negative_descriptions": pa.list_(pa.string()),
    }
)

# data/instructions/stage2.parquet (build_instructions): open-set and multiple-choice questions
STAGE2 = Table(
    {
        "dataset": pa.string(),
        "image_id": pa.string(),
        "path": pa.string(),
        "super_category": pa.string(),
        "kind": pa.string(),  # open | closed
        "question": pa.string(),
        "answer": pa.string(),
    }
)

# reports/ledger/experiments.parquet (`finedefics ledger`): one row per finished DVC experiment
LEDGER_EXPERIMENTS = Table(
    {
        "rev": pa.string(),  # the experiment's commit (40 hex digits); the key of outcomes.parquet
        "name": pa.string(),  # the experiment's name in `dvc exp show`
        "commit": pa.string(),  # the commit it ran on (its baseline)
        "timestamp": pa.string(),  # when it finished, as `dvc exp show` gives it
        "machine": pa.string(),  # the machine that collected it (platform), e.g. "x86_64, 2 CPU cores"
        "params": pa.string(),  # JSON object: params.yaml flattened to dotted keys
        "metrics": pa.string(),  # JSON object: each metrics file's path -> its content
    }
)

# reports/ledger/outcomes.parquet (`finedefics ledger`): one row per experiment, model, dataset and test image
LEDGER_OUTCOMES = Table(
    {
        "rev": pa.string(),  # experiments.parquet's rev
        "model": pa.string(),  # predictions folder: finedefics | base | clip/mining | clip/baseline
        "dataset": pa.string(),
        "image": pa.string(),  # the results file's image key, in its first-seen order
        "unseen": pa.bool_(),  # the image's class is one training never showed (`world.unseen`)
        "correct": pa.list_(pa.bool_()),  # per option order, in the results file's order: answered correctly
    }
)
