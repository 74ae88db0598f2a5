"""The `finedefics` command."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import typer

from finedefics.config import ConfigError, dump_params, load_params

if TYPE_CHECKING:
    from finedefics.reporting.ledger import Ledger

LEDGER_HELP = "the experiment ledger (default: reports/ledger)"  # pandas and pyarrow load only where a command reads it

app = typer.Typer(help="Finedefics: attribute augmented alignment for fine-grained recognition.", no_args_is_help=True)


def _fail(message: str, code: int = 2) -> None:
    typer.echo(f"error: {message}", err=True)
    raise typer.Exit(code)


@app.command()
def check(params: Path = typer.Argument(Path("params.yaml"), help="params file to validate")) -> None:
    """Validate a params file against the schema."""
    try:
        load_params(params)
    except ConfigError as err:
        _fail(str(err))
    typer.echo(f"{params}: ok")


@app.command("use-config")
def use_config(
    config: Path = typer.Argument(..., help="an overlay, e.g. configs/paper.yaml"),
    params: Path = typer.Option(Path("params.yaml"), help="the params file DVC reads"),
    assignments: list[str] = typer.Option([], "--set", "-S", help="KEY=VALUE over the overlay, e.g. -S train.seed=1"),
) -> None:
    """Switch this checkout to a config: the embedded default with the overlay's values, validated,
    written in full over params.yaml (`git checkout params.yaml` returns to the default)."""
    try:
        merged = load_params(config, assignments)
    except ConfigError as err:
        _fail(str(err))
    command = " ".join(["finedefics use-config", str(config), *(f"--set {a}" for a in assignments)])
    header = (
        f"Written by `{command}`: the embedded default with its values.\n"
        "Edit the overlay and rerun the command rather than this file."
    )
    params.write_text(dump_params(merged, header))
    typer.echo(f"{params} now holds {config} over the embedded default; `dvc repro` runs it")


@app.command()
def score(
    results: list[Path] = typer.Argument(..., help="results files in FOCI's format (FOCI's own, or ours)"),
) -> None:
    """Accuracy, generation-failure rate, number of images and the Wilson 95% CI of FOCI results
    files, recomputed from their predictions; one JSON object per file, keyed by path when several."""
    import dataclasses
    import json

    from finedefics.evaluate.mc import score_results

    out = {}
    for path in results:
        try:
            data = json.loads(path.read_text())
            scored = dataclasses.asdict(score_results(data))
        except (OSError, ValueError, RecursionError) as err:
            _fail(f"{path}: not a FOCI results file ({err.__class__.__name__}: {err})")
        stored = data.get("metrics") if isinstance(data, dict) else None
        if isinstance(stored, dict) and isinstance(stored.get("accuracy"), int | float):
            if abs(stored["accuracy"] - scored["accuracy"]) > 1e-9:
                typer.echo(
                    f"warning: {path}: its metrics block says accuracy {stored['accuracy']}, "
                    f"its predictions give {scored['accuracy']}",
                    err=True,
                )
        out[str(path)] = scored
    typer.echo(json.dumps(out[str(results[0])] if len(results) == 1 else out, indent=2))


@app.command()
def predict(
    images: list[Path] = typer.Argument(..., help="image files"),
    model: Path = typer.Option(..., "--model", help="a model folder (e.g. models/finedefics)"),
    choices: str = typer.Option(None, "--choices", help='comma-separated class names, e.g. "a,b,c,d"'),
    open_set: bool = typer.Option(False, "--open", help="name the category freely"),
    super_category: str = typer.Option(
        "object", "--super-category", help="what the images show, e.g. bird (the FOCI query asks for 'birds')"
    ),
    as_json: bool = typer.Option(False, "--json", help="one JSON object per image"),
) -> None:
    """Predict the class of each image: multiple choice among --choices, or --open."""
    import json

    from finedefics.models.paths import resolve

    if not Path(resolve(model)).joinpath("config.json").is_file():
        _fail(f"{model}: no model folder (expected config.json); run `dvc repro` or pass --model")
    options = [c.strip() for c in choices.split(",") if c.strip()] if choices else []
    if not open_set and len(options) < 2:
        _fail("give at least two --choices, or --open")
    if len(options) > 4:
        _fail("the FOCI format takes at most four choices (A-D)")
    from finedefics.evaluate import mc  # a module: `open_set` is this command's flag
    from finedefics.models.mllm import MLLM

    for path in images:  # before the model loads: a bad path fails in a second
        if mc.open_image(str(path)) is None:
            _fail(f"{path}: cannot read this image")
    mllm = MLLM.load(resolve(model))
    paths = [str(p) for p in images]
    if open_set:
        answers = [
            (r["predicted_raw"], r["predicted_raw"])
            for r in mc.open_set(mllm, super_category, paths, [""] * len(paths))
        ]
    else:
        answers = [
            (None if r["predicted"].startswith(mc.FAILURE) else r["predicted"], r["predicted_raw"])
            for r in mc.evaluate(
                mllm, f"{super_category}s", [mc.Item(p, p, "", options) for p in paths], desc="predict"
            )
        ]
    for path, (predicted, raw) in zip(images, answers):
        if as_json:
            typer.echo(json.dumps({"image": str(path), "predicted": predicted, "predicted_raw": raw}))
        else:
            typer.echo(f"{path}\t{predicted if predicted is not None else '(no choice: ' + repr(raw) + ')'}")


@app.command()
def ledger(
    repo: Path = typer.Option(Path("."), help="the repository whose DVC experiments to collect"),
    folder: Path = typer.Option(None, "--ledger", help=LEDGER_HELP),
) -> None:
    """Append the finished DVC experiments (`dvc exp show`) and their predictions to the experiment ledger."""
    from finedefics.reporting import ledger as ledger_module

    folder = _folder(folder)
    try:
        current = ledger_module.read(folder) if (folder / "experiments.parquet").exists() else ledger_module.empty()
        show = ledger_module.dvc_exp_show(repo)
    except (OSError, ValueError, RuntimeError) as err:  # ArtefactError is a ValueError
        _fail(str(err))
    updated, notes = ledger_module.collect(current, show, ledger_module.dvc_results(repo))
    for note in notes:
        typer.echo(note)
    ledger_module.write(updated, folder)
    added = len(updated.experiments) - len(current.experiments)
    typer.echo(f"{folder}: {len(updated.experiments)} experiment(s), {added} added")


def _folder(folder: Path | None) -> Path:
    """`--ledger`, or the committed ledger's folder."""
    from finedefics.reporting.ledger import FOLDER

    return folder or FOLDER


