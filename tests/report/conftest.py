"""The fake_root fixture: report_fakeroot's made-up runs root in a temporary folder."""
from __future__ import annotations

import pytest

from report_fakeroot import write_root  # tests/report is on sys.path (pytest's rootdir-less import)


@pytest.fixture
def fake_root(tmp_path):
    root = tmp_path / "runs"
    root.mkdir()
    write_root(root)
    return root
