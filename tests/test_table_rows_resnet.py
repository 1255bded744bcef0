"""The Table 1 rows with ResNet backbones (CCF-Net and SimpleBaseline, with and without MSC) train two steps and
evaluate through `run.py` (tests/table_rows.py)."""

from __future__ import annotations

import pytest

import table_rows


@pytest.fixture(scope="module")
def row_data_dir(tmp_path_factory) -> str:
  return table_rows.build_data(tmp_path_factory)


@pytest.mark.slow
@pytest.mark.parametrize("row", table_rows.params(resnet=True))
def test_row_config_trains_through_run_py(row, row_data_dir, tmp_path):
  table_rows.check_row_trains(row, row_data_dir, tmp_path)
