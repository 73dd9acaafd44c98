"""Keep every page of the book readable offline.

sphinx-thebe (which Jupyter Book always loads) adds its configuration script twice, a
JavaScript error on every page, and points at thebe on a CDN; no launcher of this book uses it,
so its scripts are dropped. Any other script or stylesheet that a page would fetch from the
network fails the build, so that the book keeps working in a room without Wi-Fi. MathJax is
served from the book's own `_static/mathjax` (see the Makefile); Jupyter Book lists every .js
file under the static paths for every page, so all of MathJax's but its entry point are dropped
(MathJax loads the parts it needs itself).
"""

from __future__ import annotations

from sphinx.errors import ExtensionError


def _remote(name: str) -> bool:
    return name.startswith(("http://", "https://", "//"))


def _local_assets_only(app, pagename, templatename, context, doctree):
    kept, seen = [], set()
    for js in context.get("script_files", []):
        name, body = str(js.filename or ""), str(js.attributes.get("body", ""))
        if "thebe" in name or "THEBE" in body:
            continue
        if name.startswith("_static/mathjax/") and (
                name != f"_static/{app.config.mathjax_path}" or "defer" not in js.attributes):
            continue  # Jupyter Book's copies; sphinx.ext.mathjax's own (deferred) one stays
        if _remote(name):
            raise ExtensionError(f"page {pagename!r} would load {name} from the network")
        if (name, body) not in seen:
            seen.add((name, body))
            kept.append(js)
    context["script_files"] = kept
    for css in context.get("css_files", []):
        if _remote(str(css.filename or "")):
            raise ExtensionError(f"page {pagename!r} would load {css.filename} from the network")


def setup(app):
    app.connect("html-page-context", _local_assets_only)
    return {"parallel_read_safe": True, "parallel_write_safe": True}
