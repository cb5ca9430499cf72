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
    data = merge_settings(
        _args(config=tmp_path / "conf" / "owner.toml", rate=16.0),
        section="owner",
        default_file="owner.toml",
        known={"data", "rate"},
        path_keys=("data",),
    )
    assert data == {"data": tmp_path / "conf" / "private", "rate": 16.0}


def test_unknown_setting_and_bad_toml_are_refused(tmp_path):
    (tmp_path / "a.toml").write_text("[owner]\nrat = 4\n")
    with pytest.raises(SettingsError, match="unknown setting.*rat"):
        merge_settings(_args(config=tmp_path / "a.toml"), section="owner", default_file="owner.toml", known={"rate"}, path_keys=())
    (tmp_path / "b.toml").write_text("[owner\n")
    with pytest.raises(SettingsError, match="b.toml"):
        merge_settings(_args(config=tmp_path / "b.toml"), section="owner", default_file="owner.toml", known={"rate"}, path_keys=())
    with pytest.raises(SettingsError, match="does not exist"):
        merge_settings(_args(config=tmp_path / "none.toml"), section="owner", default_file="owner.toml", known={"rate"}, path_keys=())


def test_default_file_in_the_working_directory(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    Path("entity.toml").write_text("[entity]\nport = 9999\n")
    assert merge_settings(_args(), section="entity", default_file="entity.toml", known={"port"}, path_keys=()) == {"port": 9999}


# --- the entity's settings: one value from entity.serve's flags and TOML to the ServerApp ------------------------


def _entity_settings():
    from entity.settings import EntitySettings

    return EntitySettings(
        home=Path("/srv/entity"),
        port=9100,
        recipe="admm",
        epochs=2,
        synthetic_images=32,
        recipe_options={"admm": {"admm_iters": 5, "admm_optimiser": "sgd"}, "refit": {"rescale": False}},
        prune_memory_gib=2.5,
        prune_timeout=90.0,
    )


def test_entity_settings_round_trip_through_their_json():
    import json

    from entity.settings import EntitySettings

    settings = _entity_settings()
    text = json.dumps(settings.to_json())
    assert EntitySettings.from_json(json.loads(text)) == settings
    assert EntitySettings.from_json(EntitySettings().to_json()) == EntitySettings()


def test_entity_settings_json_refuses_unknown_and_missing_keys_and_wrong_types():
    from entity.settings import EntitySettings

    data = _entity_settings().to_json()
    with pytest.raises(SettingsError, match="unknown entity setting.*prune_memroy_gib"):
        EntitySettings.from_json({**data, "prune_memroy_gib": 4})
    with pytest.raises(SettingsError, match="missing: prune_timeout"):
        EntitySettings.from_json({k: v for k, v in data.items() if k != "prune_timeout"})
    with pytest.raises(SettingsError, match="prune_memory_gib must be a number, got '8'"):
        EntitySettings.from_json({**data, "prune_memory_gib": "8"})
    with pytest.raises(SettingsError, match="epochs must be an integer or none, got True"):
        EntitySettings.from_json({**data, "epochs": True})
    with pytest.raises(SettingsError, match="recipe_options must be a table"):
        EntitySettings.from_json({**data, "recipe_options": {"admm": {"admm_iters": [5]}}})
    with pytest.raises(SettingsError, match="must be a JSON object"):
        EntitySettings.from_json([data])


def _serve_config(argv: list[str]):
    from entity.serve import _parser, load_config

    return load_config(_parser().parse_args(argv))


def test_entity_toml_keys_and_flags_fill_the_settings(tmp_path):
    from entity.sandbox import GiB, SandboxLimits

    (tmp_path / "entity.toml").write_text(
        '[entity]\nhome = "home"\nrecipe = ""\nepochs = 2\nsynthetic_images = 64\nsynthetic_steps = 50\n'
        "start_timeout = 120.0\nprune_timeout = 90\n[entity.recipe_options.refit]\ndamping = 0.01\n"
    )
    config = _serve_config(
        [
            "--config",
            str(tmp_path / "entity.toml"),
            "--prune-memory-gib",
            "3",
            "--recipe-option",
            "admm.admm_iters=5",
            "--recipe-option",
            "admm.admm_optimiser=sgd",
        ]
    )
    assert config.home == (tmp_path / "home").resolve() and config.recipe == "" and config.epochs == 2
    assert (config.synthetic_images, config.synthetic_steps, config.start_timeout) == (64, 50, 120.0)
    # A flag replaces the file's table as a whole, as every flag replaces its key.
    assert config.recipe_options == {"admm": {"admm_iters": 5, "admm_optimiser": "sgd"}}
    assert config.sandbox == SandboxLimits(memory_bytes=3 * GiB, seconds=90)
    assert config.prune_options("admm") == {
        "device": "auto",
        "synthetic_images": 64,
        "synthetic_steps": 50,
        "options": {"admm_iters": 5, "admm_optimiser": "sgd"},
    }
    assert config.prune_options("refit")["options"] == {}


def test_entity_serve_refuses_a_recipe_option_naming_the_known_ones(tmp_path, capsys):
    from entity.serve import ServeError

    with pytest.raises(ServeError) as info:
        _serve_config(["--home", str(tmp_path), "--recipe-option", "refit.dampin=0.1"])
    assert "recipe 'refit' has no option 'dampin'" in str(info.value)
    assert all(name in str(info.value) for name in ("damping", "refit_choice", "allocation", "rescale"))
    with pytest.raises(ServeError, match="unknown recipe 'nope'"):
        _serve_config(["--home", str(tmp_path), "--recipe-option", "nope.x=1"])
    with pytest.raises(SystemExit) as usage:
        _serve_config(["--home", str(tmp_path), "--recipe-option", "admm_iters=5"])
    assert usage.value.code == 2 and "RECIPE.NAME=VALUE" in capsys.readouterr().err
    with pytest.raises(ServeError, match="prune-memory-gib and prune-timeout must be positive"):
        _serve_config(["--home", str(tmp_path), "--prune-timeout", "0"])


def test_a_new_operator_setting_reaches_the_serverapps_settings_and_sandbox_limits(tmp_path):
    from entity.sandbox import GiB, SandboxLimits
    from entity.server_app import entity_from_config
    from entity.settings import SETTINGS_ENV, SETTINGS_FILE, write_settings
    from protocol.keys import init_identity

    home = tmp_path / "home"
    init_identity(home / "keys", "entity")
    config = _serve_config(
        ["--home", str(home), "--prune-memory-gib", "2", "--prune-timeout", "75", "--recipe", "admm", "--recipe-option", "admm.admm_iters=5"]
    )
    write_settings(home / SETTINGS_FILE, config)  # what EntityService.start writes before the SuperLink starts
    jobs = entity_from_config({}, {SETTINGS_ENV: str(home / SETTINGS_FILE)})
    assert jobs.settings == config.resolved()
    assert jobs.settings.sandbox == SandboxLimits(memory_bytes=2 * GiB, seconds=75)
    assert jobs.settings.prune_options("admm")["options"] == {"admm_iters": 5}
    assert oct((home / SETTINGS_FILE).stat().st_mode & 0o777) == "0o600"
    (home / SETTINGS_FILE).write_text((home / SETTINGS_FILE).read_text().replace('"prune_timeout"', '"prune_timeuot"'))
    with pytest.raises(SettingsError, match="unknown entity setting.*prune_timeuot.*restart"):
        entity_from_config({}, {SETTINGS_ENV: str(home / SETTINGS_FILE)})