def _evidence(folder: Path, params: Path) -> tuple[Ledger, dict, list[str]]:
    """The ledger, the committed params (flattened) and the datasets they name."""
    from finedefics.reporting import ledger as ledger_module
    from finedefics.reporting.experiments import committed_params

    try:
        datasets = list(load_params(params).datasets)
    except ConfigError as err:
        _fail(str(err))
    try:
        book = ledger_module.read(folder)
    except (OSError, ValueError) as err:  # ArtefactError and pyarrow's ArrowInvalid are ValueErrors
        _fail(f"{err} (collect experiments with `finedefics ledger`)")
    return book, committed_params(params), datasets


@app.command()
def report(
    out: Path = typer.Option(None, help="where to write it (default: reports/results.md, or reports/regimes.md)"),
    params: Path = typer.Option(Path("params.yaml"), help="the committed params the ablations differ from"),
    folder: Path = typer.Option(None, "--ledger", help=LEDGER_HELP),
    study: bool = typer.Option(
        False, "--regimes", help="the pre-registered regime study (finedefics/reporting/regimes.yaml)"
    ),
) -> None:
    """Fill the paper's tables from the experiment ledger (`finedefics ledger`; see scripts/ablations.sh)."""
    from finedefics.reporting import regimes, results

    folder = _folder(folder)
    book, default, datasets = _evidence(folder, params)
    exps = list(book.experiments)
    scores = book.scores(datasets)
    if study:
        out = out or Path("reports/regimes.md")
        text = regimes.render(exps, default, datasets, scores, book.scores(datasets, unseen=True))
    else:
        out = out or Path("reports/results.md")
        text = results.render(exps, default, datasets, scores)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(text)
    typer.echo(f"{out}: from {len(exps)} experiment(s) in {folder}")


@app.command()
def compare(
    experiments: list[str] = typer.Argument(..., help="names of ledger experiments (one row, any seeds)"),
    against: list[str] = typer.Option(..., "--against", help="the reference's experiments (repeat the option)"),
    params: Path = typer.Option(Path("params.yaml"), help="its datasets name the test sets"),
    folder: Path = typer.Option(None, "--ledger", help=LEDGER_HELP),
) -> None:
    """Seed-level comparison of named experiments in the ledger: a paired t over the seeds both have when
    their switches share seed streams, Welch's t otherwise (one row, no multiplicity correction)."""
    from finedefics.reporting import comparison

    folder = _folder(folder)
    book, default, datasets = _evidence(folder, params)
    by_name = {e.name: e for e in reversed(book.experiments)}  # the newest of a name wins
    missing = [n for n in (*experiments, *against) if n not in by_name]
    if missing:
        _fail(f"not in {folder}: {', '.join(missing)} (run `finedefics ledger` after the experiments finish)")
    row, reference = [by_name[n] for n in experiments], [by_name[n] for n in against]
    for group in (row, reference):
        if len({e.seed(default) for e in group}) < len(group):
            _fail("two experiments of one side share a training seed: give one per seed")
    switched = comparison.switched(row, reference, default)
    scores = book.scores(datasets)
    c = comparison.compare(
        comparison.side(row, "final", scores, default),
        comparison.side(reference, "final", scores, default),
        comparison.shares_streams(switched),
    )
    if c is None:
        _fail("the ledger lacks these experiments' predictions")
    diff, design, mark, mcnemar = comparison.comparison_cells(c, c.test.p, label="p")
    typer.echo(f"switches: {', '.join(switched) or '(none)'}")
    typer.echo(f"difference (points): {diff}\ntest: {design}\nresolved (alpha 0.05, uncorrected): {mark}")
    typer.echo(f"McNemar p per dataset (test images only): {mcnemar}")


@app.command("regimes-queue")
def regimes_queue(
    seeds: int = typer.Option(3, min=1, help="training seeds per experiment"),
    unseen: int = typer.Option(None, help="queue the unseen table's rows under this candidate (its index)"),
) -> None:
    """Print the regime study's `dvc exp run --queue` commands (finedefics/reporting/regimes.yaml)."""
    import shlex

    from finedefics.reporting import regimes as reg

    if unseen is not None and not 0 <= unseen < len(reg.REGIMES):
        _fail(f"--unseen takes a candidate index 0-{len(reg.REGIMES) - 1}, not {unseen}")
    for name, overrides in reg.queue(seeds, unseen):
        sets = [f"-S {shlex.quote(f'{k}={_yaml_value(v)}')}" for k, v in overrides.items()]
        typer.echo(f"dvc exp run --queue --name {name} " + " ".join(sets))


def _yaml_value(value) -> str:
    if isinstance(value, list):
        return "[" + ",".join(map(str, value)) + "]"
    return str(value).lower() if isinstance(value, bool) else str(value)


if __name__ == "__main__":  # `python -m finedefics.cli`; after every command is defined
    app()
