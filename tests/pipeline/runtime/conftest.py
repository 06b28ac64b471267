"""Every test here runs in its own folder: MLflow puts a SQLite store's artifacts under ./mlruns."""
import pytest


@pytest.fixture(autouse=True)
def in_tmp_path(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
