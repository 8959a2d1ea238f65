"""Fixtures of the FireWorks manager tests."""

from __future__ import annotations

from typing import TYPE_CHECKING

import pytest

from tests.managers.fw_site import FireWorksSite

if TYPE_CHECKING:
    from pathlib import Path

    from tests.conftest import Counts


@pytest.fixture
def fw_site(tmp_path: Path, counts: Counts) -> FireWorksSite:
    """A FireWorks site under ``tmp_path/fw`` whose processes count job executions into
    ``counts`` and use this test's cache (``isolated_cache``): the environment they inherit is
    taken once both are set."""
    del counts  # requested for its JFC_COUNTS_FILE, which the site's processes inherit
    return FireWorksSite(tmp_path / "fw")
