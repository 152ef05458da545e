"""Files a user names that are not what the command reads (a folder, a binary or UTF-16 file, a
byte-order mark, an interpolation to no setting): one clear ``selfsup: error:`` line naming the
file or setting and what to do (exit 2), no traceback, before any data is decoded."""

from __future__ import annotations

from pathlib import Path

import pytest

from selfsup.cli import main
from selfsup.commands.table import RESULT_FIELDS, append_results, check_results_csv
from selfsup.errors import DataError


@pytest.fixture
def cli(capsys):
    """``selfsup *argv`` in-process: (exit status, stdout, stderr)."""

    def call(*argv: str | Path) -> tuple[int, str, str]:
        capsys.readouterr()
        rc = main([str(a) for a in argv])
        out, err = capsys.readouterr()
        return rc, out, err

    return call


# ---------------------------------------------------------------------------- results CSV
def test_table_of_a_folder_names_the_csv_inside_it(tmp_path, cli) -> None:
    runs = tmp_path / "runs"
    append_results(runs / "results.csv", [dict.fromkeys(RESULT_FIELDS, "1") | {"metric": "top1"}])
    rc, _, err = cli("table", runs)  # `selfsup table runs`: the folder, not its CSV
    assert rc == 2 and "Traceback" not in err
    assert f"{runs} is a folder" in err and str(runs / "results.csv") in err
    rc, _, err = cli("table", runs / "results.csv")
    assert rc == 0, err


def test_a_binary_results_csv_is_named_not_a_decode_traceback(tmp_path, cli) -> None:
    sheet = tmp_path / "results.csv"
    sheet.write_bytes(b"PK\x03\x04\xff\xfe\x00binary spreadsheet")  # an .xlsx saved as .csv
    rc, _, err = cli("table", sheet)
    assert rc == 2 and "Traceback" not in err
    assert f"{sheet} is not a results CSV" in err and "not text" in err
    with pytest.raises(DataError, match="pass another --results-csv"):
        check_results_csv(sheet)  # eval's check of --results-csv, before any work


def test_a_results_csv_option_that_is_a_folder_says_to_name_a_file(tmp_path) -> None:
    with pytest.raises(DataError, match=r"is a folder, not a results CSV; pass the file, e\.g\."):
        check_results_csv(tmp_path)
