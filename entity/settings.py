"""The entity's settings: one frozen value from the operator's flags and ``entity.toml`` to the ServerApp.

Every setting is one field of :class:`EntitySettings`, declared with :func:`setting` and its help
text. Everything else is derived from the fields: ``entity.serve``'s flags (``--name-with-dashes``)
and TOML keys (the field names), the type check of every value, and ``HOME/serverapp.json``, the
one serialised form (:meth:`EntitySettings.to_json` / :meth:`EntitySettings.from_json`, strict:
unknown or missing keys and wrong types are refused) in which the settings cross from
``entity.serve`` into the ServerApp process. That file, never the FAB, carries them: the FAB
reaches every owner and must say nothing about the entity's host. So adding a setting is adding
a field here (and reading it where it is used), not an edit in the CLI, the file writer, the
reader and the job.

Torch-free on purpose: ``entity.serve`` imports this and should start without loading torch.
"""

from __future__ import annotations

import dataclasses
import json
import typing
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from entity._typed import Scalar, check_value, is_path
from entity.sandbox import GiB, SandboxLimits
from protocol._files import atomic_write
from protocol.settings import SettingsError

DEFAULT_PORT = 9092
# The SuperLink's environment reaches the SuperExec and every flwr-serverapp it starts (plain
# Popen, no env= in flwr 1.41), so this is how the ServerApp finds its settings without the FAB.
SETTINGS_ENV = "BLINDPRUNE_ENTITY_SETTINGS"
SETTINGS_FILE = "serverapp.json"
STOP_FILE = "stopping"  # in the home: entity.serve asks the ServerApp's loop to tell the owners it stops

ItemParser = Callable[[str], tuple[str, str, Scalar]]


def setting(
    default: Any, help: str, *, metavar: str | None = None, flag: str | None = None, item: ItemParser | None = None, prune: bool = False
) -> Any:
    """One entity setting: its default and the help text its flag shows.

    ``flag`` replaces the derived ``--name-with-dashes``; ``item`` makes the flag repeatable,
    each use parsed into (table, key, value) and folded into the setting's nested table;
    ``prune`` marks an engine setting (``PruneConfig`` field) the operator sets for every job,
    passed on when it is not None.
    """
    metadata = {"help": help, "metavar": metavar, "flag": flag, "item": item, "prune": prune}
    if isinstance(default, dict):
        return field(default_factory=lambda: dict(default), metadata=metadata)
    return field(default=default, metadata=metadata)


def parse_recipe_option(text: str) -> tuple[str, str, Scalar]:
    """``RECIPE.NAME=VALUE`` -> (recipe, option, value); VALUE is a JSON scalar if it parses as one, else text."""
    target, sep, raw = text.partition("=")
    recipe, dot, name = target.partition(".")
    if not sep or not dot or not recipe.strip() or not name.strip():
        raise ValueError(f"expected RECIPE.NAME=VALUE (e.g. admm.admm_iters=50), got {text!r}")
    try:
        value = json.loads(raw)
    except ValueError:
        value = raw
    if not isinstance(value, (bool, int, float, str)):
        value = raw
    return recipe.strip(), name.strip(), value


