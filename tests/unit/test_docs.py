"""The README and docs/ hold together: every relative link reaches a file (and a heading, when it names one),
the README stays a short entry page, and its test command is the one CI runs."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from cllama_dist import PROJECT_ROOT

README = PROJECT_ROOT / "README.md"
PAGES = [README, *sorted((PROJECT_ROOT / "docs").glob("*.md")),
         PROJECT_ROOT / "slurm" / "README.md", PROJECT_ROOT / "deepspeed_configs" / "README.md"]
LINK = re.compile(r"\[[^\]]*\]\(([^)\s]+)\)")
FENCE = re.compile(r"(?ms)^```.*?^```")


def prose(text: str) -> str:
    """The text outside fenced code blocks and inline code, where `[x](y)` is a link."""
    return re.sub(r"`[^`\n]*`", "", FENCE.sub("", text))


def slug(heading: str) -> str:
    """GitHub's anchor for a heading: lower case, punctuation dropped (word characters, spaces and hyphens kept),
    spaces as hyphens."""
    text = re.sub(r"[^\w\- ]", "", heading.strip().lower())
    return text.replace(" ", "-")


def anchors(page: Path) -> set[str]:
    text = FENCE.sub("", page.read_text(encoding="utf-8"))
    found: set[str] = set(re.findall(r'<a id="([^"]+)"></a>', text))
    seen: dict[str, int] = {}
    for heading in re.findall(r"(?m)^#{1,6} +(.+?) *#*$", text):
        base = slug(heading)
        n = seen.get(base, 0)
        seen[base] = n + 1
        found.add(base if n == 0 else f"{base}-{n}")  # GitHub numbers repeated headings
    return found


def relative_links(page: Path) -> list[str]:
    return [t for t in LINK.findall(prose(page.read_text(encoding="utf-8")))
            if not re.match(r"[a-z][a-z0-9+.-]*:", t)]  # http:, https:, mailto: are not checked here


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(PROJECT_ROOT)))
def test_relative_links_resolve(page):
    broken = []
    for target in relative_links(page):
        path, _, anchor = target.partition("#")
        dest = (page.parent / path).resolve() if path else page
        if not dest.exists():
            broken.append(f"{target} (no file {dest})")
        elif anchor and dest.suffix == ".md" and anchor not in anchors(dest):
            broken.append(f"{target} (no heading #{anchor} in {dest.name})")
    assert not broken, f"{page.relative_to(PROJECT_ROOT)}: broken links: {broken}"


def test_the_checker_sees_links_and_headings(tmp_path):
    """The checks above would notice a broken link: a page with one good and one bad link of each kind."""
    (tmp_path / "a.md").write_text("# Top\n\n## Step overhead: a CPU proxy (issue 14)\n<a id=\"h1\"></a>\n",
                                   encoding="utf-8")
    page = tmp_path / "b.md"
    page.write_text("[x](a.md#step-overhead-a-cpu-proxy-issue-14) [y](a.md#h1) [z](missing.md) `[c](code.md)`\n"
                    "```\n[d](in-a-fence.md)\n```\n[w](https://example.org/x)\n", encoding="utf-8")
    assert relative_links(page) == ["a.md#step-overhead-a-cpu-proxy-issue-14", "a.md#h1", "missing.md"]
    assert {"top", "step-overhead-a-cpu-proxy-issue-14", "h1"} <= anchors(tmp_path / "a.md")


def test_every_docs_page_is_on_the_readme_map():
    linked = {Path(t.partition("#")[0]).name for t in relative_links(README) if t.startswith("docs/")}
    pages = {p.name for p in (PROJECT_ROOT / "docs").glob("*.md")}
    assert pages <= linked, f"docs/ pages missing from README.md's map: {sorted(pages - linked)}"


def test_readme_is_short():
    lines = README.read_text(encoding="utf-8").count("\n")
    assert lines <= 200, f"README.md has {lines} lines; each stage's reference belongs in docs/"


def test_readme_test_command_is_what_ci_runs():
    readme = README.read_text(encoding="utf-8")
    ci = (PROJECT_ROOT / ".ci" / "run").read_text(encoding="utf-8")
    assert "bash tests/run.sh\n" in readme
    assert re.search(r"(?m)^bash tests/run\.sh\s*$", ci)
    assert 'python3 -m pip install torch==2.13.0 -e ".[test]" && cllama demo' in readme
