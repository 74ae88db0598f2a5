"""DVC stage `check_params`: validate the whole of params.yaml (exit code 2 on a bad key or value).

It depends on every param, so any `dvc exp run -S key=value` re-runs it first-thing and a
typo fails in seconds, even for a key that no stage has started to read yet.
"""

from finedefics import runner
from finedefics.config import load_or_exit


def main() -> None:
    load_or_exit("params.yaml")
    print("params.yaml ok")


if __name__ == "__main__":
    runner.run(main)
