"""The claim-check table every lab ends with: the source's claim, what we measured, a verdict.

The table renders in the notebook and is also written as JSON to
`cache_dir()/claims/<notebook>.json` with the profile and machine, so that a summary chapter can
collect the verdicts of every lab. Introduced in lab 00.
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import pandas as pd

from .plot import wrapped_table
from .runtime import atomic_path, cache_dir, machine

# "reproduced (estimate)": the row redoes published arithmetic on published inputs, and it
# agrees; nothing in it was measured here.
VERDICTS = ("holds", "partly", "does not hold", "reproduced (estimate)", "not testable here")


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
        """Write the rows with profile, machine and time to cache_dir()/claims/<notebook>.json."""
        path = cache_dir() / "claims" / f"{self.notebook}.json"
        record = {"notebook": self.notebook, "machine": machine(),
                  "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
                  "claims": [asdict(r) for r in self.rows]}
        with atomic_path(path) as tmp:
            tmp.write_text(json.dumps(record, indent=2))
        return path

    def show(self):
        """Save the JSON and return the table for the notebook: four columns at fixed widths
        that wrap their text, so no cell hides behind a sideways scroll."""
        self.save()
        colours = {"holds": "#d8f0d8", "partly": "#fdf1c7", "does not hold": "#f8d4d4",
                   "reproduced (estimate)": "#dde8f6", "not testable here": "#e6e6e6"}
        shown = pd.DataFrame({
            "claim (source)": [f"{r.claim} ({r.source})" for r in self.rows],
            "measured in this run": [r.measured for r in self.rows],
            "verdict": [r.verdict for r in self.rows],
            "rule for the verdict; note": [f"{r.rule}" + (f". Note: {r.note}" if r.note else "")
                                           for r in self.rows]})
        return (wrapped_table(shown.style.hide(axis="index"), ["21%", "33%", "16%", "30%"])
                .map(lambda v: f"background-color: {colours.get(v, '')}; font-weight: bold",
                     subset=["verdict"]))
