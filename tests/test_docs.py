"""The documentation describes the project as it is: short README, pages that exist, no development history."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# Phrases that narrate how the project was built rather than what it is (the history lives in git).
HISTORY = re.compile(
    r"\b(this|that|previous|earlier|next|first|second|third|fourth|fifth|sixth|seventh|eighth|ninth|tenth|eleventh)"
    r"('s)? session\b|\bbefore this change\b|\bused to be\b|\bdevelopment history\b",
    re.IGNORECASE,
)
# The three topic pages the README's documentation index points to.
TOPIC_PAGES = ("docs/performance.md", "docs/results.md", "docs/reliability.md")
# A heading that numbers a round of work: "(third session)", "(tenth)", "(2nd pass)", "Now (...)". An ordinal after
# "(" counts only when it closes the parenthesis or names a round, so "(first layer only)" stays legitimate.
ORDINAL = r"first|second|third|fourth|fifth|sixth|seventh|eighth|ninth|tenth|eleventh|twelfth|\d+(?:st|nd|rd|th)"
ROUND_HEADING = re.compile(rf"\((?i:{ORDINAL})(?:\)|\s+(?i:session|round|pass|attempt|iteration|run)s?\b)|\bNow \(")
# A reference to a section of a page: docs/results.md, "New items" / [api.md](api.md), "Endpoints" /
# docs/results.md ("A heading", "Another heading").
SECTION_REF = re.compile(r'\b([a-z]+)\.md\]?(?:\([^)\s]*\))?,? \(?((?:"[^"\n]+"(?:, )?)+)')


def tracked(*patterns: str) -> list[Path]:
    out = subprocess.run(["git", "ls-files", *patterns], cwd=ROOT, capture_output=True, text=True, check=True)
    return [ROOT / line for line in out.stdout.splitlines() if (ROOT / line).is_file()]


def test_no_text_narrates_the_development() -> None:
    files = tracked("*.md", "*.py", "*.yaml", "*.yml", "*.sh", "*.toml", "Makefile")
    assert len(files) > 50
    found = [
        f"{path.relative_to(ROOT)}:{n}: {line.strip()[:100]}"
        for path in files
        if path.name != "test_docs.py"
        for n, line in enumerate(path.read_text(errors="replace").splitlines(), start=1)
        if HISTORY.search(line)
    ]
    assert not found, "\n".join(found)


def test_markdown_documents_say_session_nowhere() -> None:
    """In prose a "session" is always a development round here; the documents have no use for the word."""
    found = [
        f"{path.relative_to(ROOT)}:{n}"
        for path in tracked("*.md")
        for n, line in enumerate(path.read_text().splitlines(), start=1)
        if re.search(r"\bsessions?\b", line, re.IGNORECASE)
    ]
    assert not found, found


def test_readme_is_an_entry_point_and_its_links_resolve() -> None:
    readme = (ROOT / "README.md").read_text()
    assert len(readme.splitlines()) <= 200
    for doc in ("docs/api.md", "docs/configuration.md", "docs/training.md", "docs/deployment.md"):
        assert f"]({doc})" in readme, doc
    for path in tracked("*.md"):
        for target in re.findall(r"\]\(([^)#:]+\.md)(?:#[^)]*)?\)", path.read_text()):
            assert (path.parent / target).is_file(), f"{path.relative_to(ROOT)} links to a missing {target}"


def test_readme_examples_use_the_built_in_modalities() -> None:
    """The README's POST /items example must work as pasted against the default artifact."""
    from training.synthetic import SyntheticConfig

    readme = (ROOT / "README.md").read_text()
    dims = SyntheticConfig().modality_dims
    example = readme[readme.index("## The API at a glance") :]
    assert f"range({next(iter(dims.values()))})" in example and set(dims.values()) == {next(iter(dims.values()))}
    assert f"for m in {tuple(dims)!r}" in example.replace('"', "'")


def test_configuration_page_is_generated_from_the_settings() -> None:
    """docs/configuration.md's table is what `python tools/settings_doc.py` writes from service/settings.py."""
    import sys

    run = subprocess.run([sys.executable, str(ROOT / "tools" / "settings_doc.py"), "--check"], capture_output=True,
                         text=True, cwd=ROOT)  # fmt: skip
    assert run.returncode == 0, run.stderr


def test_topic_pages_exist_and_the_readme_links_them() -> None:
    readme = (ROOT / "README.md").read_text()
    for page in TOPIC_PAGES:
        assert (ROOT / page).is_file(), page
        assert f"]({page})" in readme, page


def headings(path: Path) -> list[tuple[int, str]]:
    """(line number, text) of the Markdown headings of a page, outside fenced code."""
    found, fenced = [], False
    for n, line in enumerate(path.read_text().splitlines(), start=1):
        if line.startswith("```"):
            fenced = not fenced
        elif not fenced and re.match(r"#{1,6} ", line):
            found.append((n, line.lstrip("#").strip()))
    return found


def test_no_heading_numbers_a_round_of_work() -> None:
    assert ROUND_HEADING.search("## Serving (tenth session)") and ROUND_HEADING.search("### Figures (third)")
    assert ROUND_HEADING.search("## Now (after the change)") and ROUND_HEADING.search("## Step (2nd round)")
    assert not ROUND_HEADING.search("### Only the last layer (first layer only)")
    assert not ROUND_HEADING.search("## Known now (and then)") and not ROUND_HEADING.search("## Tuning (seeds)")
    found = [
        f"{path.relative_to(ROOT)}:{n}: {text}"
        for path in sorted((ROOT / "docs").glob("*.md"))
        for n, text in headings(path)
        if ROUND_HEADING.search(text)
    ]
    assert not found, "\n".join(found)


def test_section_references_name_existing_headings() -> None:
    """`docs/results.md, "New items"` in code, configs and pages names a heading that the page has."""
    pages = {path.stem: {text for _, text in headings(path)} for path in (ROOT / "docs").glob("*.md")}
    files = tracked("*.md", "*.py", "*.yaml", "*.yml", "*.toml", "*.sh", "Makefile")
    found = []
    for path in files:
        if path.name == "test_docs.py":
            continue
        for n, line in enumerate(path.read_text(errors="replace").splitlines(), start=1):
            for match in SECTION_REF.finditer(line):
                if match.group(1) not in pages:
                    continue
                for name in re.findall(r'"([^"]+)"', match.group(2)):
                    if name not in pages[match.group(1)]:
                        found.append(f"{path.relative_to(ROOT)}:{n}: {match.group(1)}.md has no heading {name!r}")
    assert not found, "\n".join(found)
