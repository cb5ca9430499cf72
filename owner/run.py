"""``python -m owner.run --data ./private``: the data owner's whole job, from dense model to final model.

Exports the owner's model, sends it (and nothing else) to the pinned compression entity through
the owner's own SuperNode and executor, receives pruned weights and the mask, retrains on the
private data with the mask, evaluates, and writes the final model, a summary and the audit log.
Settings come from ``owner.toml`` in the working directory (or ``--config``); flags override it.
Exit 0 on success; 1 with a one-line reason on any failure; 2 on bad usage.
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

DEFAULT_OUT = Path("blindprune-out")


@dataclass(frozen=True)
class OwnerConfig:
    data: Path
    model: str
    entity_card: Path
    input_shape: tuple[int, int, int]
    mean: tuple[float, ...]
    std: tuple[float, ...]
    model_kwargs: dict[str, Any] = field(default_factory=dict)
    weights: Path | None = None
    channel_order: str = ""
    entity: str = "127.0.0.1:9092"
    keys: Path = Path("owner-keys")
    rate: float = 8.0
    model_rate: float | None = None
    skip_layers: tuple[str, ...] = ()
    recipe: str | None = None
    epochs: int | None = None
    batch_size: int | None = None
    max_epochs: int = 50
    max_batch_size: int = 4096
    train_limit: int | None = None
    eval_fraction: float = 0.1
    out: Path = DEFAULT_OUT
    connect_timeout: float = 30.0
    timeout: float = 1800.0
    device: str = "cpu"
    seed: int = 0
    tls_ca: Path | None = None
    node_key: Path | None = None
    stall_timeout: float = 60.0
    resume: bool = False
    mia_defence: bool = False
    mia_defence_images: int = 1000


class OwnerError(RuntimeError):
    """The owner's job failed (one line for the user)."""


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


def _entity_address(text: str) -> tuple[str, int]:
    host, sep, port = text.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise OwnerError(f"entity address {text!r} must look like host:port")
    return host.strip("[]"), int(port)


def _wait_reachable(host: str, port: int, timeout: float) -> None:
    from protocol.flower_processes import port_open

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if port_open(host, port):
            return
        time.sleep(0.5)
    raise OwnerError(f"entity at {host}:{port} unreachable within {timeout:.0f} s; is `python -m entity.serve` running there?")


def _wait_replies_pushed(log_path: Path, count: int, timeout: float) -> None:
    """Let the SuperNode push the last reply before it is stopped (a stopped node loses it).

    The SuperNode reports each pushed reply in its log; its runtime API offers no such query.
    """
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if log_path.read_text(errors="replace").count("Sent successfully") >= count:
                time.sleep(1.0)  # the entity polls every 0.25 s: let it pull the goodbye
                return
        except OSError:
            return
        time.sleep(0.2)


def _supernode_exit(supernode, node_key: Path | None) -> str:
    """Why the SuperNode exited, with the fix when the entity refused its key."""
    reason = supernode.exit_reason() or "no output"
    if "Failed to activate SuperNode" in reason or "must be registered" in reason:
        key = f"{node_key}.pub" if node_key is not None else "a SuperNode public key (--node-key)"
        reason += f"; the entity runs --auth and has not registered this node: have its operator put {key} in the entity's HOME/nodes/"
    return reason


# ---------------------------------------------------------------------------------------- stages
# The real run and ``--check`` share these, cheapest first; each fails with its own one line.


@dataclass
class Inputs:
    """Stage ``check``: flags and files, read and checked; nothing loaded, nothing sent."""

    spec: Any
    request: Any
    limits: Any
    entity_card: Any
    identity: Any
    host: str
    port: int


