"""Sphinx configuration of the jobflow-cache documentation.

Build (offline, warnings are errors)::

    .venv/bin/pip install -e '.[docs]'
    .venv/bin/sphinx-build -W -b html docs docs/_build/html
"""

from __future__ import annotations

import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE / "_ext"))
sys.path.insert(0, str(HERE.parent / "src"))  # the package documents itself from this tree

from jobflow_cache import __version__  # noqa: E402

project = "jobflow-cache"
author = "jobflow-cache developers"
copyright = "jobflow-cache developers"
release = __version__
version = ".".join(__version__.split(".")[:2])

extensions = [
    "myst_parser",
    "sphinx.ext.autodoc",
    "sphinx.ext.napoleon",
    "sphinx_click",  # before jfc_docs, which connects to its events
    "jfc_docs",  # docs/_ext/jfc_docs.py: tables generated from the pydantic models
]

# No smart quotes or dashes: "--limit" must stay two hyphens (never an en-dash) and quotes
# straight, so commands copied from a page work
smartquotes = False

source_suffix = {".md": "markdown", ".rst": "restructuredtext"}
root_doc = "index"
exclude_patterns = ["_build", "Thumbs.db", ".DS_Store"]

# Markdown: heading anchors so pages can link to sections (page.md#section)
myst_heading_anchors = 3
myst_enable_extensions = ["colon_fence", "deflist"]

# API reference from numpydoc docstrings; types live in the annotations
napoleon_google_docstring = False
napoleon_numpy_docstring = True
napoleon_use_rtype = False
autodoc_typehints = "description"
autodoc_typehints_description_target = "documented_params"
autodoc_member_order = "bysource"
autodoc_default_options = {"members": True, "show-inheritance": False}

# No network: no intersphinx, no remote images. Unresolved cross-references to jobflow or
# maggma objects render as plain code instead of failing the build.
nitpicky = False

html_theme = "furo"
html_title = f"jobflow-cache {release}"
html_static_path: list[str] = []
pygments_style = "sphinx"
pygments_dark_style = "monokai"
