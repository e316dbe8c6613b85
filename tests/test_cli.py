"""The console script, run in-process and as a real subprocess."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from mmrank.cli import main


def test_world_command(tmp_path: Path) -> None:
    out = tmp_path / "w"
    assert main(["world", "--seed", "1", "--out", str(out), "--users", "50", "--items", "40"]) == 0
    assert pq.read_table(out / "users.parquet").num_rows == 50
    assert pq.read_table(out / "items.parquet").num_rows == 40


def test_bad_data_path_is_a_clear_error(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    code = main(
        [
            "train",
            "--model",
            "camenn",
            "--data",
            str(tmp_path / "nope"),
            "--out",
            str(tmp_path / "r"),
        ]
    )
    assert code == 2
    assert "is not a world directory" in caplog.text


def test_console_script_help_does_not_import_torch() -> None:
    code = "import sys; from mmrank.cli import build_parser; build_parser(); assert 'torch' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True)


def test_train_flags_reach_the_training_settings() -> None:
    from mmrank.cli import _settings, build_parser

    args = build_parser().parse_args(
        ["train", "--model", "em3", "--data", "w", "--out", "r", "--epochs", "9",
         "--lora-epochs", "3", "--align-steps", "7"]
    )  # fmt: skip
    s = _settings(args)
    assert (s.epochs, s.lora_epochs, s.align_steps) == (9, 3, 7)
    default = _settings(build_parser().parse_args(["train", "--model", "em3", "--data", "w",
                                                   "--out", "r"]))  # fmt: skip
    assert (default.lora_epochs, default.align_steps) == (2, 500)
