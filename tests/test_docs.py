"""Every doc that code and docs cite exists, and no citation points outside the repository.

Code cites docs by their path from the repository root, optionally followed by headings in
quotes (`docs/scaling.md, "Access"`); Markdown files also link relative to their own folder.
Both kinds are resolved and checked, and a quoted heading must be a heading of the cited file.
The design contract and the platform notes used to live outside the repository, cited by a
bare file name and section number; such a citation would now point at nothing, so none may
come back (docs/design.md, "Section numbers of the first contract", maps the old numbers).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCANNED = ("platform", "jobs", "tests", "benchmarks", "sweeps", "serve", "infra", "docs", "README.md", "Makefile")
"""What is scanned: the repository's code and docs. The top-level run/, data/ and outputs/ (what
runs write) and .venv/ are not among them."""
SKIPPED_DIRS = {".venv", ".git", "__pycache__", ".pytest_cache"}
TEXT_SUFFIXES = {".py", ".md", ".yaml", ".yml", ".sh", ".toml", ".txt", ".cfg", ".json", ".jsonl", ".dockerignore"}
TEXT_NAMES = {"Makefile", "Dockerfile"}

# A path from the repository root into docs/, ending in a file extension. Not preceded by a
# path character, so `../../docs/x.md` (a relative link, checked as one) is not read as root-relative.
DOC_PATH = re.compile(r"(?<![\w./-])docs/[\w./-]*\.[A-Za-z0-9]+")
# Headings in quotes right after a cited path: `, "Masking", "Loss"` (single quotes also accepted).
QUOTED = r"""(?:"([^"\n]+)"|'([^'\n]+)')"""
HEADING_LIST = re.compile(rf",\s*{QUOTED}((?:\s*(?:,|and)\s*{QUOTED})*)")
NEXT_HEADING = re.compile(rf"\s*(?:,|and)\s*{QUOTED}")
# Markdown links and images: [text](target) / ![alt](target "title").
MD_LINK = re.compile(r"!?\[[^\]]*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")
URL_SCHEME = re.compile(r"^[a-zA-Z][a-zA-Z0-9+.-]*:")
# Any file named like the old design contract or field notes, with whatever path precedes it.
NAMED_NOTES = re.compile(r"(?<![\w.-])((?:[\w.-]+/)*)((?i:design|field[-_ ]?notes)\.md)\b")
# The old citation forms that name no file: the contract's name in capitals with a section
# number, the notes' name in capitals, or a bare section sign and number.
OLD_FORMS = re.compile(r"\bDESIGN\s+§?\d|\bFIELD[-_ ]?NOTES\b(?!\.md)|§\s*\d")
SECTION_TABLE = ROOT / "docs/design.md"
"""The one file allowed to show the old section numbers: its table maps them to headings."""


@dataclass(frozen=True)
class Citation:
    """One reference from a file to a doc path, possibly to headings in it."""

    source: Path
    line: int
    target: Path
    text: str
    headings: tuple[str, ...] = ()
    fragment: str | None = None

    def where(self) -> str:
        return f"{self.source.relative_to(ROOT)}:{self.line}: {self.text!r}"


def scanned_files() -> list[Path]:
    """Text files of the code and docs the repository ships."""
    files = []
    for name in SCANNED:
        top = ROOT / name
        if top.is_file():
            files.append(top)
            continue
        for path in sorted(top.rglob("*")):
            parts = path.relative_to(ROOT).parts
            if any(p in SKIPPED_DIRS or p.endswith(".egg-info") for p in parts[:-1]):
                continue
            if path.is_file() and (path.suffix in TEXT_SUFFIXES or path.name in TEXT_NAMES):
                files.append(path)
    return files


def _line_of(text: str, offset: int) -> int:
    return text.count("\n", 0, offset) + 1


def _quoted(match: re.Match, first: int) -> str:
    return match.group(first) or match.group(first + 1)


def cited_headings(text: str, end: int) -> tuple[str, ...]:
    """The quoted headings that follow a cited path ending at `end`, if any."""
    match = HEADING_LIST.match(text, end)
    if not match:
        return ()
    headings = [_quoted(match, 1)]
    headings += [_quoted(m, 1) for m in NEXT_HEADING.finditer(match.group(3))]
    return tuple(headings)


def citations_in(path: Path, text: str) -> list[Citation]:
    """Root-relative doc paths anywhere in the file, and relative links in a Markdown file."""
    found = []
    for match in DOC_PATH.finditer(text):
        found.append(Citation(path, _line_of(text, match.start()), ROOT / match.group(0), match.group(0),
                              cited_headings(text, match.end())))
    if path.suffix == ".md":
        for match in MD_LINK.finditer(text):
            target = match.group(1)
            if URL_SCHEME.match(target) or target.startswith("#"):
                continue
            target, _, fragment = target.partition("#")
            found.append(Citation(path, _line_of(text, match.start()), (path.parent / target).resolve(),
                                  match.group(0), fragment=fragment or None))
    return found


def markdown_headings(path: Path) -> list[str]:
    """Headings of a Markdown file (outside code fences), without their `#`s."""
    headings, fenced = [], False
    for line in path.read_text(encoding="utf-8").splitlines():
        if line.lstrip().startswith(("```", "~~~")):
            fenced = not fenced
        elif not fenced and (m := re.match(r"^#{1,6}\s+(.+?)\s*#*\s*$", line)):
            headings.append(m.group(1))
    return headings


