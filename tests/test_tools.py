"""The tools behind `make test`: nbval keeps the outputs it produced, and the book build's
execution cache takes them, so every notebook runs once."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

# the book's tools, in requirements.txt but not in pyproject's floors (make test-min)
nbformat = pytest.importorskip("nbformat")
pytest.importorskip("nbval")
get_cache = pytest.importorskip("jupyter_cache").get_cache

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tools"))
import cache_executed  # noqa: E402


def _notebook(path: Path, cells: list[str]) -> None:
    nb = nbformat.v4.new_notebook()
    nb.cells = [nbformat.v4.new_markdown_cell("# a test")] + [
        nbformat.v4.new_code_cell(c) for c in cells]
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3",
                                 "language": "python"}
    nbformat.write(nb, path)


def _nbval(notebook: Path, outputs: Path) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "pytest", "-p", "tools.nbval_outputs", "--nbval-lax", "-q",
         "-p", "no:cacheprovider", str(notebook)], cwd=ROOT, capture_output=True, text=True,
        env={**os.environ, "NBVAL_OUTPUTS_DIR": str(outputs)})


def test_nbval_keeps_outputs_and_the_book_cache_reuses_them(tmp_path):
    src, out = tmp_path / "src", tmp_path / "executed"
    src.mkdir()
    _notebook(src / "good.ipynb", ["x = 6 * 7\nprint(x)", "x + 1"])
    _notebook(src / "bad.ipynb", ["1 / 0"])
    assert _nbval(src / "good.ipynb", out).returncode == 0
    assert _nbval(src / "bad.ipynb", out).returncode != 0
    assert [p.name for p in out.glob("*.ipynb")] == ["good.ipynb"]  # a failing one is not kept
    executed = nbformat.read(out / "good.ipynb", 4)
    code = [c for c in executed.cells if c.cell_type == "code"]
    assert code[0].outputs[0].text == "42\n"
    assert code[1].outputs[0].data["text/plain"] == "43"
    assert [c.execution_count for c in code] == [1, 2]
    # the cache matches the source notebook (as the book build looks it up) to those outputs
    cache_executed.main(str(tmp_path / "cache"), str(out), str(src))
    cache = get_cache(str(tmp_path / "cache"))
    record = cache.match_cache_notebook(nbformat.read(src / "good.ipynb", 4))
    cached = cache.get_cache_bundle(record.pk).nb
    assert [c for c in cached.cells if c.cell_type == "code"][0].outputs[0].text == "42\n"
    # a source changed since nbval ran is left for the build to run
    _notebook(src / "good.ipynb", ["x = 6 * 8\nprint(x)", "x + 1"])
    cache_executed.main(str(tmp_path / "cache2"), str(out), str(src))
    assert not get_cache(str(tmp_path / "cache2")).list_cache_records()


def test_browser_check_finds_missing_pages_and_anchors(tmp_path):
    import browser_check

    (tmp_path / "a.html").write_text('<h1 id="top">A</h1><p id="x">x</p>')
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "index.html").write_text("<p>index</p>")
    base = "http://127.0.0.1:8000/"
    links = [base + "a.html#x", base + "a.html#top", base + "sub/", base + "a.html",
             base + "b.html", base + "a.html#nowhere", "https://example.org/c.html"]
    bad = browser_check.broken_links(tmp_path, tmp_path / "a.html", links, base)
    assert bad == [f"missing page {base}b.html", f"missing anchor {base}a.html#nowhere"]


def test_the_book_loads_no_widget_javascript_from_the_network():
    # with ipywidgets in the kernel, tqdm's bars are widgets, and myst-nb would load their
    # JavaScript from a CDN on every page that shows one (a cpu build's first lab does)
    yaml = pytest.importorskip("yaml")
    NbParserConfig = pytest.importorskip("myst_nb.core.config").NbParserConfig
    config = yaml.safe_load((ROOT / "_config.yml").read_text())["sphinx"]["config"]
    scripts = config.get("nb_ipywidgets_js", NbParserConfig().ipywidgets_js)
    assert not [s for s in scripts if s.startswith(("http:", "https:", "//"))], scripts
