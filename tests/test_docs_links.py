"""The repository stands on its own: its maths citations and its markdown links resolve.

* Nothing cites the old, external theory file (it is not in the repository); the maths lives in
  docs/theory.md.
* Every ``theory.md#<anchor>`` written anywhere (code comments, docstrings, tests, docs) names a
  heading that docs/theory.md has, by GitHub's anchor rules.
* Every relative link in the markdown files points to a file that exists, and to a heading of it
  when the link carries an anchor.

The checkers are plain functions of a directory, so the tests below also run them on small
trees with planted faults: each check is shown to fail where it must.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.conftest import ROOT

# Spelled in two parts so that this file does not cite the old file itself.
OLD_THEORY = "THEORY" + ".md"
THEORY = Path("docs") / "theory.md"
# A changelog records history and may name the file that docs/theory.md replaced.
HISTORY = frozenset({"CHANGELOG.md"})
SKIPPED_DIRS = frozenset(
    {
        ".git",
        ".venv",
        "venv",
        "node_modules",
        "__pycache__",
        ".mypy_cache",
        ".ruff_cache",
        ".pytest_cache",
        "build",
        "dist",
        ".hypothesis",
    }
)
MAX_TEXT_BYTES = 2_000_000  # larger files are data (models, archives), not prose or code

_CITATION = re.compile(r"theory\.md#([\w-]+)")
_HEADING = re.compile(r"^ {0,3}(#{1,6})[ \t]+(.*?)(?:[ \t]+#+)?[ \t]*$")
_FENCE = re.compile(r"^ {0,3}(`{3,}|~{3,})")
_INLINE_LINK = re.compile(r"!?\[(?:[^\[\]]|\[[^\[\]]*\])*\]\(\s*<?([^)\s>]+)>?(?:\s+[\"'(][^)]*)?\)")
_REFERENCE_LINK = re.compile(r"^ {0,3}\[[^\]]+\]:\s*<?(\S+?)>?(?:\s|$)")
_CODE_SPAN = re.compile(r"(`+)(?:.+?)\1")


def text_files(root: Path) -> Iterator[tuple[Path, str]]:
    """(path relative to ``root``, text) of every text file under ``root`` outside caches and VCS."""
    for path in sorted(root.rglob("*")):
        relative = path.relative_to(root)
        if any(part in SKIPPED_DIRS or part.endswith(".egg-info") for part in relative.parts[:-1]):
            continue
        if not path.is_file() or path.is_symlink() or path.stat().st_size > MAX_TEXT_BYTES:
            continue
        data = path.read_bytes()
        if b"\0" in data[:8192]:
            continue  # binary: checkpoints, archives
        yield relative, data.decode("utf-8", errors="replace")


def prose_lines(markdown: str) -> Iterator[tuple[int, str]]:
    """(line number, line) of a markdown text outside fenced code blocks."""
    fence: str | None = None
    for number, line in enumerate(markdown.splitlines(), start=1):
        match = _FENCE.match(line)
        if match:
            marker = match.group(1)
            if fence is None:
                fence = marker
            elif marker[0] == fence[0] and len(marker) >= len(fence):
                fence = None
            continue
        if fence is None:
            yield number, line


def github_slug(heading: str) -> str:
    """The anchor GitHub gives a heading: rendered text, lower case, punctuation dropped,
    spaces made hyphens (``## GC001 `non-finite``` -> ``gc001-non-finite``)."""
    text = re.sub(r"!?\[([^\]]*)\]\([^)]*\)", r"\1", heading)  # links and images: their text
    text = re.sub(r"<[^>]+>", "", text)  # inline HTML tags
    text = text.replace("`", "").replace("*", "").strip().lower()
    text = re.sub(r"[^\w\- ]", "", text)
    return text.replace(" ", "-")


def anchors(markdown: str) -> set[str]:
    """Every heading anchor of a markdown text, with GitHub's -1, -2 suffixes for repeats."""
    seen: dict[str, int] = {}
    result: set[str] = set()
    for _, line in prose_lines(markdown):
        match = _HEADING.match(line)
        if not match:
            continue
        slug = github_slug(match.group(2))
        count = seen.get(slug, 0)
        seen[slug] = count + 1
        result.add(slug if count == 0 else f"{slug}-{count}")
    return result


def old_theory_citations(root: Path) -> list[str]:
    return [
        f"{path}:{number}"
        for path, text in text_files(root)
        if path.name not in HISTORY
        for number, line in enumerate(text.splitlines(), start=1)
        if OLD_THEORY in line
    ]


def broken_theory_citations(root: Path) -> list[str]:
    """``file:line: #anchor`` for every theory.md#<anchor> citation without a matching heading."""
    theory = root / THEORY
    known = anchors(theory.read_text(encoding="utf-8")) if theory.is_file() else set()
    return [
        f"{path}:{number}: #{anchor}"
        for path, text in text_files(root)
        for number, line in enumerate(text.splitlines(), start=1)
        for anchor in _CITATION.findall(line)
        if anchor not in known
    ]


def markdown_files(root: Path) -> list[Path]:
    """The repository's own markdown: top-level files, docs/, and any folder's README."""
    return sorted(
        path
        for path, _ in text_files(root)
        if path.suffix == ".md" and (len(path.parts) == 1 or path.parts[0] == "docs" or path.name == "README.md")
    )


def link_targets(markdown: str) -> Iterator[tuple[int, str]]:
    """(line number, target) of every inline and reference-style link outside code."""
    for number, line in prose_lines(markdown):
        if line.startswith(("    ", "\t")) and not line.lstrip().startswith(("-", "*", "|")):
            continue  # an indented code block (a deeply indented list continuation is skipped too)
        reference = _REFERENCE_LINK.match(line)
        if reference:
            yield number, reference.group(1)
            continue
        for target in _INLINE_LINK.findall(_CODE_SPAN.sub("", line)):
            yield number, target


def broken_links(root: Path) -> list[str]:
    """``file:line: target (why)`` for every relative markdown link that does not resolve."""
    problems: list[str] = []
    cache: dict[Path, set[str]] = {}
    for relative in markdown_files(root):
        source = root / relative
        for number, target in link_targets(source.read_text(encoding="utf-8")):
            if re.match(r"^[a-z][a-z0-9+.-]*:", target, re.IGNORECASE):
                continue  # http:, https:, mailto: ...: not ours to check offline
            path_part, _, anchor = target.partition("#")
            resolved = (source.parent / path_part).resolve() if path_part else source.resolve()
            where = f"{relative}:{number}: {target}"
            if not resolved.exists():
                problems.append(f"{where} (no such file)")
                continue
            if anchor and resolved.suffix == ".md":
                if resolved not in cache:
                    cache[resolved] = anchors(resolved.read_text(encoding="utf-8"))
                if anchor not in cache[resolved]:
                    problems.append(f"{where} (no such heading)")
    return problems


# --- the repository ---------------------------------------------------------------------------


def test_nothing_cites_the_old_theory_file() -> None:
    assert old_theory_citations(ROOT) == []


def test_theory_citations_name_existing_headings() -> None:
    assert (ROOT / THEORY).is_file()
    assert broken_theory_citations(ROOT) == []


def test_theory_is_cited() -> None:
    # The check above means something only if there are citations: the code and docs (not this
    # file) do cite the theory.
    this = Path(__file__).resolve().relative_to(ROOT)
    cited = {anchor for path, text in text_files(ROOT) if path != this for anchor in _CITATION.findall(text)}
    assert {"saturation", "gradient-through-time", "folding-batchnorm", "lsuv"} <= cited


def test_relative_markdown_links_resolve() -> None:
    assert broken_links(ROOT) == []


# --- the checkers, on planted faults ----------------------------------------------------------


@pytest.mark.parametrize(
    ("heading", "slug"),
    [
        ("GC001 `non-finite`", "gc001-non-finite"),
        (
            "GC103 `activation-variance-collapse` / GC104 `activation-variance-explosion`",
            "gc103-activation-variance-collapse--gc104-activation-variance-explosion",
        ),
        ("`auto`: which activation follows a layer", "auto-which-activation-follows-a-layer"),
        ("LSUV (Mishkin & Matas 2016)", "lsuv-mishkin--matas-2016"),
        ("Floating-point tolerances", "floating-point-tolerances"),
        ("Why a correct fold still differs by ~1e-6 in float32", "why-a-correct-fold-still-differs-by-1e-6-in-float32"),
        ("See [the rules](rules.md)", "see-the-rules"),
    ],
)
def test_github_slugs(heading: str, slug: str) -> None:
    assert github_slug(heading) == slug


def test_anchors_skip_code_and_number_repeats() -> None:
    text = "# Title\n\n## Notes\n\n```\n# not a heading\n```\n\n## Notes\n    ## indented code\n"
    assert anchors(text) == {"title", "notes", "notes-1"}


def _tree(tmp_path: Path, files: dict[str, str]) -> Path:
    for name, text in files.items():
        path = tmp_path / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text, encoding="utf-8")
    return tmp_path


