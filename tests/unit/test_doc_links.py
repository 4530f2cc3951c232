"""Every relative link in README.md and docs/*.md resolves: the file exists and an
``#anchor`` names a heading of the target, by GitHub's rules, so moving a section
cannot leave a dead link behind."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
LINK = re.compile(r"!?\[(?:[^\]\[]|\[[^\]]*\])*\]\(([^)\s]+)(?:\s+\"[^\"]*\")?\)")
FENCE = re.compile(r"^\s*(```|~~~)")


def prose(text: str) -> list[str]:
    """The lines outside fenced code blocks, with inline code spans removed."""
    out, fenced = [], False
    for line in text.splitlines():
        if FENCE.match(line):
            fenced = not fenced
        elif not fenced:
            out.append(re.sub(r"`[^`]*`", "``", line))
    return out


def slug(heading: str) -> str:
    """GitHub's anchor for a heading: lowercase, punctuation but - and _ dropped, spaces
    to -.

    >>> slug("Real-time decisions: `POST /decide`")
    'real-time-decisions-post-decide'
    """
    text = re.sub(r"[^\w\- ]", "", heading.strip().lower())
    return text.replace(" ", "-")


def anchors(path: Path) -> set[str]:
    """Every heading's anchor in a Markdown file; a repeated one gets -1, -2, ... as on
    GitHub."""
    seen: dict[str, int] = {}
    out: set[str] = set()
    fenced = False
    for line in path.read_text().splitlines():
        if FENCE.match(line):
            fenced = not fenced
            continue
        m = None if fenced else re.match(r"#{1,6}\s+(.*?)\s*#*\s*$", line)
        if m:
            base = slug(m.group(1))
            n = seen.get(base, 0)
            seen[base] = n + 1
            out.add(base if n == 0 else f"{base}-{n}")
    return out


def links(path: Path) -> list[str]:
    return [m.group(1) for line in prose(path.read_text()) for m in LINK.finditer(line)]


def test_the_readme_stays_a_newcomers_manual_of_at_most_250_lines() -> None:
    assert len((ROOT / "README.md").read_text().splitlines()) <= 250  # depth goes in docs/


def test_the_docs_are_found() -> None:
    names = {p.name for p in DOCS}
    assert {"README.md", "design.md", "operations.md", "performance.md", "security.md",
            "evaluation.md", "configuration.md"} <= names  # fmt: skip


@pytest.mark.parametrize("doc", DOCS, ids=lambda p: str(p.relative_to(ROOT)))
def test_every_relative_link_resolves_to_a_file_and_heading(doc: Path) -> None:
    broken = []
    for target in links(doc):
        if re.match(r"[a-z][a-z0-9+.-]*:", target):  # http:, https:, mailto: ...
            continue
        where, _, anchor = target.partition("#")
        path = (doc.parent / where).resolve() if where else doc
        if not path.exists():
            broken.append(f"{target}: no file {path.relative_to(ROOT)}")
        elif anchor and path.suffix == ".md" and anchor not in anchors(path):
            broken.append(f"{target}: no heading #{anchor} in {path.relative_to(ROOT)}")
    assert broken == [], f"{doc.relative_to(ROOT)}: " + "; ".join(broken)


def test_a_broken_anchor_and_a_missing_file_are_caught(tmp_path: Path) -> None:
    (tmp_path / "a.md").write_text("# Title\n\n## Two words: `code`\n\n```\n# not a heading\n```\n")
    assert anchors(tmp_path / "a.md") == {"title", "two-words-code"}
    (tmp_path / "b.md").write_text("[x](a.md#two-words-code) [y](a.md#gone) `[z](nope.md)`\n")
    assert links(tmp_path / "b.md") == ["a.md#two-words-code", "a.md#gone"]