@dataclass(frozen=True)
class EntitySettings:
    """Everything the operator sets for the entity service and the jobs its ServerApp runs.

    Defaults are what ``entity.serve`` does without flags or ``entity.toml``. The values are
    checked when the object is made (types against the annotations, then ranges and the
    combinations that cannot work), so a bad setting stops ``entity.serve`` with one line before
    anything starts; the recipe options are checked against the recipes there too
    (``entity.serve.load_config``), as that needs the engine.
    """

    host: str = setting("127.0.0.1", "address owners' SuperNodes connect to; serves the Fleet API only (default 127.0.0.1)")
    port: int = setting(DEFAULT_PORT, f"port owners' SuperNodes connect to (default {DEFAULT_PORT})")
    control_port: int = setting(0, "port of the Control and Runtime APIs, always on 127.0.0.1 (default: a free port)")
    home: Path = setting(Path("entity-home"), "service folder: keys/, owners/, nodes/, events.jsonl, Flower state (default ./entity-home)")
    owners: Path | None = setting(None, "folder of registered owner identity cards (default HOME/owners)")
    auth: bool = setting(False, "SuperNode authentication: admit only SuperNodes whose public keys are in --nodes (needs --tls-*)")
    nodes: Path | None = setting(None, "folder of owners' SuperNode public keys, *.pub, for --auth (default HOME/nodes)")
    recipe: str = setting("", "pruning recipe (default: the engine's benchmark winner)")
    recipe_options: dict[str, dict[str, Scalar]] = setting(
        {},
        "a recipe's own setting, e.g. admm.admm_iters=50 or refit.damping=0.01 (repeatable; TOML: a "
        "[entity.recipe_options.RECIPE] table); it applies whenever that recipe runs",
        flag="--recipe-option",
        metavar="RECIPE.NAME=VALUE",
        item=parse_recipe_option,
    )
    device: str = setting("auto", "torch device for pruning: auto (CUDA when present), cpu or cuda", prune=True)
    epochs: int | None = setting(None, "retraining epochs recommended to owners (default: the recipe's)")
    synthetic_images: int | None = setting(None, "synthetic images the pruning engine makes per job (default: the engine's)", prune=True)
    synthetic_steps: int | None = setting(None, "optimisation steps per synthetic batch (default: the engine's)", prune=True)
    prune_memory_gib: float = setting(
        SandboxLimits.memory_bytes / GiB,
        "memory limit of each job's pruning process, GiB (RLIMIT_DATA; default "
        f"{SandboxLimits.memory_bytes / GiB:g}; below ~1.5 it cannot even import torch)",
        metavar="GIB",
    )
    prune_timeout: float = setting(
        float(SandboxLimits.seconds), f"wall-clock limit of each job's pruning, seconds (default {SandboxLimits.seconds:g})", metavar="S"
    )
    workers: int = setting(0, "pruning jobs run at once, each in its own process (default: one per GPU with CUDA, else one per core)", metavar="N")
    max_queued: int = setting(16, "jobs that may wait for a worker; past that a new job is refused at once (default 16)", metavar="N")
    max_jobs_per_owner: int = setting(2, "jobs one owner may have queued or pruning at a time (default 2)", metavar="N")
    max_request_mib: float = setting(
        1024.0, "largest model request accepted, MiB (default 1024); a larger one is refused before it is sent", metavar="MIB"
    )
    ray: str = setting(
        "", "run each pruning job as a task on this existing Ray cluster, HOST:PORT of its head (needs the ray extra)", metavar="ADDRESS"
    )
    status_interval: float = setting(5.0, "seconds between the status messages each waiting owner gets (default 5)", metavar="S")
    start_timeout: float = setting(60.0, "seconds to wait for the SuperLink and ServerApp (default 60)")
    tls_cert: Path | None = setting(None, "PEM certificate for the SuperLink (enables TLS)")
    tls_key: Path | None = setting(None, "PEM private key for --tls-cert")
    tls_ca: Path | None = setting(None, "PEM CA certificate that signed --tls-cert")

    def __post_init__(self) -> None:
        hints = _hints()
        for f in fields(self):
            try:
                check_value(f.name, getattr(self, f.name), hints[f.name])
            except TypeError as exc:
                raise SettingsError(str(exc)) from None
        # A private copy: the settings are a value, not a view of the caller's dicts.
        object.__setattr__(self, "recipe_options", {name: dict(opts) for name, opts in self.recipe_options.items()})
        if (self.synthetic_images is not None and self.synthetic_images < 1) or (self.synthetic_steps is not None and self.synthetic_steps < 1):
            raise SettingsError("synthetic images and steps must be positive")
        if self.epochs is not None and self.epochs < 0:
            raise SettingsError(f"epochs must be 0 or more, got {self.epochs}")
        if not self.prune_memory_gib > 0 or not self.prune_timeout > 0:
            raise SettingsError("prune-memory-gib and prune-timeout must be positive")
        if self.workers < 0 or self.max_queued < 0 or self.max_jobs_per_owner < 1:
            raise SettingsError("--workers and --max-queued must be 0 or more (0 workers: sized to the machine), --max-jobs-per-owner at least 1")
        if not self.max_request_mib > 0 or not 0.1 <= self.status_interval <= 300:
            raise SettingsError("--max-request-mib must be positive and --status-interval within 0.1..300 seconds")
        if not 0 < self.port < 65536:
            raise SettingsError(f"port {self.port} is out of range")
        if not 0 <= self.control_port < 65536:
            raise SettingsError(f"control port {self.control_port} is out of range (0 picks a free one)")
        if self.control_port == self.port:
            raise SettingsError(f"--control-port must differ from --port {self.port}: owners must never reach the Control API")
        if (self.tls_cert is None) != (self.tls_key is None) or (self.tls_cert and self.tls_ca is None):
            raise SettingsError("TLS needs --tls-cert, --tls-key and --tls-ca together")
        if self.auth and not self.tls:
            raise SettingsError("--auth needs TLS: pass --tls-cert, --tls-key and --tls-ca too (Flower authenticates SuperNodes only over TLS)")

    # ------------------------------------------------------------------------- derived values

    @property
    def owners_dir(self) -> Path:
        return self.owners if self.owners is not None else self.home / "owners"

    @property
    def nodes_dir(self) -> Path:
        return self.nodes if self.nodes is not None else self.home / "nodes"

    @property
    def tls(self) -> bool:
        return self.tls_cert is not None

    @property
    def sandbox(self) -> SandboxLimits:
        """The limits of each job's pruning process (``entity.sandbox``)."""
        return SandboxLimits(memory_bytes=int(self.prune_memory_gib * GiB), seconds=self.prune_timeout)

    @property
    def max_request_bytes(self) -> int:
        return int(self.max_request_mib * 1024 * 1024)

    def worker_count(self, cuda_devices: int = 0) -> int:
        """``--workers``, or one per GPU (when pruning runs on CUDA) or per core."""
        from entity.workers import default_workers

        return self.workers or default_workers(cuda_devices if self.device != "cpu" else 0)

    def prune_options(self, recipe: str) -> dict[str, Any]:
        """The ``PruneConfig`` keywords this operator sets for a job that runs ``recipe`` (JSON values).

        The engine settings marked ``prune`` that are set, and that recipe's own options: options
        are kept per recipe because the owner may ask for any recipe, and one recipe's option is
        unknown to another.
        """
        values = {f.name: getattr(self, f.name) for f in fields(self) if f.metadata.get("prune") and getattr(self, f.name) is not None}
        values["options"] = dict(self.recipe_options.get(recipe, {}))
        return values

    def resolved(self) -> EntitySettings:
        """The same settings with absolute home and owners folders (the ServerApp runs elsewhere)."""
        return dataclasses.replace(self, home=self.home.resolve(), owners=self.owners_dir.resolve())

    # --------------------------------------------------------------------------- serialised form

    def to_json(self) -> dict[str, Any]:
        """Every setting as a JSON value (paths as text); :meth:`from_json` gives back an equal value."""
        out: dict[str, Any] = {}
        for f in fields(self):
            value = getattr(self, f.name)
            out[f.name] = str(value) if isinstance(value, Path) else json.loads(json.dumps(value))
        return out

    @classmethod
    def from_json(cls, data: Any) -> EntitySettings:
        """The settings :meth:`to_json` wrote; ``SettingsError`` for an unknown or missing key or a wrong type.

        Strict both ways: a key this version does not know may be a setting it would ignore, and
        a missing one would silently become a default the operator never chose.
        """
        if not isinstance(data, Mapping):
            raise SettingsError("entity settings must be a JSON object")
        names = [f.name for f in fields(cls)]
        unknown = sorted(set(data) - set(names))
        if unknown:
            raise SettingsError(f"unknown entity setting(s): {', '.join(map(str, unknown))}")
        missing = [name for name in names if name not in data]
        if missing:
            raise SettingsError(f"entity setting(s) missing: {', '.join(missing)}")
        hints = _hints()
        values: dict[str, Any] = {name: Path(value) if is_path(hints[name]) and isinstance(value, str) else value for name, value in data.items()}
        return cls(**values)

    @classmethod
    def path_settings(cls) -> list[str]:
        """The settings that hold paths (relative ones in a TOML file are relative to the file)."""
        hints = _hints()
        return [f.name for f in fields(cls) if is_path(hints[f.name])]

    @classmethod
    def type_of(cls, name: str) -> Any:
        """The annotated type of setting ``name`` (``int``, ``Path | None``...)."""
        return _hints()[name]