def check_inputs(config: OwnerConfig, console) -> Inputs:
    from protocol.keys import init_identity, load_card, load_identity
    from protocol.spec import InputSpec, PruneRequest, RetrainLimits

    if not config.data.is_dir():
        raise OwnerError(f"data directory {config.data} does not exist")
    if not config.entity_card.is_file():
        raise OwnerError(f"entity card {config.entity_card} does not exist (the entity's operator gives you HOME/keys/card.json)")
    if config.weights is not None and not config.weights.is_file():
        raise OwnerError(f"weights file {config.weights} does not exist")
    if config.tls_ca is not None and not config.tls_ca.is_file():
        raise OwnerError(f"TLS CA file {config.tls_ca} does not exist")
    if config.node_key is not None and not config.node_key.is_file():
        raise OwnerError(f"node key {config.node_key} does not exist (make one with `python -m protocol.transport node-key DIR`)")
    if config.node_key is not None and config.tls_ca is None:
        raise OwnerError("--node-key needs --tls-ca: Flower authenticates SuperNodes only over TLS")
    if not config.stall_timeout > 0:
        raise OwnerError("--stall-timeout must be positive")
    host, port = _entity_address(config.entity)
    channel_order = config.channel_order or ("L" if config.input_shape[0] == 1 else "RGB")
    spec = InputSpec(tuple(config.input_shape), tuple(config.mean), tuple(config.std), channel_order)  # type: ignore[arg-type]
    request = PruneRequest(config.rate, tuple(config.skip_layers), config.recipe, model_rate=config.model_rate)
    entity_card = load_card(config.entity_card)
    if entity_card.role != "entity":
        raise OwnerError(f"{config.entity_card} is an {entity_card.role} card, not an entity's: pass the card the entity's operator gave you")
    if not (config.keys / "card.json").is_file():
        init_identity(config.keys, "owner", name=f"owner-{config.keys.resolve().parent.name}")
        console.print(
            f"[cyan]owner:[/] created owner keys; send {config.keys / 'card.json'} to the entity's operator to be registered "
            f"(`python -m protocol.keys show --dir {config.keys}` prints the fingerprint to check with them)"
        )
    return Inputs(spec, request, RetrainLimits(config.max_epochs, config.max_batch_size), entity_card, load_identity(config.keys), host, port)


def export_stage(config: OwnerConfig, spec) -> tuple[Any, Any]:
    """Stage ``export``: the owner's model with its weights, and its exported graph."""
    import torch

    from owner.model import build_model, export_model, load_weights

    torch.manual_seed(config.seed)
    model = build_model(config.model, config.model_kwargs)
    if config.weights is not None:
        load_weights(model, config.weights)
    return model, export_model(model, spec)


def plan_stage(config: OwnerConfig, program, console) -> list:
    """Stage ``plan``: which layers the entity will prune and why the others stay dense."""
    from protocol.prune_plan import model_rate_bounds, prune_plan, pruned_share

    plan = prune_plan(program, config.skip_layers, model_rate=config.model_rate)
    pruned, total = pruned_share(plan)
    dense = [p for p in plan if not p.pruned]
    target = f"3x3 convs at {config.rate:g}x" + (f", whole model at {config.model_rate:g}x" if config.model_rate is not None else "")
    console.print(
        f"[cyan]owner:[/] plan: {sum(p.pruned for p in plan)} of {len(plan)} weight layers pruned "
        f"({pruned:,} of {total:,} weights; {target}); {len(dense)} stay dense"
    )
    for layer in plan:
        console.print(f"  {layer.pruning if layer.pruned else 'dense'}  {layer.weight}  {layer.kind} {list(layer.shape)}: {layer.why}", markup=False)
    if not any(p.pruned for p in plan):
        reasons = sorted({p.why for p in dense})
        raise OwnerError(f"nothing to prune: no layer of this model is pruned ({'; '.join(reasons) or 'no conv or linear layers'}); nothing was sent")
    if config.model_rate is None and not any(p.pruned and p.kind == "3x3 conv" for p in plan):
        raise OwnerError(
            f"--rate {config.rate:g} is the conv rate of 3x3 convs (groups 1) and this model has none to prune; "
            "its depthwise convs keep a fixed 9/4: pass --model-rate R to prune its 1x1 and linear layers for a whole-model rate; nothing was sent"
        )
    if config.model_rate is not None:
        bounds = model_rate_bounds(plan, config.rate)
        if bounds is None or not bounds[0] <= config.model_rate <= bounds[1]:
            reach = f"between {bounds[0]:.2f}x and {bounds[1]:.2f}x" if bounds else "fixed by --rate (no 1x1 or linear layer to prune)"
            raise OwnerError(
                f"--model-rate {config.model_rate:g} cannot be met at --rate {config.rate:g}: the whole-model rate is {reach}; "
                "change --model-rate or --rate; nothing was sent"
            )
    return plan


