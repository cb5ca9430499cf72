"""The owner's job as stages, cheapest first: inputs, export, plan, data, exchange, retrain, write.

Each stage checks or does one thing and fails with its own one line, so that a mistake is found
before anything expensive runs and before anything leaves. ``owner.run`` (the CLI) drives them;
``--check`` runs the ones that send nothing but the signed hello. An unfinished job in OUT is
picked up where its ``job.json`` says it stopped.
"""

from __future__ import annotations

import copy
import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from owner.config import OwnerConfig, OwnerError
from owner.exchange import exchange_stage


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