def heading_matches(cited: str, heading: str) -> bool:
    """`"Access"` names `## 8. Access: API keys, ...`: numbering dropped, a subtitle after `:` allowed."""
    heading = re.sub(r"^\d+(?:\.\d+)*\.?\s+", "", heading)
    return heading == cited or heading.startswith(f"{cited}:")


def github_slug(heading: str) -> str:
    """The anchor GitHub gives a heading."""
    return re.sub(r"\s", "-", re.sub(r"[^\w\s-]", "", heading.strip().lower()))


def outside_references(path: Path, text: str) -> list[str]:
    """Citations of the old design contract or platform notes that resolve to no file in the repo."""
    problems = []
    for match in NAMED_NOTES.finditer(text):
        cited = match.group(0)
        candidates = [ROOT / cited, path.parent / cited]
        if not any(c.resolve().is_file() and c.resolve().is_relative_to(ROOT) for c in candidates):
            problems.append(f"{path.relative_to(ROOT)}:{_line_of(text, match.start())}: {cited!r}")
    if path != SECTION_TABLE:
        for match in OLD_FORMS.finditer(text):
            problems.append(f"{path.relative_to(ROOT)}:{_line_of(text, match.start())}: {match.group(0)!r}")
    return problems


@pytest.fixture(scope="module")
def corpus() -> dict[Path, str]:
    return {path: path.read_text(encoding="utf-8", errors="replace") for path in scanned_files()}


@pytest.fixture(scope="module")
def citations(corpus) -> list[Citation]:
    return [c for path, text in corpus.items() for c in citations_in(path, text)]


def test_the_scan_reads_the_code_and_the_docs(corpus, citations):
    """The checks below prove nothing if the scan found nothing: make sure it covered the repo."""
    names = {path.relative_to(ROOT).as_posix() for path in corpus}
    for expected in ("README.md", "Makefile", "docs/design.md", "docs/platform-notes.md",
                     "platform/janus_lab/model/sequence.py", "platform/janus_lab/data/schema.py",
                     "serve/config.yaml", "tests/test_docs.py"):
        assert expected in names, f"{expected} was not scanned"
    assert len(corpus) >= 100, f"only {len(corpus)} files scanned"
    assert len(citations) >= 40, f"only {len(citations)} doc citations found"
    with_headings = [c for c in citations if c.headings]
    assert len(with_headings) >= 15, f"only {len(with_headings)} citations name a heading"
    links = [c for c in citations if c.source.suffix == ".md" and c.text.endswith(")")]
    assert len(links) >= 10, f"only {len(links)} Markdown links found"
    from_code = {c.source for c in citations if c.target == SECTION_TABLE and c.source.suffix == ".py"}
    assert len(from_code) >= 10, f"docs/design.md is cited from only {len(from_code)} Python files"


def test_every_cited_doc_exists(citations):
    missing = [c.where() for c in citations if not c.target.exists()]
    assert not missing, "cited paths that do not exist:\n" + "\n".join(missing)
    outside = [c.where() for c in citations if not c.target.resolve().is_relative_to(ROOT)]
    assert not outside, "links that leave the repository:\n" + "\n".join(outside)


def test_every_cited_heading_exists(citations):
    missing = []
    for c in citations:
        if not (c.headings or c.fragment) or c.target.suffix != ".md" or not c.target.is_file():
            continue
        headings = markdown_headings(c.target)
        for cited in c.headings:
            if not any(heading_matches(cited, h) for h in headings):
                missing.append(f"{c.where()}: no heading {cited!r} in {c.target.relative_to(ROOT)}")
        if c.fragment and c.fragment not in {github_slug(h) for h in headings}:
            missing.append(f"{c.where()}: no anchor #{c.fragment} in {c.target.relative_to(ROOT)}")
    assert not missing, "cited headings that do not exist:\n" + "\n".join(missing)


def test_no_citation_points_outside_the_repository(corpus):
    problems = [p for path, text in corpus.items() for p in outside_references(path, text)]
    assert not problems, ("citations of the old design contract or platform notes outside the repository "
                          "(now docs/design.md and docs/platform-notes.md):\n" + "\n".join(problems))


@pytest.mark.parametrize("text, flagged", [
    ("Sequence layout (DESIGN" + ".md \u00a72.1).", True),
    ("checkpointing (DESIGN" + " 4).", True),
    ("see FIELD" + "-NOTES.md).", True),
    ("rest of the session (FIELD" + "-NOTES).", True),
    ("/work/shared/DESIGN" + ".md", True),
    ("masking (\u00a72.2)", True),
    ("in design" + ".md, 'Masking'", True),
    ('Masking (docs/design.md, "Masking").', False),
    ('see docs/platform-notes.md, "Ray Tune".', False),
])
def test_old_citation_forms_are_recognised(text, flagged):
    """The patterns catch every form the old citations took, and pass the new ones."""
    path = ROOT / "platform" / "janus_lab" / "example.py"
    assert bool(outside_references(path, text)) is flagged


def test_headings_are_read_from_a_cited_path():
    text = 'as before (docs/design.md, "Sequence layout", "Masking" and \'Loss\'); then'
    match = DOC_PATH.search(text)
    assert match.group(0) == "docs/design.md"
    assert cited_headings(text, match.end()) == ("Sequence layout", "Masking", "Loss")
    assert cited_headings("docs/data.md).", len("docs/data.md")) == ()
    assert heading_matches("Access", "8. Access: API keys, limits, TLS, and what is exposed")
    assert not heading_matches("Acc", "8. Access: API keys")