def data_stage(config: OwnerConfig, spec):
    """Stage ``data``: the private data's layout (read here; it never leaves)."""
    from owner.data import load_private_data

    return load_private_data(config.data, spec, eval_fraction=config.eval_fraction, seed=config.seed)


def exchange_stage(config: OwnerConfig, session, console) -> None:
    """Stage ``exchange``: the owner's SuperNode and executor until the entity closes the job.

    Liveness, not one long wait: once the entity has made its offer, each of its signed messages
    (admission, status, result) resets the clock; ``--stall-timeout`` seconds of silence means the
    entity is gone, and the error says how to resume.
    """
    from owner.client_app import build_client_app
    from owner.executor import ExecutorError, OwnerExecutor
    from protocol.flower_processes import ManagedProcess, flower_env, free_port, wait_for_port

    out = config.out
    runtime_port = free_port()
    node_cmd = [sys.executable, "-m", "owner.supernode", "--superlink", config.entity, "--isolation", "process"]
    node_cmd += ["--host", "127.0.0.1", "--port", str(runtime_port)]
    node_cmd += ["--root-certificates", str(config.tls_ca)] if config.tls_ca else ["--insecure"]
    node_cmd += ["--auth-supernode-private-key", str(config.node_key)] if config.node_key else []
    (out / "flwr").mkdir(exist_ok=True)
    supernode = ManagedProcess("SuperNode", node_cmd, out / "supernode.log", flower_env(out / "flwr"))

    def watch() -> None:
        if _finish_overdue(session):
            session.finish("finish not received (the entity stopped after sending the result)")
            return
        if session.status is not None and session.status.state == "stopping" and session.outcome is None:
            job = session.job_id or session.offer_job
            hint = f"run `python -m owner.run --resume {out}`" if session.request_digest else "run again"
            raise OwnerError(f"the entity is shutting down (its operator stopped it); it keeps job {job}: when it is back, {hint}")
        silent = time.monotonic() - session.last_heard
        if session.offer_job is not None and session.outcome is None and silent > config.stall_timeout:
            job = session.job_id or session.offer_job
            hint = f"; when it is back, run `python -m owner.run --resume {out}`" if session.request_digest else "; try again when it is back"
            raise OwnerError(f"the entity has sent nothing for {silent:.0f} s (job {job}): it stopped or is unreachable{hint}")

    try:
        supernode.start()
        wait_for_port(supernode, "127.0.0.1", runtime_port, 30)
        executor = OwnerExecutor(f"127.0.0.1:{runtime_port}", build_client_app(session), on_fab=session.note_ignored_fab)
        try:
            from rich.progress import BarColumn, Progress, SpinnerColumn, TextColumn

            columns = (SpinnerColumn(), TextColumn("{task.description}"), BarColumn())
            with Progress(*columns, console=console, transient=True, disable=console.quiet) as shown:
                task = shown.add_task("waiting for the entity's offer...", total=None)

                def on_status(status) -> None:
                    # A bar only while the engine reports how far it is; otherwise a spinner and the text.
                    total = 100 if status.state == "pruning" and status.percent is not None else None
                    shown.update(task, description=_describe_status(status), total=total, completed=status.percent or 0)

                session.on_status = on_status
                executor.run_until(
                    lambda: session.finished,
                    config.timeout,
                    first_task_timeout=config.connect_timeout + 60,
                    alive=supernode.running,
                    watch=watch,
                )
        except (TimeoutError, ExecutorError) as exc:
            why = "" if supernode.running() else f": {_supernode_exit(supernode, config.node_key)}"
            raise OwnerError(f"{exc}{why} (entity {config.entity}; SuperNode log: {supernode.log_path})") from None
        except OwnerError:
            raise
        except Exception:
            # A SuperNode the entity refuses (an unregistered --node-key, say) opens its runtime port
            # and exits a moment later: report Flower's reason, not the executor's connection error.
            deadline = time.monotonic() + 5
            while supernode.running() and time.monotonic() < deadline:
                time.sleep(0.1)
            if supernode.running():
                raise
            raise OwnerError(f"the SuperNode stopped: {_supernode_exit(supernode, config.node_key)} (SuperNode log: {supernode.log_path})") from None
        else:
            # The goodbye is the last reply: stopping the SuperNode before it is pushed loses it.
            _wait_replies_pushed(supernode.log_path, executor.tasks_run, timeout=15)
        finally:
            executor.close()
    finally:
        supernode.stop()


