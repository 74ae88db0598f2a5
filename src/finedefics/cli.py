"""The `finedefics` command."""

from __future__ import annotations

import shutil
from pathlib import Path

import typer

from finedefics.config import ConfigError, load_params

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
    config: Path = typer.Argument(..., help="e.g. configs/paper.yaml"),
    params: Path = typer.Option(Path("params.yaml"), help="the params file DVC reads"),
) -> None:
    """Switch this checkout to another config (validated first), e.g. paper scale."""
    try:
        load_params(config)
    except ConfigError as err:
        _fail(str(err))
    shutil.copyfile(config, params)
    typer.echo(f"{params} now holds {config}; `dvc repro` runs it")


if __name__ == "__main__":
    app()
