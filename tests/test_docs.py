"""The documentation's links: every relative link in README.md, docs/*.md and benchmarks/RESULTS.md
resolves to a file or directory inside the repository (and, into a Markdown file, to a heading
that exists), and no document points at material outside the repository (``../shared``)."""

from __future__ import annotations

import glob
import os
import re
from urllib.parse import unquote

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
USER_DOCS = ["README.md", *sorted(os.path.relpath(p, ROOT) for p in glob.glob(os.path.join(ROOT, "docs", "*.md")))]
DOCS = [*USER_DOCS, os.path.join("benchmarks", "RESULTS.md")]

FENCE = re.compile(r"^\s*(```|~~~)")
INLINE_CODE = re.compile(r"(`+)(?:(?!\1).)+?\1")
# [text](target) and ![alt](target); the target may be <...> and may carry a "title"
INLINE_LINK = re.compile(r"!?\[(?:[^\[\]]|\[[^\[\]]*\])*\]\(\s*(<[^>]*>|[^)\s]+)(?:\s+(?:\"[^\"]*\"|'[^']*'))?\s*\)")
REFERENCE_DEF = re.compile(r"^\s{0,3}\[[^\]]+\]:\s*(<[^>]*>|\S+)")
HEADING = re.compile(r"^\s{0,3}(#{1,6})\s+(.*?)\s*#*\s*$")
EXTERNAL = re.compile(r"^[a-zA-Z][a-zA-Z0-9+.-]*:")  # http:, https:, mailto:, ...


def _prose_lines(text: str):
    """(line number, line, line with inline code spans blanked) outside fenced code blocks."""
    fenced = False
    for number, line in enumerate(text.splitlines(), 1):
        if FENCE.match(line):
            fenced = not fenced
            continue
        if not fenced:
            yield number, line, INLINE_CODE.sub(lambda m: " " * len(m.group(0)), line)


def links(text: str) -> list[tuple[int, str]]:
    """Every link target of a Markdown text, with its line number."""
    out = []
    for number, _, line in _prose_lines(text):
        out += [(number, m.group(1)) for m in INLINE_LINK.finditer(line)]
        m = REFERENCE_DEF.match(line)
        if m:
            out.append((number, m.group(1)))
    return [(n, t[1:-1] if t.startswith("<") and t.endswith(">") else t) for n, t in out]


def slug(heading: str) -> str:
    """GitHub's anchor for a heading: the rendered text, lower case, without punctuation other
    than '-' and '_', spaces as '-'."""
    text = re.sub(r"\[([^\]]*)\]\([^)]*\)", r"\1", heading)  # a link shows its text
    text = text.replace("`", "").replace("*", "")
    text = re.sub(r"<[^>]+>", "", text)
    return re.sub(r"[^\w\- ]", "", text.strip().lower()).replace(" ", "-")


def anchors(text: str) -> set[str]:
    seen: dict[str, int] = {}
    out = set()
    for _, line, _ in _prose_lines(text):
        m = HEADING.match(line)
        if not m:
            continue
        base = slug(m.group(2))
        n = seen.get(base, 0)
        seen[base] = n + 1
        out.add(base if n == 0 else f"{base}-{n}")
    return out


def link_problems(doc_path: str, root: str) -> list[str]:
    """What is wrong with the relative links of the Markdown file ``doc_path`` (empty if nothing)."""
    root = os.path.realpath(root)
    with open(doc_path, encoding="utf-8") as f:
        text = f.read()
    name = os.path.relpath(doc_path, root)
    problems = []
    for number, target in links(text):
        if EXTERNAL.match(target):
            continue
        path, _, anchor = unquote(target).partition("#")
        where = f"{name}:{number}: link {target!r}"
        here = os.path.realpath(doc_path)
        resolved = os.path.realpath(os.path.join(os.path.dirname(here), path)) if path else here
        if os.path.commonpath([resolved, root]) != root:
            problems.append(f"{where} leaves the repository ({resolved})")
            continue
        if not os.path.exists(resolved):
            problems.append(f"{where}: no such file or directory ({os.path.relpath(resolved, root)})")
            continue
        if anchor and resolved.endswith(".md") and os.path.isfile(resolved):
            with open(resolved, encoding="utf-8") as f:
                if anchor not in anchors(f.read()):
                    problems.append(f"{where}: no heading with anchor #{anchor} in {os.path.relpath(resolved, root)}")
    return problems


@pytest.mark.parametrize("doc", DOCS)
def test_relative_links_resolve_inside_the_repository(doc):
    assert os.path.isfile(os.path.join(ROOT, doc)), doc
    assert link_problems(os.path.join(ROOT, doc), ROOT) == []


@pytest.mark.parametrize("doc", USER_DOCS)
def test_no_reference_to_material_outside_the_repository(doc):
    with open(os.path.join(ROOT, doc), encoding="utf-8") as f:
        lines = [f"{doc}:{n}: {line.strip()}" for n, line in enumerate(f, 1) if "../shared" in line]
    assert lines == []


def test_the_documents_exist():
    for doc in ("docs/ANGPT.md", "docs/DESIGN.md", "docs/FP8.md"):
        assert os.path.join(*doc.split("/")) in DOCS


def test_the_checker_reports_bad_links(tmp_path):
    """The checks above would pass on a checker that finds nothing: feed it known cases."""
    repo = tmp_path / "repo"
    (repo / "docs").mkdir(parents=True)
    (repo / "docs" / "OTHER.md").write_text("# Title\n\n## The default `nu_att` factor\n\n## Title\n")
    (tmp_path / "outside.md").write_text("exists, but outside the repository")
    (repo / "docs" / "DOC.md").write_text(
        "# Doc\n\n"
        "[ok](OTHER.md) [ok anchor](OTHER.md#the-default-nu_att-factor) [ok dup](OTHER.md#title-1)\n"
        "[ok dir](../docs/) [ok self](#doc) [web](https://example.org/x) [mail](mailto:a@b.c)\n"
        '![ok image](OTHER.md "title")\n'
        "`[in code](missing-in-code.md)`\n"
        "```\n[in a fence](missing-in-fence.md)\n```\n"
        "[missing](MISSING.md)\n"
        "[escapes](../../outside.md)\n"
        "[bad anchor](OTHER.md#nope)\n"
        "[bad self anchor](#nope)\n"
        "![missing image](img/missing.png)\n"
        "[ref]: missing-ref.md\n"
    )
    problems = link_problems(str(repo / "docs" / "DOC.md"), str(repo))
    assert len(problems) == 6, problems
    for line, text in [
        (10, "MISSING.md"),
        (11, "leaves the repository"),
        (12, "#nope"),
        (13, "#nope"),
        (14, "img/missing.png"),
        (15, "missing-ref.md"),
    ]:
        assert any(p.startswith(f"docs/DOC.md:{line}:") and text in p for p in problems), (line, problems)