FINISH_GRACE_SECONDS = 30.0


def _finish_overdue(session) -> bool:
    """Whether the result is verified and kept but the entity's finish is overdue: stop waiting then.

    The job's outcome is the result; a lost finish (the entity stopped right after it) must not
    turn a delivered job into a failure.
    """
    return session.outcome_at is not None and not session.finished and time.monotonic() - session.outcome_at >= FINISH_GRACE_SECONDS


def _describe_status(status) -> str:
    """One line for the live display; the entity's texts are escaped (they are not ours)."""
    from rich.markup import escape

    from protocol.display import printable

    if status.state == "queued":
        eta = f", about {status.estimate_s // 60} min {status.estimate_s % 60} s to start" if status.estimate_s is not None else ""
        return f"queued at the entity: position {status.position}{eta}"
    if status.state == "pruning":
        done = f" {status.percent}%" if status.percent is not None else ""
        where = f" {escape(printable(status.phase, 40))}" if status.phase else ""
        layer = f" {escape(printable(status.layer, 60))}" if status.layer else ""
        return f"pruning at the entity ({status.elapsed_s} s):{where}{layer}{done}"
    if status.state == "stopping":
        return "the entity is shutting down..."
    return "pruned; the entity is sending the result..."


def _session(config: OwnerConfig, inputs: Inputs, program, audit, *, intent: str, resume: Any = None):
    from owner.job_state import JobState, read_state, write_state
    from owner.session import OwnerSession, save_outcome_files
    from protocol.replay import NonceStore

    def keep(sent) -> None:
        fingerprint = inputs.entity_card.fingerprint
        write_state(config.out, JobState(sent.job_id, sent.nonce, sent.request_digest, fingerprint, "requested", config=_config_json(config)))

    def keep_result(outcome) -> None:
        save_outcome_files(outcome, config.out / "received")
        state = read_state(config.out)
        if state is not None:
            write_state(config.out, state.advanced("received"))

    return OwnerSession(
        inputs.identity,
        inputs.entity_card,
        program,
        inputs.spec,
        inputs.request,
        audit,
        nonces=NonceStore(config.keys / "seen-nonces.jsonl"),
        limits=inputs.limits,
        intent=intent,
        resume=resume,
        on_request_sealed=keep,
        on_result_verified=keep_result,
    )


def _config_json(config: OwnerConfig) -> dict[str, Any]:
    """The run's settings as JSON (absolute paths), kept in OUT/job.json for ``--resume``."""
    out: dict[str, Any] = {}
    for name in OwnerConfig.__dataclass_fields__:
        value = getattr(config, name)
        out[name] = str(value.resolve()) if isinstance(value, Path) else list(value) if isinstance(value, tuple) else value
    return out


def check(config: OwnerConfig, console) -> dict[str, Any]:
    """``--check``: every stage before the model would leave, then a signed hello; only the hello leaves.

    Returns the plan (also printed): layers pruned and kept dense, the data layout, and the
    entity's admission (queue length and workers).
    """
    from owner.data import count
    from protocol.audit import AuditLog

    inputs = check_inputs(config, console)
    _, program = export_stage(config, inputs.spec)
    plan = plan_stage(config, program, console)
    data = data_stage(config, inputs.spec)
    console.print(f"[cyan]owner:[/] data: {data.layout}, {count(data.train)} train / {count(data.test)} held-out images, {len(data.classes)} classes")
    _wait_reachable(inputs.host, inputs.port, config.connect_timeout)
    config.out.mkdir(parents=True, exist_ok=True)
    with AuditLog.open(config.out / "audit.jsonl", inputs.identity) as audit:
        audit.append("check.started", {"entity": inputs.entity_card.fingerprint, "entity_address": config.entity, "model_factory": config.model})
        session = _session(config, inputs, program, audit, intent="check")
        exchange_stage(config, session, console)
        if session.admission is None:
            reason = session.refusal or "the entity closed the check without an answer"
            audit.append("check.failed", {"reason": reason})
            audit.checkpoint()
            raise OwnerError(f"check failed: {reason}")
        audit.append("check.finished", {"admitted": True, "sent": "the signed hello only"})
        audit.checkpoint()
    admission = session.admission
    console.print(
        f"[cyan]owner:[/] the entity admits this owner: {admission.queued} jobs waiting, {admission.workers} workers; "
        f"requests up to {admission.max_request_bytes / 2**20:.0f} MiB. Nothing but the hello was sent."
    )
    return {
        "admitted": True,
        "queued": admission.queued,
        "workers": admission.workers,
        "layers": [
            {"weight": p.weight, "kind": p.kind, "shape": list(p.shape), "pruned": p.pruned, "pruning": p.pruning, "why": p.why} for p in plan
        ],
        "data": {"layout": data.layout, "train_images": count(data.train), "held_out_images": count(data.test)},
    }


