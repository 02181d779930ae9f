"""Every relative link of the Markdown documentation (README.md, docs/, benchmarks/, accelerate_configs/) resolves:
the file exists, and a `#anchor` names a heading of the target. External (http, https, mailto) links are not
checked: the tests run offline."""

import re

import pytest

import tiny

ROOT = tiny.REPO_ROOT
# [text](target) or [text](target "title"); images too. Reference-style links are not used here.
LINK = re.compile(r"!?\[(?:[^\[\]]|\[[^\]]*\])*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")
FENCE = re.compile(r"^\s*(```|~~~)")


def documentation_files():
    files = [ROOT / "README.md", *sorted((ROOT / "docs").rglob("*.md"))]
    for folder in ("benchmarks", "accelerate_configs"):
        files += sorted((ROOT / folder).glob("*.md"))
    return files


def prose(text):
    """The text outside fenced code blocks and inline code spans (a link written in code is not a link)."""
    lines, fenced = [], False
    for line in text.splitlines():
        if FENCE.match(line):
            fenced = not fenced
            continue
        if not fenced:
            lines.append(re.sub(r"`[^`\n]*`", lambda m: "x" * len(m.group(0)) if "](" in m.group(0) else m.group(0),
                                line))
    return "\n".join(lines)


def slug(heading):
    """GitHub's anchor for a heading: lowercase, punctuation other than hyphens and underscores dropped, spaces to
    hyphens (markup and link targets reduced to their text first)."""
    text = re.sub(r"\[([^\]]*)\]\([^)]*\)", r"\1", heading.strip())
    text = re.sub(r"[`*]|<[^>]*>", "", text).lower()
    text = re.sub(r"[^\w\- ]", "", text)
    return text.replace(" ", "-")


def anchors(path):
    """Every heading anchor of a Markdown file, with GitHub's -1, -2 ... suffixes for repeated headings, plus any
    explicit <a name=...> / id=... anchors."""
    seen, found = {}, set()
    text = prose(path.read_text("utf-8"))
    for line in text.splitlines():
        match = re.match(r"#{1,6}\s+(.*?)\s*#*\s*$", line)
        if not match:
            continue
        base = slug(match.group(1))
        count = seen.get(base, 0)
        found.add(base if count == 0 else f"{base}-{count}")
        seen[base] = count + 1
    found.update(re.findall(r"<a\s+(?:name|id)=\"([^\"]+)\"", text))
    return found


def relative_links(path):
    for number, line in enumerate(prose(path.read_text("utf-8")).splitlines(), 1):
        for target in LINK.findall(line):
            if re.match(r"[a-z][a-z0-9+.-]*:", target, re.I):  # http:, https:, mailto: ...
                continue
            yield number, target


def broken_links(path):
    problems = []
    for number, target in relative_links(path):
        file_part, _, anchor = target.partition("#")
        resolved = (path.parent / file_part).resolve() if file_part else path
        where = f"{path.relative_to(ROOT)}:{number}: ({target})"
        if not resolved.exists():
            problems.append(f"{where} -> no such file {resolved}")
        elif anchor and resolved.suffix == ".md" and anchor not in anchors(resolved):
            problems.append(f"{where} -> no heading with anchor #{anchor} in {resolved.relative_to(ROOT)}")
    return problems


def test_the_documentation_has_pages_and_links():
    files = documentation_files()
    assert ROOT / "docs" / "README.md" in files
    assert sum(1 for path in files for _ in relative_links(path)) > 20


@pytest.mark.parametrize("path", documentation_files(), ids=lambda p: str(p.relative_to(ROOT)))
def test_every_relative_link_resolves(path):
    assert not broken_links(path), "\n".join(broken_links(path))


def test_every_docs_page_is_linked_from_the_readme_or_the_index():
    linked = set()
    for index in (ROOT / "README.md", ROOT / "docs" / "README.md"):
        for _, target in relative_links(index):
            linked.add((index.parent / target.partition("#")[0]).resolve())
    pages = {p.resolve() for p in (ROOT / "docs").rglob("*.md")} - {(ROOT / "docs" / "README.md").resolve()}
    assert not sorted(str(p.relative_to(ROOT)) for p in pages - linked)


def test_a_broken_link_or_anchor_is_caught(tmp_path, monkeypatch):
    tmp_path = tmp_path.resolve()
    monkeypatch.setitem(globals(), "ROOT", tmp_path)
    (tmp_path / "docs").mkdir()
    (tmp_path / "docs" / "page.md").write_text("# A page\n\n## Some `code`: section (v2)\n\n## Twice\n\n## Twice\n")
    (tmp_path / "README.md").write_text(
        "[ok](docs/page.md) [ok](docs/page.md#some-code-section-v2) [ok](docs/page.md#twice-1) [ok](#top)\n"
        "[web](https://example.com/nowhere) `[code](missing.md)`\n\n# Top\n\n"
        "```\n[in a fence](missing.md)\n```\n"
        "[gone](docs/missing.md) [bad anchor](docs/page.md#no-such-heading) [third](docs/page.md#twice-2)\n")
    problems = broken_links(tmp_path / "README.md")
    assert len(problems) == 3, problems
    assert "no such file" in problems[0] and "docs/missing.md" in problems[0]
    assert "#no-such-heading" in problems[1] and "#twice-2" in problems[2]
