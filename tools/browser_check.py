"""Open every page of the built book in headless Chromium and fail on what a reader would see.

Usage: python tools/browser_check.py HTML_DIR SCREENSHOT_DIR

The book is served from HTML_DIR on 127.0.0.1 (a free port, stopped at the end) and each page is
loaded in Debian's Chromium through its chromedriver (nothing downloads a browser). A page
fails on: a JavaScript console error, an image that did not load, a link to a page or anchor
of the book that does not exist, mathematics that MathJax did not typeset, and, for a
chapter, a missing Colab launch button. The search page must find a lab for "quantization".
A screenshot of every page (its first 6,000 pixels) is saved in SCREENSHOT_DIR.
Exit status: 0 if every page passed, 1 if not, 2 if Chromium or chromedriver is missing.
"""

from __future__ import annotations

import functools
import http.server
import re
import shutil
import socket
import sys
import threading
from pathlib import Path
from urllib.parse import unquote, urldefrag, urlparse

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
CHROMEDRIVER = shutil.which("chromedriver")
WIDTH, MAX_HEIGHT = 1280, 6000


class _QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args):  # one line per request would drown the report
        pass


def serve(root: Path) -> tuple[http.server.ThreadingHTTPServer, str]:
    """Serve `root` on 127.0.0.1 at a free port, in a daemon thread; returns (server, URL)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    handler = functools.partial(_QuietHandler, directory=str(root))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", port), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server, f"http://127.0.0.1:{port}/"


def browser():
    """Headless Chromium driven by the system chromedriver, with its console log kept."""
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for arg in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                f"--window-size={WIDTH},1000", "--hide-scrollbars"):
        options.add_argument(arg)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    driver = webdriver.Chrome(service=Service(executable_path=CHROMEDRIVER), options=options)
    driver.set_page_load_timeout(60)
    driver.set_script_timeout(60)
    return driver


_ids_cache: dict[Path, set[str]] = {}


def ids_in(page: Path) -> set[str]:
    """The element ids of a built page (the anchors a link can point at)."""
    if page not in _ids_cache:
        _ids_cache[page] = set(re.findall(r'\sid="([^"]+)"', page.read_text(errors="replace")))
    return _ids_cache[page]


def broken_links(root: Path, page: Path, hrefs: list[str], base: str) -> list[str]:
    """Links from `page` to pages or anchors of the book that do not exist."""
    bad = []
    for href in hrefs:
        if not href.startswith(base):
            continue  # another site: not checked (no network here)
        url, fragment = urldefrag(href)
        target = root / unquote(urlparse(url).path).lstrip("/")
        if target.is_dir():
            target = target / "index.html"
        if not target.is_file():
            bad.append(f"missing page {href}")
        elif fragment and target.suffix == ".html" and unquote(fragment) not in ids_in(target):
            bad.append(f"missing anchor {href}")
    return bad


WAIT_FOR_MATH = """
const done = arguments[arguments.length - 1];
const started = Date.now();
(function wait() {
  if (window.MathJax && MathJax.startup && MathJax.startup.promise) {
    MathJax.startup.promise.then(() => done(true), () => done(false));
  } else if (Date.now() - started > 20000) {
    done(null);
  } else {
    setTimeout(wait, 100);
  }
})();
"""


def check_page(driver, root: Path, page: Path, base: str, shots: Path) -> list[str]:
    """Load one page; return what is wrong with it."""
    rel = page.relative_to(root).as_posix()
    driver.get(base + rel)
    problems = []
    for entry in driver.get_log("browser"):
        if entry["level"] == "SEVERE" and "favicon.ico" not in entry["message"]:
            problems.append(f"console error: {entry['message'][:300]}")
    broken = driver.execute_script(
        "return Array.from(document.images).filter(i => !(i.complete && i.naturalWidth > 0))"
        ".map(i => i.src)")
    problems += [f"image did not load: {src}" for src in broken]
    hrefs = driver.execute_script("return Array.from(document.links).map(a => a.href)")
    problems += broken_links(root, page, hrefs, base)
    math = driver.execute_script(
        "return document.querySelectorAll('.math, span.math, div.math').length")
    if math:
        typeset = driver.execute_async_script(WAIT_FOR_MATH)  # MathJax loads deferred
        rendered = driver.execute_script(
            "return [document.querySelectorAll('mjx-container').length,"
            " document.querySelectorAll('mjx-merror').length]")
        if typeset is not True or rendered[0] < math or rendered[1]:
            problems.append(f"math not typeset: {math} formulas, {rendered[0]} typeset, "
                            f"{rendered[1]} errors, MathJax "
                            + {True: "finished", False: "failed", None: "never loaded"}[typeset])
    if rel.startswith("notebooks/") and not driver.execute_script(
            "return document.querySelector('a[href*=\"colab.research.google.com\"]') !== null"):
        problems.append("no Colab launch button")
    height = min(MAX_HEIGHT, driver.execute_script("return document.body.scrollHeight"))
    driver.set_window_size(WIDTH, max(height, 800))
    shot = shots / (rel.replace("/", "__").removesuffix(".html") + ".png")
    shot.parent.mkdir(parents=True, exist_ok=True)
    driver.save_screenshot(str(shot))
    driver.set_window_size(WIDTH, 1000)
    return problems


def check_search(driver, base: str, query: str = "quantization") -> list[str]:
    """The book's search must list at least one lab for `query`."""
    from selenium.webdriver.support.ui import WebDriverWait

    driver.get(f"{base}search.html?q={query}")
    try:
        WebDriverWait(driver, 30).until(lambda d: d.execute_script(
            "return document.querySelectorAll('#search-results li a, ul.search li a').length"))
    except Exception:  # noqa: BLE001 - a timeout is the failure being reported
        return [f"search for {query!r} found nothing"]
    links = driver.execute_script(
        "return Array.from(document.querySelectorAll('#search-results li a, ul.search li a'))"
        ".map(a => a.getAttribute('href'))")
    if not any("notebooks/" in (href or "") for href in links):
        return [f"search for {query!r} found no lab: {links[:5]}"]
    return []


def main(html_dir: str, shot_dir: str) -> int:
    root, shots = Path(html_dir).resolve(), Path(shot_dir)
    if not CHROMIUM or not CHROMEDRIVER:
        print("BROWSER CHECK SKIPPED: Chromium or chromedriver is not installed "
              "(Debian/Ubuntu: apt-get install chromium chromium-driver)")
        return 2
    if not (root / "index.html").is_file():
        print(f"no built book at {root} (run the book build first)")
        return 1
    pages = sorted(p for p in root.rglob("*.html")
                   if not p.relative_to(root).as_posix().startswith(("_", "genindex")))
    shutil.rmtree(shots, ignore_errors=True)
    server, base = serve(root)
    driver = browser()
    failures = {}
    try:
        for page in pages:
            problems = check_page(driver, root, page, base, shots)
            if problems:
                failures[page.relative_to(root).as_posix()] = problems
        search = check_search(driver, base)
        if search:
            failures["search.html"] = search
    finally:
        driver.quit()
        server.shutdown()
        server.server_close()
    print(f"browser check: {len(pages)} pages in Chromium, screenshots in {shots}")
    for page, problems in failures.items():
        print(f"FAIL {page}")
        for problem in problems:
            print(f"    {problem}")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main(*sys.argv[1:]))
