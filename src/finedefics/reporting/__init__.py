"""The reporting app: the experiment ledger and the reports read from it, above the library.

It reads the library's outputs (metrics, predictions, the ledger's parquet files) and imports only the
library's lower floors (`finedefics.io`, `finedefics.config`, `finedefics.artefacts`, `finedefics.stats`);
nothing in the library imports it. One job a module, each importing only the ones listed before it:

    ledger       the experiment ledger: records, parquet storage, collection from `dvc exp show`
    paper        the paper's tables and published numbers (tables.yaml)
    inference    seed-level tests: is a difference larger than training noise?
    experiments  which experiments a row reads, and where their metrics are
    markdown     markdown and numbers as printed
    comparison   a row's accuracies over seeds, and its test against a reference
    results      reports/results.md (`finedefics report`)
    regimes      reports/regimes.md, the pre-registered regime study (regimes.yaml; `finedefics report --regimes`)
"""
