"""Put notebooks that nbval executed into a Jupyter Book execution cache.

Usage: python tools/cache_executed.py CACHE_DIR EXECUTED_DIR SOURCE_DIR

Jupyter Book (execute_notebooks: cache) looks a notebook up by the hash of its code cells and
kernelspec; an executed copy hashes like its source, so the book build renders the stored
outputs instead of running the notebook again. A notebook's copy is cached only if its code
cells are those of the source notebook now; anything else is left for the build to run.
"""

from __future__ import annotations

import sys
from pathlib import Path

from jupyter_cache import get_cache

from labsupport.claims import source_hash  # the hash of a notebook's code cells


def main(cache_dir: str, executed_dir: str, source_dir: str) -> None:
    cache = get_cache(cache_dir)
    for executed in sorted(Path(executed_dir).glob("*.ipynb")):
        source = Path(source_dir) / executed.name
        if not source.is_file() or source_hash(source) != source_hash(executed):
            print(f"not cached (its source changed or is gone): {executed.name}")
            continue
        cache.cache_notebook_file(str(executed), uri=str(source), check_validity=False,
                                  overwrite=True)
        print(f"cached the executed {executed.name}")


if __name__ == "__main__":
    main(*sys.argv[1:])
