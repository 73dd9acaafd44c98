"""The claim-check table every lab ends with: the source's claim, what we measured, a verdict.

The table renders in the notebook and is also written as JSON to
`cache_dir()/claims/<notebook>.json` with the profile and machine, so that a summary chapter can
collect the verdicts of every lab. Introduced in lab 00.
"""

from __future__ import annotations

import hashlib
import json
import re
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import pandas as pd

from .plot import wrapped_table
from .runtime import atomic_path, cache_dir, machine

# "reproduced (estimate)": the row redoes published arithmetic on published inputs, and it
# agrees; nothing in it was measured here.
VERDICTS = ("holds", "partly", "does not hold", "reproduced (estimate)", "not testable here")
VERDICT_COLOURS = {"holds": "#d8f0d8", "partly": "#fdf1c7", "does not hold": "#f8d4d4",
                   "reproduced (estimate)": "#dde8f6", "not testable here": "#e6e6e6"}


def verdict_style(verdict: str) -> str:
    """CSS for a table cell that holds a verdict: its colour, in bold."""
    return f"background-color: {VERDICT_COLOURS.get(verdict, '')}; font-weight: bold"


@dataclass
class Claim:
    claim: str  # the source's words, quoted or closely paraphrased
    source: str  # who made the claim (citation key or short reference)
    measured: str  # what this run measured or computed, with numbers
    verdict: str  # one of VERDICTS
    note: str = ""  # why the verdict, in a phrase
    rule: str = ""  # what had to be measured for "holds", "partly" and "does not hold"


class ClaimCheck:
    """Collects Claim rows for one notebook; `show()` renders them and saves the JSON."""

    def __init__(self, notebook: str):
        if not notebook or "/" in notebook:
            raise ValueError(f"notebook must be a bare name like '00_cost_of_llms', got "
                             f"{notebook!r}")
        self.notebook = notebook
        self.rows: list[Claim] = []

    def add(self, claim: str, source: str, measured: str, verdict: str, note: str = "", *,
            rule: str) -> None:
        """Add one row; `verdict` must be one of VERDICTS, and `rule` states the test behind it
        (what had to be measured for each verdict), so a reader can check it."""
        if verdict not in VERDICTS:
            raise ValueError(f"verdict must be one of {VERDICTS}, got {verdict!r}")
        if not rule or not rule.strip():
            raise ValueError("rule must say what had to be measured for each verdict, "
                             "e.g. 'holds if the ratio is >= 2 at every batch'")
        self.rows.append(Claim(claim, source, measured, verdict, note, rule.strip()))

    def table(self) -> pd.DataFrame:
        return pd.DataFrame([asdict(r) for r in self.rows],
                            columns=["claim", "source", "measured", "verdict", "rule", "note"])

    def save(self) -> Path:
        """Write the rows with profile, machine, time and the hash of the notebook's code (when
        the notebook file sits in the working directory, as it does when Jupyter, nbval or the
        book runs it) to cache_dir()/claims/<notebook>.json."""
        path = cache_dir() / "claims" / f"{self.notebook}.json"
        source = Path.cwd() / f"{self.notebook}.ipynb"
        record = {"notebook": self.notebook, "machine": machine(),
                  "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
                  "source_hash": source_hash(source) if source.is_file() else None,
                  "claims": [asdict(r) for r in self.rows]}
        with atomic_path(path) as tmp:
            tmp.write_text(json.dumps(record, indent=2))
        return path

    def show(self):
        """Save the JSON and return the table for the notebook: four columns at fixed widths
        that wrap their text, so no cell hides behind a sideways scroll."""
        self.save()
        shown = pd.DataFrame({
            "claim (source)": [f"{r.claim} ({r.source})" for r in self.rows],
            "measured in this run": [r.measured for r in self.rows],
            "verdict": [r.verdict for r in self.rows],
            "rule for the verdict; note": [f"{r.rule}" + (f". Note: {r.note}" if r.note else "")
                                           for r in self.rows]})
        return (wrapped_table(shown.style.hide(axis="index"), ["21%", "33%", "16%", "30%"])
                .map(verdict_style, subset=["verdict"]))


def source_hash(notebook: Path) -> str:
    """sha256 of a notebook's code cells: what decides what it computes (its prose and outputs
    are left out, as in Jupyter Book's execution cache)."""
    cells = json.loads(Path(notebook).read_text())["cells"]
    code = ["".join(c["source"]) if isinstance(c["source"], list) else c["source"]
            for c in cells if c["cell_type"] == "code"]
    return hashlib.sha256("\n\0".join(code).encode()).hexdigest()


def labs_in_toc(toc: Path) -> list[str]:
    """The lab notebooks listed in a Jupyter Book `_toc.yml`, in order (reference chapters,
    numbered 9x, left out)."""
    names = re.findall(r"^\s*-\s*file:\s*notebooks/(\S+)\s*$", Path(toc).read_text(), re.M)
    return [n for n in names if not n.startswith("9")]


def collect(notebook_dir: Path, labs: list[str], profile: str) -> list[dict]:
    """Each lab's saved claim record, checked to come from running the lab's current code at
    `profile`; raises RuntimeError naming every lab whose record is missing, from another
    profile, or from another version of its notebook."""
    records, problems = [], []
    for lab in labs:
        path = cache_dir() / "claims" / f"{lab}.json"
        if not path.is_file():
            problems.append(f"{lab}: no record (run the notebook first)")
            continue
        record = json.loads(path.read_text())
        ran_at = record.get("machine", {}).get("profile")
        current = source_hash(Path(notebook_dir) / f"{lab}.ipynb")
        if ran_at != profile:
            problems.append(f"{lab}: recorded at profile {ran_at!r}, not {profile!r}")
        elif record.get("source_hash") != current:
            problems.append(f"{lab}: recorded by another version of the notebook (rerun it)")
        else:
            records.append(record)
    if problems:
        raise RuntimeError("claim records missing or stale in " + str(cache_dir() / "claims")
                           + ":\n  " + "\n  ".join(problems))
    return records