def test_old_citations_are_found_except_in_history(tmp_path: Path) -> None:
    root = _tree(
        tmp_path,
        {
            "pkg/mod.py": f'"""Maths from {OLD_THEORY} section 2."""\n',
            "CHANGELOG.md": f"- citations of {OLD_THEORY} now point to docs/theory.md\n",
            "docs/theory.md": "# Theory\n",
        },
    )
    assert old_theory_citations(root) == ["pkg/mod.py:1"]


# Anchors missing from the planted theory files below, filled in at run time so that this file
# cites no missing heading of the real one.
MISSING, FENCED = "no-such-section", "dead-relus"


def test_missing_anchor_is_reported(tmp_path: Path) -> None:
    root = _tree(
        tmp_path,
        {
            "docs/theory.md": "# Theory\n\n## Saturation\n\n```\n## Dead ReLUs\n```\n",
            "pkg/mod.py": f"# cut-off: docs/theory.md#saturation\n# dead: docs/theory.md#{FENCED}\n",
            "docs/rules.md": f"See [theory](theory.md#saturation) and [it](theory.md#{MISSING}).\n",
        },
    )
    assert sorted(broken_theory_citations(root)) == [f"docs/rules.md:1: #{MISSING}", f"pkg/mod.py:2: #{FENCED}"]


