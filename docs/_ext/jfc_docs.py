"""Sphinx helpers of the jobflow-cache docs: tables generated from pydantic models.

``pydantic-fields`` renders the fields of a pydantic model as a table, so the settings and the
entry schema pages are written by the code they describe and cannot drift from it::

    ```{pydantic-fields} jobflow_cache.settings.CacheSettings
    :env-prefix: JOBFLOW_CACHE_
    ```

    ```{pydantic-fields} jobflow_cache.entry.CacheEntry
    :checksum: jobflow_cache.entry.CHECKSUM_FIELDS
    ```

The command-line reference is rendered by sphinx-click; its help texts are reStructuredText
there, so ``*`` in globs is escaped and the ``Examples:`` blocks become console code blocks.
A rendered page that still shows a raw directive (``.. option::``) or an option whose ``--``
became an en-dash (an en-dash before ``limit``) fails the build, whatever ``-W`` says.

The toctree of ``index.md`` names two pages other work adds (``cli.md``, ``performance.md``);
while one of them does not exist yet, its toctree line is dropped with an info message instead
of failing the ``-W`` build.
"""

from __future__ import annotations

import enum
import importlib
import re
import types
import typing
from pathlib import Path
from typing import Any

from docutils import nodes
from docutils.parsers.rst import directives
from pydantic.fields import FieldInfo
from pydantic_core import PydanticUndefined
from sphinx.application import Sphinx
from sphinx.errors import ExtensionError
from sphinx.util import logging
from sphinx.util.docutils import SphinxDirective

logger = logging.getLogger(__name__)

#: Pages written by other work, listed in the toctree of index.md once they exist.
OPTIONAL_PAGES = ("cli", "performance")


def _import(path: str) -> Any:
    module, _, name = path.rpartition(".")
    return getattr(importlib.import_module(module), name)


def _type_name(annotation: Any) -> str:
    """A short, readable name of a type annotation (``dict[str, Any] | None``)."""
    if annotation is type(None):
        return "None"
    origin = typing.get_origin(annotation)
    if origin in (typing.Union, types.UnionType):
        return " | ".join(_type_name(a) for a in typing.get_args(annotation))
    if origin is typing.Literal:
        return " | ".join(repr(a) for a in typing.get_args(annotation))
    if origin is not None:
        args = ", ".join(_type_name(a) for a in typing.get_args(annotation))
        return f"{getattr(origin, '__name__', str(origin))}[{args}]"
    if annotation is Any:
        return "Any"
    return getattr(annotation, "__name__", str(annotation).replace("typing.", ""))


def _default(info: FieldInfo) -> str:
    """The default of a field as users see it (factories by name, never this machine's values)."""
    if info.default is not PydanticUndefined:
        value = info.default
        return repr(value.value if isinstance(value, enum.Enum) else value)
    factory = info.default_factory
    if factory is None:
        return "(required)"
    if factory in (list, dict):
        return repr(factory())
    name = getattr(factory, "__name__", "")
    if name == "<lambda>":
        value = factory()  # type: ignore[call-arg]
        return repr(value) if isinstance(value, (list, dict, int, float)) else "(set on creation)"
    return f"{name}()"


class PydanticFields(SphinxDirective):
    """A table of a pydantic model's fields: name, type, default, description."""

    required_arguments = 1
    option_spec: typing.ClassVar[dict[str, Any]] = {
        "env-prefix": directives.unchanged,
        "checksum": directives.unchanged,
    }

    def run(self) -> list[nodes.Node]:
        model = _import(self.arguments[0])
        prefix = self.options.get("env-prefix")
        covered = set(_import(self.options["checksum"])) if "checksum" in self.options else None
        header = ["field"]
        if prefix:
            header.append("environment variable")
        header += ["type", "default"]
        if covered is not None:
            header.append("checksum")
        header.append("description")
        rows: list[list[nodes.Node]] = []
        for name, info in model.model_fields.items():
            row: list[nodes.Node] = [nodes.literal(text=name)]
            if prefix:
                row.append(nodes.literal(text=prefix + name))
            row += [
                nodes.literal(text=_type_name(info.annotation)),
                nodes.literal(text=_default(info)),
            ]
            if covered is not None:
                row.append(nodes.Text("yes" if name in covered else ""))
            text = info.description or ""
            parsed, messages = self.state.inline_text(text, self.lineno)
            paragraph = nodes.paragraph("", "", *parsed)
            row.append(paragraph)
            row.extend(messages)
            rows.append(row)
        return [_table(header, rows)]


