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

from .runtime import atomic_path, cache_dir, machine

VERDICTS = ("holds", "partly", "does not hold", "not testable here")


@dataclass
class Claim:
    claim: str  # the source's words, quoted or closely paraphrased
    source: str  # who made the claim (citation key or short reference)
    measured: str  # what this run measured or computed, with numbers
    verdict: str  # one of VERDICTS
    note: str = ""  # why the verdict, in a phrase


class ClaimCheck:
    """Collects Claim rows for one notebook; `show()` renders them and saves the JSON."""

    def __init__(self, notebook: str):
        if not notebook or "/" in notebook:
            raise ValueError(f"notebook must be a bare name like '00_cost_of_llms', got "
                             f"{notebook!r}")
        self.notebook = notebook
        self.rows: list[Claim] = []

    def add(self, claim: str, source: str, measured: str, verdict: str, note: str = "") -> None:
        """Add one row; `verdict` must be one of VERDICTS."""
        if verdict not in VERDICTS:
            raise ValueError(f"verdict must be one of {VERDICTS}, got {verdict!r}")
        self.rows.append(Claim(claim, source, measured, verdict, note))

    def table(self) -> pd.DataFrame:
        return pd.DataFrame([asdict(r) for r in self.rows],
                            columns=["claim", "source", "measured", "verdict", "note"])

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
        """Save the JSON and return the table styled for the notebook."""
        self.save()
        colours = {"holds": "#d8f0d8", "partly": "#fdf1c7", "does not hold": "#f8d4d4",
                   "not testable here": "#e6e6e6"}
        return (self.table().style.hide(axis="index")
                .map(lambda v: f"background-color: {colours.get(v, '')}", subset=["verdict"])
                .set_properties(**{"text-align": "left", "vertical-align": "top"}))
