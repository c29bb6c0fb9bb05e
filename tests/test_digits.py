"""The digits example: a remote custom layer trains exactly like the same layer locally."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

from gradserve.client import GradientClient

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "examples"))
import digits  # noqa: E402


def test_remote_training_matches_local(client: GradientClient, capsys: pytest.CaptureFixture[str]) -> None:
    result = digits.compare(client, epochs=2)
    assert result["remote"] == pytest.approx(result["local"], rel=1e-5)
    assert result["remote"][1] < result["remote"][0] < 2.5  # it learns: ln(10) = 2.30 at chance
    assert result["remote_acc"] > 0.8
    assert "remote loss" in capsys.readouterr().out