def _hints() -> dict[str, Any]:
    return typing.get_type_hints(EntitySettings)


def write_settings(path: Path, settings: EntitySettings) -> None:
    """Write ``settings`` (home and owners resolved) where the ServerApp reads them, private to this user."""
    text = json.dumps(settings.resolved().to_json(), indent=2, sort_keys=True)
    atomic_write(path, text.encode(), mode=0o600)


def read_settings(environ: Mapping[str, str]) -> EntitySettings:
    """The ServerApp's side of :func:`write_settings`: the file named by ``SETTINGS_ENV``."""
    location = environ.get(SETTINGS_ENV)
    if not location:
        raise SettingsError(f"{SETTINGS_ENV} is not set: the entity ServerApp runs only under `python -m entity.serve`")
    try:
        data = json.loads(Path(location).read_text())
    except OSError as exc:
        raise SettingsError(f"cannot read the ServerApp settings {location}: {exc.strerror}") from None
    except ValueError:
        raise SettingsError(f"ServerApp settings {location} are not JSON; restart `python -m entity.serve` to rewrite them") from None
    try:
        return EntitySettings.from_json(data)
    except SettingsError as exc:
        raise SettingsError(f"ServerApp settings {location}: {exc}; restart `python -m entity.serve` to rewrite them") from None