def test_missing_theory_file_breaks_every_citation(tmp_path: Path) -> None:
    root = _tree(tmp_path, {"pkg/mod.py": "# docs/theory.md#saturation\n"})
    assert broken_theory_citations(root) == ["pkg/mod.py:1: #saturation"]


def test_broken_markdown_links_are_reported(tmp_path: Path) -> None:
    root = _tree(
        tmp_path,
        {
            "README.md": (
                "See [ci](docs/ci.md), [gone](docs/gone.md), [rules](docs/rules.md#gc001-non-finite),\n"
                "[bad](docs/rules.md#gc999), [web](https://example.org/x.md), [self](#readme).\n"
                "`[not a link](nowhere.md)`\n\n    [indented code](nowhere.md)\n\n"
                "```\n[fenced](nowhere.md)\n```\n[ref]: docs/missing.md\n\n# README\n"
            ),
            "docs/ci.md": "# CI\n",
            "docs/rules.md": "# Rules\n\n## GC001 `non-finite`\n",
            "samples/README.md": "[up](../docs/ci.md) [broken](../nothing.py)\n",
            "samples/notes.md": "[not checked: not a README](nothing.md)\n",
        },
    )
    assert sorted(broken_links(root)) == sorted(
        [
            "README.md:1: docs/gone.md (no such file)",
            "README.md:2: docs/rules.md#gc999 (no such heading)",
            "README.md:10: docs/missing.md (no such file)",
            "samples/README.md:1: ../nothing.py (no such file)",
        ]
    )
