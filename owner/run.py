"""``python -m owner.run --data ./private``: the data owner's whole job, from dense model to final model.

Exports the owner's model, sends it (and nothing else) to the pinned compression entity through
the owner's own SuperNode and executor, receives pruned weights and the mask, retrains on the
private data with the mask, evaluates, and writes the final model, a summary and the audit log.
Settings come from ``owner.toml`` in the working directory (or ``--config``); flags override it.
Exit 0 on success; 1 with a one-line reason on any failure; 2 on bad usage.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from owner.config import DEFAULT_OUT, OwnerConfig, OwnerError
from owner.stages import check, run

__all__ = ["OwnerConfig", "OwnerError", "check", "main", "print_summary", "run"]

PROG = "owner.run"
FAILURE_FILE = "failure.json"


def _floats(text: str) -> tuple[float, ...]:
    try:
        return tuple(float(x) for x in text.split(",") if x.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a comma-separated list of numbers") from None


def _shape(text: str) -> tuple[int, ...]:
    try:
        return tuple(int(x) for x in text.lower().replace("x", ",").split(",") if x.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a shape like 1,28,28") from None


def _kwargs(text: str) -> dict[str, Any]:
    try:
        value = json.loads(text)
    except (ValueError, RecursionError):
        raise argparse.ArgumentTypeError(f"{text[:80]!r} is not a JSON object") from None
    if not isinstance(value, dict):
        raise argparse.ArgumentTypeError(f"{text!r} is not a JSON object")
    return value


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m owner.run", description=__doc__.splitlines()[0])
    p.add_argument("--config", type=Path, help="TOML settings file (default: ./owner.toml if present)")
    p.add_argument("--data", type=Path, help="private data folder (ImageFolder tree or FashionMNIST/MNIST/CIFAR10 raw files)")
    p.add_argument("--model", help="model factory, package.module:function (e.g. torchvision.models:resnet18)")
    p.add_argument("--model-kwargs", type=_kwargs, help="keyword arguments for the factory, as JSON (e.g. '{\"num_classes\": 10}')")
    p.add_argument("--weights", type=Path, help="pre-trained weights: .safetensors (or a local .pt state dict)")
    p.add_argument("--input-shape", type=_shape, help="model input C,H,W (e.g. 1,28,28)")
    p.add_argument("--mean", type=_floats, help="normalisation mean per channel (e.g. 0.286)")
    p.add_argument("--std", type=_floats, help="normalisation std per channel (e.g. 0.353)")
    p.add_argument("--channel-order", choices=["L", "RGB", "BGR"], help="channel order (default L for 1 channel, else RGB)")
    p.add_argument("--entity", help="entity address host:port (default 127.0.0.1:9092)")
    p.add_argument("--entity-card", type=Path, help="the entity's identity card to pin (card.json)")
    p.add_argument("--keys", type=Path, help="owner key folder (created if missing; default ./owner-keys)")
    p.add_argument("--rate", type=float, help="target conv compression rate (default 8, or the --model-rate when one is given)")
    p.add_argument(
        "--model-rate",
        type=float,
        help="target whole-model compression rate over every conv and linear weight; also prunes 1x1 convs and linear layers (whole input columns)",
    )
    p.add_argument("--skip", action="append", dest="skip_layers", metavar="WEIGHT", help="conv weight to leave dense (repeatable)")
    p.add_argument("--recipe", help="ask the entity for a pruning recipe (default: the entity's)")
    p.add_argument("--epochs", type=int, help="retraining epochs (default: the entity's recipe)")
    p.add_argument("--batch-size", type=int, help="retraining batch size (default: the recipe's)")
    p.add_argument("--max-epochs", type=int, help="refuse an entity recipe with more retraining epochs (default 50)")
    p.add_argument("--max-batch-size", type=int, help="refuse an entity recipe with a larger batch size (default 4096)")
    p.add_argument("--train-limit", type=int, help="retrain on at most this many training images")
    p.add_argument("--eval-fraction", type=float, help="held-out fraction for a single-folder ImageFolder (default 0.1)")
    p.add_argument("--out", type=Path, help=f"output folder (default ./{DEFAULT_OUT})")
    p.add_argument("--connect-timeout", type=float, help="seconds to reach the entity and get its offer (default 30)")
    p.add_argument("--timeout", type=float, help="seconds for the whole exchange with the entity (default 1800)")
    p.add_argument("--stall-timeout", type=float, help="seconds without any signed status from the entity before giving up (default 60)")
    p.add_argument("--check", action="store_true", help="dry run: every check, the plan, and a signed hello to the entity; the model is not sent")
    p.add_argument("--resume", type=Path, metavar="OUT", help="continue the unfinished job in OUT with the settings it was started with")
    p.add_argument("--device", help="torch device for retraining (cpu or cuda)")
    p.add_argument("--seed", type=int, help="seed for data order (default 0)")
    p.add_argument("--tls-ca", type=Path, help="CA certificate to reach an entity that serves TLS")
    p.add_argument("--node-key", type=Path, help="SuperNode private key for an entity that runs --auth (give the entity its .pub; needs --tls-ca)")
    p.add_argument(
        "--mia-defence",
        action="store_true",
        default=None,
        help="retrain with the membership-inference defence (owner.retrain.MembershipDefence); "
        "--mia-defence-images training images are kept out of retraining as its reference set",
    )
    p.add_argument("--mia-defence-images", type=int, help="training images held back as the defence's non-members (default 1000)")
    p.add_argument("--quiet", action="store_true", help="no progress display")
    return p


# What every run needs; the rest has defaults. All that are missing are named at once.
REQUIRED_FLAGS = (
    ("data", "--data"),
    ("model", "--model"),
    ("entity_card", "--entity-card"),
    ("input_shape", "--input-shape"),
    ("mean", "--mean"),
    ("std", "--std"),
)
_PATH_KEYS = ("data", "weights", "entity_card", "keys", "out", "tls_ca", "node_key")


def load_config(args: argparse.Namespace) -> OwnerConfig:
    from protocol.settings import SettingsError, merge_settings

    try:
        data = merge_settings(args, section="owner", default_file="owner.toml", known=OwnerConfig.__dataclass_fields__, path_keys=_PATH_KEYS)
    except SettingsError as exc:
        raise OwnerError(str(exc)) from None
    resume = getattr(args, "resume", None)
    if resume is not None:
        from owner.job_state import JobStateError, read_state

        try:
            state = read_state(resume)
        except JobStateError as exc:
            raise OwnerError(str(exc)) from None
        if state is None:
            raise OwnerError(f"{resume} holds no unfinished job to resume (no job.json); run without --resume to start one")
        stored = {k: v for k, v in state.config.items() if k in OwnerConfig.__dataclass_fields__}
        for key in _PATH_KEYS:
            if stored.get(key) is not None:
                stored[key] = Path(stored[key])
        data = {**stored, **data, "out": resume, "resume": True}
    missing = [flag for key, flag in REQUIRED_FLAGS if data.get(key) in (None, "", ())]
    if missing:
        raise OwnerError(
            f"missing {', '.join(missing)} (flags, or keys in owner.toml); a complete command is "
            "`python -m owner.run --data ./private --model torchvision.models:resnet18 --model-kwargs '{\"num_classes\": 10}' "
            "--weights resnet18.pt --input-shape 3,32,32 --mean 0.5,0.5,0.5 --std 0.25,0.25,0.25 --entity-card entity-card.json` "
            "(README, Quick start)"
        )
    for key in ("input_shape", "mean", "std", "skip_layers"):
        if key in data:
            data[key] = tuple(data[key])
    if data.get("model_rate") is not None and data.get("rate") is None:  # one number for users who want one
        data["rate"] = max(float(data["model_rate"]), 9 / 4)  # a 3x3 conv keeps at most 4 of 9 weights
    return OwnerConfig(**data)


def print_summary(summary: dict[str, Any], console) -> None:
    from rich.table import Table
    from rich.text import Text

    from protocol.display import printable

    def shown(value: Any) -> Text:
        """The entity's text (job id, recipe name, rate) as plain text: escaped, never rich markup."""
        return Text(printable(value))

    acc = summary["accuracy"]
    table = Table(title=Text(f"blindprune job {printable(summary['job_id'])}"), show_header=False)
    table.add_row("recipe", shown(summary["recipe"]))
    table.add_row("conv compression", shown(f"{summary['achieved_rate'] or 'n/a'}x (asked {summary['target_rate']}x)"))
    if summary.get("achieved_model_rate") is not None:
        asked = f" (asked {summary['target_model_rate']}x)" if summary.get("target_model_rate") is not None else ""
        table.add_row("whole-model compression", shown(f"{summary['achieved_model_rate']}x{asked}"))
    table.add_row("accuracy dense / pruned / retrained", f"{acc['dense']:.2%} / {acc['pruned']:.2%} / {acc['retrained']:.2%}")
    table.add_row("retraining epochs", str(summary["epochs"]))
    table.add_row("bytes sent / received", f"{summary['bytes_sent']:,} / {summary['bytes_received']:,}")
    for t in summary["transfers"]:
        hashes = ", ".join(f"{k} {v.rpartition(':')[2][:12]}" for k, v in sorted(t["files"].items()))
        table.add_row(f"{t['direction']}: {t['kind']}", shown(f"{t['tensors']} tensors, {t['bytes']:,} bytes; {hashes}"))
    table.add_row("FAB from the entity", "ignored (never installed or run)" if summary["ignored_fabs"] else "none received")
    table.add_row("final model", summary["final_model"])
    table.add_row("audit log", summary["audit_log"])
    table.add_row("wall time", f"{summary['seconds']['total']:.1f} s")
    console.print(table)


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    from rich.console import Console

    from owner.data import DataError
    from owner.job_state import JobStateError
    from owner.model import ModelError
    from owner.retrain import MaskError as RetrainMaskError
    from protocol._files import atomic_write
    from protocol.cli import run_cli
    from protocol.flower_processes import ProcessError
    from protocol.spec import SpecError

    console = Console(stderr=True, quiet=args.quiet)
    out: list[Path] = []  # the output folder, once the settings name it

    def body() -> int:
        config = load_config(args)
        out.append(config.out)
        (config.out / FAILURE_FILE).unlink(missing_ok=True)
        if args.check:
            plan = check(config, console)
            print(json.dumps({"check": "passed", **plan}))
            return 0
        summary = run(config, console)
        print_summary(summary, console)
        # Machine-readable result on stdout.
        print(json.dumps({"summary": str((config.out / "summary.json").resolve())}))
        return 0

    def record_failure(line: str) -> None:
        """``OUT/failure.json``: what a program driving owner.run reads instead of its stderr."""
        if out and out[0].is_dir():
            atomic_write(out[0] / FAILURE_FILE, json.dumps({"error": line}).encode())

    return run_cli(
        PROG, body, errors=(OwnerError, DataError, ModelError, SpecError, ProcessError, RetrainMaskError, JobStateError), on_error=record_failure
    )


if __name__ == "__main__":
    raise SystemExit(main())
