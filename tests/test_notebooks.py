"""Hygiene of the notebooks and the book: what nbval cannot see."""

import json
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOKS = sorted((ROOT / "notebooks").glob("*.ipynb"))
LABS = [nb for nb in NOTEBOOKS if not nb.stem.startswith("9")]  # 9x: reference chapters
TOC = (ROOT / "_toc.yml").read_text()
BIB = (ROOT / "book" / "references.bib").read_text()
BIB_KEYS = set(re.findall(r"@\w+\{([^,]+),", BIB))


def cells(nb: Path) -> list[dict]:
    return json.loads(nb.read_text())["cells"]


def test_there_are_notebooks():
    assert NOTEBOOKS, "no notebooks found under notebooks/"


@pytest.mark.parametrize("nb", NOTEBOOKS, ids=lambda p: p.stem)
def test_committed_without_outputs(nb):
    for cell in cells(nb):
        if cell["cell_type"] == "code":
            assert not cell["outputs"] and cell["execution_count"] is None, (
                f"{nb.name}: strip outputs before committing")


@pytest.mark.parametrize("nb", NOTEBOOKS, ids=lambda p: p.stem)
def test_listed_in_the_table_of_contents(nb):
    assert f"notebooks/{nb.stem}" in TOC, f"add notebooks/{nb.stem} to _toc.yml"


@pytest.mark.parametrize("nb", NOTEBOOKS, ids=lambda p: p.stem)
def test_first_code_cell_installs_labsupport_only_when_missing(nb):
    first = next(c for c in cells(nb) if c["cell_type"] == "code")
    source = "".join(first["source"])
    assert 'find_spec("labsupport") is None' in source and "pip" in source


REPOSITORY = re.search(r"^repository:\s*\n\s+url:\s*(\S+)", (ROOT / "_config.yml").read_text(),
                       re.M).group(1)


@pytest.mark.parametrize("nb", NOTEBOOKS, ids=lambda p: p.stem)
def test_install_cell_installs_from_the_repository_in_config(nb):
    # _config.yml's repository URL is the one setting; Colab installs from it
    first = next(c for c in cells(nb) if c["cell_type"] == "code")
    urls = re.findall(r"git\+(https://[^\"']+)", "".join(first["source"]))
    assert urls == [REPOSITORY], f"{nb.name} installs from {urls}, _config.yml says {REPOSITORY}"


@pytest.mark.parametrize("nb", NOTEBOOKS, ids=lambda p: p.stem)
def test_first_code_cell_makes_a_clone_importable_without_a_restart(nb, monkeypatch):
    # A kernel started before `pip install -e` never reads the new path file: the cell itself
    # must put the clone on sys.path. Run it as if labsupport were missing.
    import importlib.util
    import subprocess
    import sys

    first = next(c for c in cells(nb) if c["cell_type"] == "code")
    calls = []
    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "labsupport" else real_find_spec(name, *a))
    monkeypatch.setattr(subprocess, "run", lambda args, **kw: calls.append(args))
    monkeypatch.setattr(sys, "path", list(sys.path))
    monkeypatch.chdir(ROOT / "notebooks")
    exec("".join(first["source"]), {})
    assert calls and calls[0][-2:] == ["-e", str(ROOT)]
    assert sys.path[0] == str(ROOT)


@pytest.mark.parametrize("nb", LABS, ids=lambda p: p.stem)
def test_has_the_arc_of_a_lab(nb):
    text = "".join("".join(c["source"]) for c in cells(nb))
    for part in ("**Objectives.**", "## The claim", "## Claim check", "## Exercises",
                 "ClaimCheck(", ".show()"):
        assert part in text, f"{nb.name} lacks {part!r}"
    assert f'ClaimCheck("{nb.stem}")' in text, "claim table should be named after the notebook"


@pytest.mark.parametrize("page", sorted((ROOT / "book").glob("*.md")) + NOTEBOOKS,
                         ids=lambda p: p.name)
def test_every_citation_is_in_references_bib(page):
    text = page.read_text()
    for group in re.findall(r"\{cite(?::\w+)?\}`([^`]+)`", text):
        for key in group.split(","):
            assert key.strip() in BIB_KEYS, f"{page.name} cites {key!r}, not in references.bib"


GLOSSARY_TERMS = {line.strip() for line in (ROOT / "book" / "glossary.md").read_text().splitlines()
                  if line and not line.startswith((" ", "#", "`", ":"))}


@pytest.mark.parametrize("page", sorted((ROOT / "book").glob("*.md")) + NOTEBOOKS,
                         ids=lambda p: p.name)
def test_every_glossary_term_used_is_defined(page):
    # Sphinx matches glossary terms case-insensitively; `text <Term>` links to Term
    defined = {t.lower() for t in GLOSSARY_TERMS}
    for role in re.findall(r"\{term\}`([^`]+)`", page.read_text()):
        term = re.search(r"<([^>]+)>\s*$", role)
        term = (term.group(1) if term else role).strip()
        assert term.lower() in defined, f"{page.name} uses {{term}}`{role}`, not defined"


@pytest.mark.parametrize("nb", LABS, ids=lambda p: p.stem)
def test_links_its_terms_to_the_glossary(nb):
    # a reader meeting a lab's vocabulary can look it up: the glossary covers every lab
    text = "".join("".join(c["source"]) for c in cells(nb) if c["cell_type"] == "markdown")
    assert len(re.findall(r"\{term\}`", text)) >= 3, f"{nb.name} links fewer than 3 glossary terms"


@pytest.mark.parametrize("nb", LABS, ids=lambda p: p.stem)
def test_every_exercise_has_a_solution_in_a_collapsed_block(nb):
    text = next("".join(c["source"]) for c in cells(nb) if "## Exercises" in "".join(c["source"]))
    block = re.search(r"```\{admonition\} Solutions\n:class: dropdown\n(.*?)```", text, re.S)
    assert block, f"{nb.name}: the exercises have no collapsed Solutions block"
    asked = re.findall(r"^(\d+)\. ", text[:block.start()], re.M)
    answered = re.findall(r"^(\d+)\. ", block.group(1), re.M)
    assert asked and answered == asked, f"{nb.name}: exercises {asked}, solutions {answered}"


def test_every_reference_has_a_url_or_doi():
    for entry in re.split(r"\n(?=@)", BIB):
        key = re.match(r"\s*@\w+\{([^,]+),", entry)
        if not key:
            continue
        assert re.search(r"^\s*(url|doi)\s*=|\\url\{", entry, re.M), (
            f"{key.group(1)} has no url or doi a reader can follow")


def test_references_to_the_course_use_the_repository_in_config():
    # the survey has no address of its own; its entry points at the course's page about it
    urls = re.findall(r"url\s*=\s*\{(https://github\.com/[^}]+)\}", BIB)
    ours = [u for u in urls if "llm-cost" in u]
    assert ours and all(u.startswith(REPOSITORY + "/blob/main/") for u in ours), ours
    for u in ours:
        assert (ROOT / u.split("/blob/main/", 1)[1]).exists(), f"{u}: no such file here"


def test_a_part_name_appears_once_in_the_sidebar():
    # a part's caption and the title of its overview page would otherwise repeat each other
    captions = set(re.findall(r"caption:\s*(.+)", TOC))
    for page in re.findall(r"file:\s*(book/\S+)", TOC):
        title = (ROOT / f"{page}.md").read_text().splitlines()[0].lstrip("# ").strip()
        assert title not in captions, f"{page}.md is titled like its part, {title!r}"