def run(config: OwnerConfig, console) -> dict[str, Any]:
    """The whole job, stage by stage; returns the summary (also written to OUT/summary.json).

    An unfinished job in OUT (``job.json``) is continued: a request already sent is collected
    with a resume hello, a result already received is not asked for again, and retraining goes on
    from its last epoch checkpoint. Ctrl-C is on record in the audit log as an interruption.
    """
    from owner.job_state import claim

    started = time.monotonic()
    inputs = check_inputs(config, console)
    state = claim(config.out, resume=config.resume)
    model, program = export_stage(config, inputs.spec)
    if state is None:
        plan_stage(config, program, console)
    data = data_stage(config, inputs.spec)
    if state is None or state.stage == "requested":
        _wait_reachable(inputs.host, inputs.port, config.connect_timeout)
    config.out.mkdir(parents=True, exist_ok=True)
    from protocol.audit import AuditLog

    audit = AuditLog.open(config.out / "audit.jsonl", inputs.identity)
    try:
        return _run_job(config, inputs, model, program, data, audit, state, console, started)
    except KeyboardInterrupt:
        from owner.job_state import read_state

        now = read_state(config.out)
        audit.append("job.interrupted", {"job_id": now.job_id if now else "", "stage": now.stage if now else "before the request", "by": "Ctrl-C"})
        audit.checkpoint()
        hint = f"; run `python -m owner.run --resume {config.out}` to continue" if now else "; nothing was sent, run it again"
        raise OwnerError(f"interrupted{hint}") from None
    except OSError as exc:  # a full disk, say: on record, and what was received or checkpointed stays
        from protocol.cli import describe_os_error

        try:
            audit.append("job.failed", {"reason": describe_os_error(exc)})
            audit.checkpoint()
        except OSError:
            pass
        raise
    finally:
        audit.close()


def _run_job(config: OwnerConfig, inputs: Inputs, model, program, data, audit, state, console, started: float) -> dict[str, Any]:
    """The stages after the checks: exchange (or the kept result), retrain, write."""
    timings: dict[str, float] = {}
    exchange_start = time.monotonic()
    outcome, state, session = exchange_or_resume_stage(config, inputs, program, data, audit, state, console)
    timings["exchange"] = time.monotonic() - exchange_start
    retrain_start = time.monotonic()
    retrained = retrain_stage(config, model, outcome, data, state, console)
    timings["retrain"] = time.monotonic() - retrain_start
    return write_stage(config, inputs, model, data, outcome, retrained, session, audit, timings, started)


def exchange_or_resume_stage(config: OwnerConfig, inputs: Inputs, program, data, audit, state, console):
    """Stage ``exchange``: the hello, the request and the verified result, or the result a
    resumed job already holds in ``OUT/received/``. Returns (outcome, job state, session or None)."""
    from owner.job_state import JobState, read_state, write_state
    from owner.session import ResumeState, load_outcome_files

    out = config.out
    if state is not None:
        audit.append("job.resumed", {"job_id": state.job_id, "stage": state.stage, "epoch": state.epoch})
        console.print(f"[cyan]owner:[/] resuming job {state.job_id} from {out} (stage {state.stage})")
    else:
        audit.append(
            "job.started",
            {
                "purpose": "compress the owner's model by pattern pruning; retrain locally",
                "entity": inputs.entity_card.fingerprint,
                "entity_name": inputs.entity_card.name,
                "entity_address": config.entity,
                "model_factory": config.model,
                "data_layout": data.layout,
                "data_stays_local": True,
                "classes": len(data.classes),
            },
        )
    session = None
    if state is None or state.stage == "requested":
        resume = ResumeState(state.job_id, state.nonce, state.request_digest) if state is not None else None
        session = _session(config, inputs, program, audit, intent="request", resume=resume)
        exchange_stage(config, session, console)
        if session.outcome is None:
            reason = session.refusal or "the entity closed the job without a result"
            audit.append("job.failed", {"reason": reason})
            audit.checkpoint()
            if session.request_digest is not None:
                # Refused for good: the folder's job is over, and a new run may start afresh here.
                (out / "job.json").unlink(missing_ok=True)
            raise OwnerError(f"job failed: {reason}")
        outcome = session.outcome  # kept in OUT/received by the session before it acknowledged it
        state = (
            read_state(out) or JobState(outcome.job_id, "", "", inputs.entity_card.fingerprint, "requested", config=_config_json(config))
        ).advanced("received")
        write_state(out, state)
    else:
        outcome = load_outcome_files(out / "received", state.job_id, inputs.limits)
        console.print(f"[cyan]owner:[/] using the verified result already in {out / 'received'} (not asked for again)")
    return outcome, state, session


