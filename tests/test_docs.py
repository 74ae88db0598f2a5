"""The README stays short and every link in the documentation resolves.

The README is what a newcomer reads first: at most 200 lines, none over 200 characters, no commit
hashes in its prose (the git log is the history). Every relative link in the README, in `docs/` and
in `benchmarks/README.md` names a file that exists and, when it carries a `#anchor` into a markdown
file, a heading of that file (GitHub's anchors). Each check is also run on a sample that breaks it,
so it can fail.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
DOCS = [README, *sorted((ROOT / "docs").glob("*.md")), ROOT / "benchmarks" / "README.md"]

MAX_LINES = 200
MAX_WIDTH = 200

FENCE = re.compile(r"^\s*(```|~~~)")
LINK = re.compile(r"!?\[(?:[^\[\]]|\[[^\]]*\])*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")
INLINE_CODE = re.compile(r"(`+)(?:(?!\1).)+?\1")
HEADING = re.compile(r"^ {0,3}(#{1,6})\s+(.*?)\s*#*\s*$")
# A commit hash as people paste one: 7 to 40 lowercase hex digits, at least one digit and one letter,
# standing alone (not part of a longer word, a path or a #colour).
HASH = re.compile(r"(?<![\w#/.-])(?=[0-9a-f]*[0-9])(?=[0-9a-f]*[a-f])[0-9a-f]{7,40}(?![\w/-])")


def prose_lines(text: str) -> list[tuple[int, str]]:
    """(line number, line) of the lines outside fenced code blocks."""
    out, fenced = [], False
    for number, line in enumerate(text.splitlines(), 1):
        if FENCE.match(line):
            fenced = not fenced
            continue
        if not fenced:
            out.append((number, line))
    return out


def slug(heading: str) -> str:
    """GitHub's anchor for a heading: the rendered text, lower-cased, punctuation dropped, spaces to hyphens."""
    text = re.sub(r"!?\[([^\]]*)\]\([^)]*\)", r"\1", heading)  # a link's text only
    text = re.sub(r"<[^>]+>", "", text)  # inline HTML tags
    text = text.strip().lower()
    text = re.sub(r"[^\w\- ]", "", text)
    return text.replace(" ", "-")


def anchors(text: str) -> set[str]:
    """Every heading anchor of a markdown text, with GitHub's -1, -2 suffixes for repeated headings."""
    seen: dict[str, int] = {}
    out = set()
    for _, line in prose_lines(text):
        match = HEADING.match(line)
        if not match:
            continue
        base = slug(match.group(2))
        count = seen.get(base, 0)
        seen[base] = count + 1
        out.add(base if count == 0 else f"{base}-{count}")
    return out


def links(text: str) -> list[tuple[int, str]]:
    """(line number, target) of the markdown links outside code."""
    out = []
    for number, line in prose_lines(text):
        for match in LINK.finditer(INLINE_CODE.sub("", line)):
            out.append((number, match.group(1)))
    return out


def broken_links(path: Path, text: str | None = None) -> list[str]:
    """The relative links of a markdown file that name no file, or no heading of the file they name."""
    text = path.read_text() if text is None else text
    problems = []
    for number, target in links(text):
        if re.match(r"^[a-z][a-z0-9+.-]*:", target, re.I):  # http:, https:, mailto:
            continue
        file_part, _, anchor = target.partition("#")
        where = f"{path.relative_to(ROOT)}:{number}: {target}"
        dest = (path.parent / file_part).resolve() if file_part else path
        if not dest.exists():
            problems.append(f"{where}: no such file")
            continue
        if anchor and dest.suffix == ".md":
            dest_text = text if dest == path else dest.read_text()
            if anchor not in anchors(dest_text):
                problems.append(f"{where}: no heading #{anchor} in {dest.relative_to(ROOT)}")
    return problems


def long_lines(text: str) -> list[int]:
    return [number for number, line in enumerate(text.splitlines(), 1) if len(line) > MAX_WIDTH]


def hashes(text: str) -> list[str]:
    """Words of prose that look like commit hashes (fenced code blocks are left out)."""
    return [f"{number}: {word}" for number, line in prose_lines(text) for word in HASH.findall(line)]


def test_readme_is_short() -> None:
    text = README.read_text()
    assert len(text.splitlines()) <= MAX_LINES
    assert long_lines(text) == []


def test_readme_prose_has_no_commit_hashes() -> None:
    assert hashes(README.read_text()) == []


def test_readme_opens_with_the_two_commands() -> None:
    """`.ci/run` runs the second line of the README's first code block."""
    lines = README.read_text().splitlines()
    assert lines[0].startswith("# ") and lines[2] == "```" and lines[5] == "```"
    assert lines[3].endswith("&& dvc repro")
    assert lines[4].endswith("&& pytest") and "ruff check" in lines[4]


@pytest.mark.parametrize("path", DOCS, ids=lambda p: str(p.relative_to(ROOT)))
def test_links_resolve(path: Path) -> None:
    assert path.exists()
    assert broken_links(path) == []


def test_slugs_follow_github() -> None:
    assert slug("Paper, release, ours") == "paper-release-ours"
    assert slug("Tracking with `MLflow`") == "tracking-with-mlflow"
    assert slug("bootstrap: the base models and the paper's diagnosis (paper §2)") == (
        "bootstrap-the-base-models-and-the-papers-diagnosis-paper-2"
    )
    assert slug("A failed `dvc exp run -S key=bad`") == "a-failed-dvc-exp-run--s-keybad"
    assert anchors("# A\n## A\n```\n# B\n```\n") == {"a", "a-1"}


def test_checks_catch_what_they_are_for() -> None:
    """Each check flags a sample written to break it, and leaves alone what merely looks alike."""
    sample = (
        "# Title\n\n"
        "Run [the report](docs/nowhere.md), see [stages](docs/stages.md#no-such-heading) "
        "and [tracking](docs/tracking.md#tracking-with-mlflow) and [here](#title) and [gone](#gone).\n"
        "Before this round: `git show 7a5c18f:README.md`, fixed in c960b61 and in "
        "0123456789abcdef0123456789abcdef01234567.\n"
        "Not hashes: #a1b2c3, 1e-34, bf16, decade, 1234567, models/stage1/a1b2c3d4e5.\n"
        "```\nabc1234 in a code block\n[fine](no/such/file.md)\n```\n" + "x" * (MAX_WIDTH + 1) + "\n"
    )
    problems = broken_links(README, sample)
    assert len(problems) == 3, problems
    assert "no such file" in problems[0] and "#no-such-heading" in problems[1] and "#gone" in problems[2]
    found = hashes(sample)
    assert [word.split(": ")[1] for word in found] == ["7a5c18f", "c960b61", "0123456789abcdef0123456789abcdef01234567"]
    assert long_lines(sample) == [len(sample.splitlines())]
