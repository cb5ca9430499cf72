"""``python -m owner.privacy audit --out OUT``: membership-inference audit of the owner's models.

Reads the same settings as ``owner.run`` (``owner.toml`` in the working directory or
``--config``, flags override): the model factory and weights (the dense model), the data folder
(members: its training split, non-members: its held-out split), the input specification and the
owner's keys. Audits the dense model, ``OUT/received`` (the pruned model as received) and
``OUT/final`` (the final model), writes ``OUT/privacy/roc.png`` and ``OUT/privacy/audit.json``,
and appends a local-only ``privacy.audit`` event to ``OUT/audit.jsonl`` followed by a signed
checkpoint, so that ``python -m owner.audit report`` shows the results to the officer.

A command of its own rather than a subcommand of ``owner.audit``: ``owner.audit`` only reads a
log and needs nothing but the cards (an officer runs it anywhere), while this one needs the
owner's data, model code and signing key, and trains models for minutes. Nothing is sent.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

PROG = "owner.privacy"
_PATH_KEYS = ("data", "weights", "entity_card", "keys", "out", "tls_ca", "node_key")
_REQUIRED = ("out", "data", "model", "input_shape", "mean", "std")


def _numbers(kind: type) -> Any:
    def parse(text: str) -> tuple:
        try:
            return tuple(kind(x) for x in text.lower().replace("x", ",").split(",") if x.strip())
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a comma-separated list of {kind.__name__} values") from None

    return parse


def _json_object(text: str) -> dict[str, Any]:
    try:
        value = json.loads(text)
    except (ValueError, RecursionError):
        value = None
    if not isinstance(value, dict):
        raise argparse.ArgumentTypeError(f"{text[:80]!r} is not a JSON object")
    return value


def _models(text: str) -> tuple[str, ...]:
    from owner.privacy.auditing import MODEL_NAMES

    names = tuple(n.strip() for n in text.split(",") if n.strip())
    bad = [n for n in names if n not in MODEL_NAMES]
    if bad or not names:
        raise argparse.ArgumentTypeError(f"unknown model {', '.join(bad) or text!r}: choose from {', '.join(MODEL_NAMES)}")
    return names


def _parser() -> argparse.ArgumentParser:
    from owner.privacy.auditing import AuditSettings

    d = AuditSettings()
    parser = argparse.ArgumentParser(prog="python -m owner.privacy", description="Membership-inference audit of the owner's models (local only).")
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("audit", help="attack the dense, pruned and final models; record the results in the audit trail")
    p.add_argument("--config", type=Path, help="owner.run's TOML settings (default: ./owner.toml if present)")
    p.add_argument("--out", type=Path, help="owner.run's output folder (holds received/, final/ and audit.jsonl)")
    p.add_argument("--data", type=Path, help="the private data folder owner.run used")
    p.add_argument("--model", help="model factory, package.module:function")
    p.add_argument("--model-kwargs", type=_json_object, help="its keyword arguments, as JSON")
    p.add_argument("--weights", type=Path, help="the dense model's weights (.safetensors or a local .pt state dict)")
    p.add_argument("--input-shape", type=_numbers(int), help="model input C,H,W")
    p.add_argument("--mean", type=_numbers(float), help="normalisation mean per channel")
    p.add_argument("--std", type=_numbers(float), help="normalisation std per channel")
    p.add_argument("--channel-order", choices=["L", "RGB", "BGR"])
    p.add_argument("--eval-fraction", type=float, help="held-out fraction for a single-folder ImageFolder (as owner.run)")
    p.add_argument("--keys", type=Path, help="owner key folder (signs the audit checkpoint)")
    p.add_argument("--models", type=_models, default=None, help="which models to audit (default dense,pruned,final)")
    p.add_argument("--reference-models", type=int, default=d.reference_models, help=f"reference models to train (default {d.reference_models})")
    p.add_argument("--reference-epochs", type=int, default=d.reference_epochs, help=f"epochs per reference model (default {d.reference_epochs})")
    p.add_argument(
        "--reference-images",
        type=int,
        default=d.reference_images,
        help=f"at most this many images per reference model (default {d.reference_images})",
    )
    p.add_argument("--members", type=int, default=d.members, help=f"at most this many members and as many non-members (default {d.members})")
    p.add_argument("--population", type=int, default=d.population, help=f"RMIA population images (default {d.population})")
    p.add_argument("--bootstrap", type=int, default=d.bootstrap, help=f"bootstrap rounds for the 95%% intervals (default {d.bootstrap})")
    p.add_argument("--seed", type=int, help="seed for the split, reference models and bootstrap (default 0)")
    p.add_argument("--device", help="torch device (default cpu)")
    p.add_argument("--quiet", action="store_true", help="no progress display")
    return parser


def _settings(args: argparse.Namespace) -> dict[str, Any]:
    from owner.privacy.auditing import PrivacyAuditError
    from owner.run import OwnerConfig
    from protocol.settings import SettingsError, merge_settings

    try:
        data = merge_settings(args, section="owner", default_file="owner.toml", known=OwnerConfig.__dataclass_fields__, path_keys=_PATH_KEYS)
    except SettingsError as exc:
        raise PrivacyAuditError(str(exc)) from None
    missing = [key for key in _REQUIRED if data.get(key) in (None, "", ())]
    if missing:
        flag = "--" + missing[0].replace("_", "-")
        raise PrivacyAuditError(f"missing {flag} (or `{missing[0]}` in owner.toml): the audit uses owner.run's settings")
    return data


def _targets(conf: dict[str, Any], names: tuple[str, ...]) -> tuple[list[Any], Any]:
    """The audited models and a factory for fresh reference models of the same architecture."""
    from owner.model import build_model, load_weights
    from owner.privacy.auditing import MODEL_TITLES, PrivacyAuditError, Target, file_sha256, state_sha256
    from owner.retrain import apply_masks
    from protocol.artifact import MASKS_FILE, WEIGHTS_FILE, load_model_dir, load_tensors

    out = Path(conf["out"])

    def factory() -> Any:
        return build_model(conf["model"], conf.get("model_kwargs") or {})

    targets = []
    for name in names:
        if name == "dense":
            model = factory()
            weights = conf.get("weights")
            if weights is not None:
                load_weights(model, Path(weights))
            targets.append(
                Target("dense", model.eval(), file_sha256(weights) if weights else state_sha256(model.state_dict()), MODEL_TITLES["dense"])
            )
        elif name == "pruned":
            folder = out / "received"
            if not (folder / WEIGHTS_FILE).is_file():
                raise PrivacyAuditError(
                    f"{folder / WEIGHTS_FILE} not found: run owner.run with --out {out} first, or leave it out with --models dense,final"
                )
            model = factory()
            try:
                model.load_state_dict(load_tensors((folder / WEIGHTS_FILE).read_bytes()))
            except RuntimeError as exc:
                raise PrivacyAuditError(f"{folder / WEIGHTS_FILE} does not fit --model {conf['model']}: {str(exc).splitlines()[0]}") from None
            if (folder / MASKS_FILE).is_file():
                apply_masks(model, load_tensors((folder / MASKS_FILE).read_bytes()))
            targets.append(Target("pruned", model.eval(), file_sha256(folder / WEIGHTS_FILE), MODEL_TITLES["pruned"]))
        else:
            folder = out / "final"
            if not (folder / WEIGHTS_FILE).is_file():
                raise PrivacyAuditError(
                    f"{folder} holds no final model: run owner.run with --out {out} first, or leave it out with --models dense,pruned"
                )
            program, _ = load_model_dir(folder)
            targets.append(Target("final", program.module(), file_sha256(folder / WEIGHTS_FILE), MODEL_TITLES["final"]))
    return targets, factory


def _progress_bar(console: Any) -> tuple[Any, Any]:
    """One bar per stage (each reference model, then each audited model), kept on screen when
    done so that the officer's operator sees how long each took."""
    from rich import progress as p

    columns = [p.SpinnerColumn(finished_text="[green]done[/]"), p.TextColumn("{task.description}"), p.BarColumn(), p.MofNCompleteColumn()]
    bar = p.Progress(*columns, p.TimeElapsedColumn(), p.TimeRemainingColumn(), console=console, disable=console.quiet)
    tasks: dict[str, Any] = {}

    def update(stage: str, done: int, total: int) -> None:
        if stage not in tasks:
            tasks[stage] = bar.add_task(stage, total=total)
        bar.update(tasks[stage], completed=done, total=total)

    return bar, update