def _table(header: list[str], rows: list[list[nodes.Node]]) -> nodes.table:
    table = nodes.table(classes=["jfc-fields"])
    group = nodes.tgroup(cols=len(header))
    table += group
    for _ in header:
        group += nodes.colspec(colwidth=1)
    head = nodes.thead()
    group += head
    head += _row([nodes.Text(h) for h in header])
    body = nodes.tbody()
    group += body
    for cells in rows:
        body += _row(cells[: len(header)])
        for extra in cells[len(header) :]:  # system messages of the description
            body += _row([extra] + [nodes.Text("")] * (len(header) - 1))
    return table


def _row(cells: list[nodes.Node]) -> nodes.row:
    row = nodes.row()
    for cell in cells:
        entry = nodes.entry()
        entry += cell if isinstance(cell, nodes.paragraph) else nodes.paragraph("", "", cell)
        row += entry
    return row


def _drop_missing_optional_pages(app: Sphinx, docname: str, source: list[str]) -> None:
    """Leave pages that do not exist yet out of the root toctree (instead of a -W failure)."""
    if docname != app.config.root_doc:
        return
    srcdir = Path(app.srcdir)
    for page in OPTIONAL_PAGES:
        if not (srcdir / f"{page}.md").exists():
            logger.info("jfc_docs: %s.md does not exist yet; left out of the toctree", page)
            source[0] = re.sub(rf"(?m)^{re.escape(page)}\n", "", source[0])


def _reread_root(
    app: Sphinx, env: Any, added: set[str], changed: set[str], removed: set[str]
) -> list[str]:
    """Read the root page on every build: whether an optional page exists may have changed."""
    return [app.config.root_doc]


_LITERAL = re.compile(r"(``.*?``)")


def _escape_rst(line: str) -> str:
    """``*`` escaped outside inline literals (globs such as 'relax*' are no emphasis)."""
    parts = _LITERAL.split(line)
    return "".join(p if p.startswith("``") else p.replace("*", "\\*") for p in parts)


def _click_description(app: Sphinx, ctx: Any, lines: list[str]) -> None:
    """Escape globs, and turn a click ``\\b`` block of examples into a console code block."""
    out: list[str] = []
    examples = False
    for line in lines:
        if line.strip() == "| Examples:":
            out += ["Examples:", "", ".. code-block:: console", ""]
            examples = True
        elif examples and line.startswith("| "):
            out.append("   $ " + line[2:].strip())
        else:
            if examples:
                out.append("")
                examples = False
            out.append(_escape_rst(line))
    lines[:] = out


def _click_options(app: Sphinx, ctx: Any, lines: list[str]) -> None:
    lines[:] = [_escape_rst(line) for line in lines]


#: what a page must never show: a directive that was not parsed, an option mangled into a dash
RAW_DIRECTIVE = re.compile(r"(?m)^\s*\.\. [a-z][a-z:-]*::")
DASHED_OPTION = re.compile(r"[\u2013\u2014][a-z]")


def _check_rendered(app: Sphinx, doctree: nodes.document, docname: str) -> None:
    """Fail the build when a page shows raw reStructuredText or an en-dash option."""
    for node in doctree.findall(nodes.Text):
        text = node.astext()
        for pattern, what in (
            (RAW_DIRECTIVE, "a raw directive"),
            (DASHED_OPTION, "an option whose -- became a dash"),
        ):
            found = pattern.search(text)
            if found:
                raise ExtensionError(
                    f"{docname}: the rendered page shows {what}: {found.group(0).strip()!r} "
                    f"in {text[:80]!r}"
                )


def setup(app: Sphinx) -> dict[str, Any]:
    """Register the directive, the toctree filter, the click helpers and the page check."""
    app.add_directive("pydantic-fields", PydanticFields)
    app.connect("source-read", _drop_missing_optional_pages)
    app.connect("env-get-outdated", _reread_root)
    app.connect("doctree-resolved", _check_rendered)
    if "sphinx_click" in app.extensions or "sphinx_click" in app.config.extensions:
        app.connect("sphinx-click-process-description", _click_description)
        app.connect("sphinx-click-process-options", _click_options)
    return {"version": "1", "parallel_read_safe": True, "parallel_write_safe": True}
