"""The ``unicorn`` command (model_export.cli): ``data`` writes the unified log and prints
rows per task; bad arguments exit 2 with a message, never a traceback."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest

from app.core.catalogue import Catalogue
from app.core.context import TASKS
from model_export.cli import build_parser, main
from model_export.engagement_log import EngagementLog

MOVIELENS = Path(__file__).resolve().parents[2] / "shared" / "datasets" / "ml-latest-small"


def rows_printed(out: str) -> dict[str, tuple[int, int]]:
    """{task: (rows, positives)} from the table ``unicorn data`` prints."""
    table = {}
    for task in (*TASKS, "total"):
        match = re.search(rf"^{task}\s+(\d+)\s+(\d+)$", out, flags=re.MULTILINE)
        assert match, f"no line for {task} in:\n{out}"
        table[task] = (int(match[1]), int(match[2]))
    return table


def test_data_writes_the_log_and_prints_rows_per_task(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out_dir = tmp_path / "synthetic"
    assert main(["data", "--source", "synthetic", "--out", str(out_dir), "--seed", "3"]) == 0
    printed = rows_printed(capsys.readouterr().out)
    log = EngagementLog.load(out_dir / "engagements.npz")
    catalogue = Catalogue.load(out_dir / "catalogue.npz")
    assert len(catalogue) > 0 and np.all(np.isin(log.target_entity_id, catalogue.entity_id))
    for task in TASKS:
        rows = int(np.sum(log.task == task))
        assert printed[task] == (rows, int(log.label[log.task == task].sum()))
        assert rows > 0, task
    assert printed["total"] == (len(log), int(log.label.sum()))


def test_movielens_without_a_path_exits_2_with_a_message(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["data", "--source", "movielens", "--out", str(tmp_path / "ml")]) == 2
    err = capsys.readouterr().err
    assert err.strip() == "unicorn data: error: --path is required for source movielens"
    assert not (tmp_path / "ml").exists()


def test_movielens_with_a_wrong_path_exits_2_naming_the_file(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code = main(["data", "--source", "movielens", "--path", str(tmp_path), "--out", "x"])
    assert code == 2
    assert "movies.csv: file does not exist" in capsys.readouterr().err


def test_an_unknown_source_is_an_argument_error(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as info:
        main(["data", "--source", "imdb"])
    assert info.value.code == 2
    assert "invalid choice: 'imdb'" in capsys.readouterr().err


def test_a_command_is_required(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as info:
        main([])
    assert info.value.code == 2
    assert "required: command" in capsys.readouterr().err


def test_every_documented_command_parses() -> None:
    parser = build_parser()
    assert parser.parse_args(["build-bundle", "--quick"]).quick is True
    args = parser.parse_args(["evaluate", "--seeds", "7", "8", "--per-task", "50"])
    assert args.seeds == [7, 8] and args.per_task == 50
    assert parser.parse_args(["serve", "--port", "9000"]).port == 9000


@pytest.mark.slow
@pytest.mark.skipif(not MOVIELENS.is_dir(), reason=f"MovieLens data not at {MOVIELENS}")
def test_movielens_data_has_all_four_tasks(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code = main(["data", "--source", "movielens", "--path", str(MOVIELENS), "--out", str(tmp_path)])
    assert code == 0
    printed = rows_printed(capsys.readouterr().out)
    for task in TASKS:
        rows, positives = printed[task]
        assert rows > 0 and 0 < positives < rows, task
    assert (tmp_path / "engagements.npz").is_file() and (tmp_path / "catalogue.npz").is_file()