def _cmd_audit(args: argparse.Namespace) -> int:
    from rich.console import Console
    from rich.table import Table
    from rich.text import Text

    from owner.data import load_private_data
    from owner.privacy.auditing import EVENT, MODEL_NAMES, AuditSettings, event_details, held_out_accuracy, run_audit, write_outputs
    from owner.privacy.reading import plain_reading, summary_rows
    from protocol.audit import AuditLog
    from protocol.display import printable
    from protocol.keys import load_identity
    from protocol.spec import InputSpec

    console = Console(stderr=True, quiet=args.quiet)
    conf = _settings(args)
    settings = AuditSettings(
        reference_models=args.reference_models,
        reference_epochs=args.reference_epochs,
        reference_images=args.reference_images,
        members=args.members,
        population=args.population,
        bootstrap=args.bootstrap,
        seed=conf.get("seed", 0),
        device=conf.get("device", "cpu"),
    )
    out = Path(conf["out"])
    log_path = out / "audit.jsonl"
    if not log_path.is_file():
        raise FileNotFoundError(2, "no audit log (run owner.run with this --out first)", str(log_path))
    keys = Path(conf.get("keys") or "owner-keys")
    if not (keys / "card.json").is_file():
        raise FileNotFoundError(2, "no owner keys there (pass --keys, the folder owner.run used)", str(keys))
    identity = load_identity(keys)
    shape = tuple(conf["input_shape"])
    channel_order = conf.get("channel_order") or ("L" if shape[0] == 1 else "RGB")
    spec = InputSpec(shape, tuple(conf["mean"]), tuple(conf["std"]), channel_order)
    data = load_private_data(Path(conf["data"]), spec, eval_fraction=conf.get("eval_fraction", 0.1), seed=conf.get("seed", 0))
    targets, factory = _targets(conf, args.models or MODEL_NAMES)
    bar, update = _progress_bar(console)
    with bar:
        result = run_audit(
            targets, factory, data.train, data.test, settings, accuracy_of=held_out_accuracy(data.test, settings.device), progress=update
        )
    files = write_outputs(result, out)
    details = event_details(result, files)
    with AuditLog.open(log_path, identity) as log:
        log.append(EVENT, details)
        log.checkpoint()
    table = Table(title="Membership inference (AUC and TPR at 0.1% FPR, 95% intervals)")
    for column in ("model", "accuracy", "attack", "AUC", "balanced acc.", "TPR @ 1% FPR", "TPR @ 0.1% FPR"):
        table.add_column(column, no_wrap=column in ("model", "attack"))
    for row in summary_rows(details):
        table.add_row(*(Text(printable(cell)) for cell in row))
    console.print(table)
    for line in plain_reading(details):
        console.print(Text(printable(line, limit=1000)))
    console.print(
        f"written: {out / 'privacy'} (roc.png, audit.json); event {EVENT} appended to {log_path} and checkpointed", markup=False, highlight=False
    )
    print(json.dumps({"audit_log": str(log_path.resolve()), **{name: str((out / name).resolve()) for name in files}}))
    return 0


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    from owner.data import DataError
    from owner.model import ModelError
    from owner.privacy.auditing import PrivacyAuditError
    from owner.retrain import MaskError
    from protocol.artifact import ArtifactError
    from protocol.cli import run_cli
    from protocol.spec import SpecError

    return run_cli(PROG, lambda: _cmd_audit(args), errors=(PrivacyAuditError, DataError, ModelError, MaskError, ArtifactError, SpecError))


if __name__ == "__main__":
    sys.exit(main())