def _membership_defence(config: OwnerConfig, train_loader, batch: int):
    """With ``--mia-defence``: (the loader without the held-back images, the defence, their loader).

    The held-back training images are the defence's non-members: retraining never sees them, so
    the adversary learns to tell them from the images retraining does see (Nasr et al. 2018).
    """
    if not config.mia_defence:
        return train_loader, None, None
    import torch
    from torch.utils.data import DataLoader, Subset

    from owner.data import count
    from owner.retrain import MembershipDefence

    full = train_loader.dataset
    n = count(full)
    keep = min(config.mia_defence_images, n // 2)
    if keep < batch:
        raise OwnerError(
            f"--mia-defence needs at least {batch} held-back images (it has {keep} of {n}); use more training images or a smaller --batch-size"
        )
    order = torch.randperm(n, generator=torch.Generator().manual_seed(config.seed)).tolist()
    retrain = DataLoader(Subset(full, order[keep:]), batch_size=batch, shuffle=True, generator=torch.Generator().manual_seed(config.seed))
    held = DataLoader(Subset(full, order[:keep]), batch_size=batch, shuffle=True, generator=torch.Generator().manual_seed(config.seed + 1))
    return retrain, MembershipDefence(seed=config.seed), held


@dataclass(frozen=True)
class Retrained:
    """What the retrain stage hands the write stage: accuracies, the recipe as run, the job state."""

    dense: float
    pruned: float
    final: float
    epochs: int
    batch: int
    history: list[dict[str, Any]]
    train_images: int
    state: Any


def retrain_stage(config: OwnerConfig, model, outcome, data, state, console) -> Retrained:
    """Stage ``retrain``: masked retraining on the private data, checkpointed after every epoch
    (``OUT/retrain-checkpoint.pt``), from the last checkpoint when the job resumes."""
    from owner.data import count
    from owner.job_state import CHECKPOINT_FILE, load_checkpoint, save_checkpoint, write_state
    from owner.retrain import apply_masks, evaluate, masked_retrain

    out = config.out
    _, test_loader = data.loaders(256)
    recipe = outcome.recipe
    # Distillation teaches the pruned model from the owner's own dense one, which stays here.
    teacher = copy.deepcopy(model).eval() if recipe.distill > 0 else None
    with console.status("evaluating the dense model on the held-out split..."):
        dense_acc = evaluate(model, test_loader, config.device)
    model.load_state_dict(outcome.state_dict)
    apply_masks(model, outcome.masks)
    pruned_acc = evaluate(model, test_loader, config.device)
    console.print(
        f"[cyan]owner:[/] {data.layout}: {count(data.train)} train / {count(data.test)} held-out images;"
        f" dense accuracy {dense_acc:.2%}, pruned {pruned_acc:.2%}"
    )
    epochs = recipe.epochs if config.epochs is None else config.epochs
    batch = config.batch_size or recipe.batch_size
    train_loader, test_loader = data.loaders(batch, seed=config.seed, train_limit=config.train_limit)
    train_loader, defence, defence_loader = _membership_defence(config, train_loader, batch)
    history: list[dict[str, Any]] = []
    resume_from = load_checkpoint(out) if state.stage == "retraining" else None
    if resume_from is not None:
        history = list(resume_from.get("evaluated", []))
        console.print(f"[cyan]owner:[/] retraining goes on after epoch {resume_from['epoch']} of {epochs} ({out / CHECKPOINT_FILE})")
    if epochs > 0:
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

        steps = len(train_loader)
        with Progress(
            TextColumn("[cyan]retraining[/] {task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            TimeRemainingColumn(),
            console=console,
            transient=True,
            disable=console.quiet,
        ) as bar:
            task = bar.add_task("epoch 1", total=epochs * steps)

            def on_step(epoch: int, step: int) -> None:
                bar.update(task, completed=epoch * steps + step + 1, description=f"epoch {epoch + 1}/{epochs}")

            def on_epoch(stats, trained) -> None:
                acc = evaluate(trained, test_loader, config.device)
                history.append({"epoch": stats.epoch, "loss": round(stats.loss, 4), "held_out_accuracy": round(acc, 4)})
                console.print(f"[cyan]owner:[/] epoch {stats.epoch}: loss {stats.loss:.3f}, held-out accuracy {acc:.2%}")

            def on_checkpoint(saved) -> None:
                nonlocal state
                save_checkpoint(out, {**saved, "evaluated": history})
                state = state.advanced("retraining", int(saved["epoch"]))
                write_state(out, state)

            masked_retrain(
                model,
                outcome.masks,
                train_loader,
                recipe,
                epochs=epochs,
                device=config.device,
                on_step=on_step,
                on_epoch=on_epoch,
                teacher=teacher,
                resume=resume_from,
                on_checkpoint=on_checkpoint,
                defence=defence,
                defence_reference=defence_loader,
            )
    model.to("cpu")
    return Retrained(dense_acc, pruned_acc, evaluate(model, test_loader), epochs, batch, history, count(train_loader.dataset), state)


def write_stage(
    config: OwnerConfig, inputs: Inputs, model, data, outcome, retrained: Retrained, session, audit, timings, started: float
) -> dict[str, Any]:
    """Stage ``write``: the final model (the input of codegen), the audit records, the summary; the job is finished."""
    from owner.data import count
    from owner.job_state import CHECKPOINT_FILE, write_state
    from owner.model import export_model
    from protocol._files import atomic_write
    from protocol.artifact import save_model_dir

    out = config.out
    recipe, state = outcome.recipe, retrained.state
    epochs, batch, history = retrained.epochs, retrained.batch, retrained.history
    dense_acc, pruned_acc, final_acc = retrained.dense, retrained.pruned, retrained.final
    final_program = export_model(model, inputs.spec)
    save_model_dir(out / "final", final_program, outcome.masks)
    audit.append(
        "retrain.finished",
        {
            "job_id": outcome.job_id,
            "epochs": epochs,
            "images": retrained.train_images,
            "stayed_local": True,
            "membership_defence": bool(config.mia_defence),
        },
    )
    audit.append("model.saved", {"path": str((out / "final").resolve()), "sent_anywhere": False})
    audit.checkpoint()
    timings["total"] = time.monotonic() - started
    summary = {
        "job_id": outcome.job_id,
        "entity": inputs.entity_card.fingerprint,
        "recipe": outcome.recipe_name,
        "target_rate": config.rate,
        "achieved_rate": outcome.achieved_rate,
        "target_model_rate": config.model_rate,
        "achieved_model_rate": outcome.achieved_model_rate,
        "accuracy": {"dense": round(dense_acc, 4), "pruned": round(pruned_acc, 4), "retrained": round(final_acc, 4)},
        "epochs": epochs,
        "retraining": {**recipe.to_json(), "epochs": epochs, "batch_size": batch},
        "history": history,
        "bytes_sent": session.bytes_sent if session else 0,
        "bytes_received": outcome.bytes_received,
        "transfers": session.transfers if session else [],
        "ignored_fabs": session.ignored_fabs if session else [],
        "audit_log": str((out / "audit.jsonl").resolve()),
        "final_model": str((out / "final").resolve()),
        "seconds": {k: round(v, 2) for k, v in timings.items()},
        "data": {"layout": data.layout, "train_images": count(data.train), "held_out_images": count(data.test)},
    }
    atomic_write(out / "summary.json", json.dumps(summary, indent=2).encode())
    write_state(out, state.advanced("finished"))
    (out / CHECKPOINT_FILE).unlink(missing_ok=True)
    return summary


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
