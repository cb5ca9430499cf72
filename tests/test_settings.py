"""Settings files: relative paths, flags over the file, unknown keys refused."""
from __future__ import annotations

import argparse
from pathlib import Path

import pytest

from protocol.settings import SettingsError, merge_settings


def _args(**kw) -> argparse.Namespace:
    return argparse.Namespace(**{"config": None, "rate": None, "data": None, **kw})


def test_file_paths_are_relative_to_the_file_and_flags_win(tmp_path):
    (tmp_path / "conf").mkdir()
    (tmp_path / "conf" / "owner.toml").write_text('[owner]\ndata = "private"\nrate = 4\n')
    data = merge_settings(_args(config=tmp_path / "conf" / "owner.toml", rate=16.0), section="owner",
                          default_file="owner.toml", known={"data", "rate"}, path_keys=("data",))
    assert data == {"data": tmp_path / "conf" / "private", "rate": 16.0}


def test_unknown_setting_and_bad_toml_are_refused(tmp_path):
    (tmp_path / "a.toml").write_text('[owner]\nrat = 4\n')
    with pytest.raises(SettingsError, match="unknown setting.*rat"):
        merge_settings(_args(config=tmp_path / "a.toml"), section="owner", default_file="owner.toml",
                       known={"rate"}, path_keys=())
    (tmp_path / "b.toml").write_text('[owner\n')
    with pytest.raises(SettingsError, match="b.toml"):
        merge_settings(_args(config=tmp_path / "b.toml"), section="owner", default_file="owner.toml",
                       known={"rate"}, path_keys=())
    with pytest.raises(SettingsError, match="does not exist"):
        merge_settings(_args(config=tmp_path / "none.toml"), section="owner", default_file="owner.toml",
                       known={"rate"}, path_keys=())


def test_default_file_in_the_working_directory(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    Path("entity.toml").write_text('[entity]\nport = 9999\n')
    assert merge_settings(_args(), section="entity", default_file="entity.toml", known={"port"}, path_keys=()) == {"port": 9999}
