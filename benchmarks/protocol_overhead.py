"""Protocol overhead: signing + sealing + verifying a ResNet-18-size artifact, and audit verify.

    python -m benchmarks.protocol_overhead [--reps 7] [--records 10000] [--out benchmarks/results]

Measures (``--reps`` repetitions, one torch thread; wall median, wall minimum and CPU time) on ``torchvision.models.resnet18()``'s
state_dict (11.7 M parameters, 46.8 MB of safetensors):

* ``save``: plain ``safetensors.torch.save`` (the baseline), ``load``: plain ``load``;
* ``egress_check``: the owner's ``EgressGuard.check`` on the whole artifact;
* ``seal``: ``seal_bundle`` of program.json + weights.safetensors + request.json (SHA-256 of the file and of every tensor, in-toto statement, Ed25519
  DSSE signature, HPKE X25519/HKDF-SHA256/AES-256-GCM), ``open``: ``open_bundle`` (HPKE open,
  signature, every file and tensor hash, strict header parse, pickle scan);
* ratios: ``(seal + open) / save`` (the brief's target: at most 1.5) and the end-to-end
  ``(save + seal + open + load) / (save + load)``;
* ``verify_log`` on a log of ``--records`` records shaped like real jobs (transfer, signed
  checkpoint, countersignature, receipt, ...), in process and as the ``owner.audit verify`` CLI
  (wall and CPU time including interpreter start; target at most 1 s of CPU).

Writes ``protocol_overhead.json`` and ``protocol_overhead.md`` under ``--out``.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]


def _measure(fn: Callable[[], object], reps: int) -> dict[str, Any]:
    """Wall time (median and minimum) and CPU time (median) of ``reps`` calls.

    On a shared machine the wall median measures the load as much as the code; the minimum and
    the CPU time are the better estimates of the cost on an idle machine. All three are reported.
    """
    walls, cpus = [], []
    for _ in range(reps):
        cpu0, wall0 = time.process_time(), time.perf_counter()
        fn()
        walls.append(time.perf_counter() - wall0)
        cpus.append(time.process_time() - cpu0)
    return {
        "wall_median": statistics.median(walls),
        "wall_min": min(walls),
        "cpu_median": statistics.median(cpus),
        "wall_samples": walls,
        "cpu_samples": cpus,
    }


def _measure_child(cmd: list[str], reps: int) -> dict[str, Any]:
    """Like ``_measure`` for a subprocess (CPU time = the child's user + system time)."""
    import resource

    walls, cpus = [], []
    for _ in range(reps):
        before = resource.getrusage(resource.RUSAGE_CHILDREN)
        wall0 = time.perf_counter()
        out = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
        walls.append(time.perf_counter() - wall0)
        after = resource.getrusage(resource.RUSAGE_CHILDREN)
        cpus.append((after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime))
        if out.returncode != 0:
            raise SystemExit(f"benchmark command failed: {out.stdout}{out.stderr}")
    return {
        "wall_median": statistics.median(walls),
        "wall_min": min(walls),
        "cpu_median": statistics.median(cpus),
        "wall_samples": walls,
        "cpu_samples": cpus,
    }


def bench_artifact(reps: int) -> dict[str, Any]:
    import torch
    import torchvision
    from safetensors.torch import load, save

    from protocol import canonical
    from protocol.artifact import program_to_files
    from protocol.egress import EgressGuard, schema_of
    from protocol.keys import Identity
    from protocol.program_guard import strip_program
    from protocol.sealing import open_bundle, seal_bundle
    from protocol.signing import digest
    from protocol.spec import InputSpec, PruneRequest

    torch.manual_seed(0)
    model = torchvision.models.resnet18().eval()
    state = model.state_dict()
    weights = save(state)
    artifact = program_to_files(torch.export.export(model, (torch.zeros(1, 3, 224, 224),)))
    owner, entity = Identity.generate("owner", "bench-owner"), Identity.generate("entity", "bench-entity")
    spec = InputSpec(shape=(3, 224, 224), mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225), channel_order="RGB")
    request = canonical.dumps({"job_id": "job-bench", "nonce": "0" * 32, "prune": PruneRequest(rate=8.0).to_json(), "input_spec": spec.to_json()})
    files = {"program.json": strip_program(artifact["program.json"]), "weights.safetensors": artifact["weights.safetensors"], "request.json": request}
    guard = EgressGuard(schema=schema_of(state), max_bytes=1 << 30)
    request_hash = digest(b"offer")
    blob = seal_bundle(files, kind="model", job_id="job-bench", request_hash=request_hash, sender=owner, recipient=entity.card)
    senders = {owner.fingerprint: owner.card}

    def do_seal() -> bytes:
        return seal_bundle(files, kind="model", job_id="job-bench", request_hash=request_hash, sender=owner, recipient=entity.card)

    def do_open() -> object:
        return open_bundle(blob, kind="model", job_id="job-bench", request_hash=request_hash, recipient=entity, senders=senders)

    do_seal(), do_open(), save(state), load(weights)  # warm up
    t = {
        "save": _measure(lambda: save(state), reps),
        "load": _measure(lambda: load(weights), reps),
        "seal": _measure(do_seal, reps),
        "open": _measure(do_open, reps),
        "egress_check": _measure(lambda: guard.check(files, {}), reps),
    }

    def ratios(key: str) -> dict[str, float]:
        sv, ld, se, op = (float(t[k][key]) for k in ("save", "load", "seal", "open"))
        return {"seal_open_to_save": (se + op) / sv, "end_to_end": (sv + se + op + ld) / (sv + ld)}

    return {
        "parameters": sum(v.numel() for v in state.values()),
        "safetensors_bytes": len(weights),
        "program_json_bytes": len(files["program.json"]),
        "sealed_bytes": len(blob),
        "timings": t,
        "ratios": {key: ratios(key) for key in ("wall_median", "wall_min", "cpu_median")},
    }


def _job_steps(log: Any, job_id: str, sealed: Any, opened: Any, owner: Any, entity: Any) -> list[Callable[[], object]]:
    """The records one job adds to a log, in order, as calls (the log may stop between any two)."""
    from protocol.audit import countersign_checkpoint, make_receipt

    return [
        lambda: log.append("job.started", {"job_id": job_id}),
        lambda: log.record_sent(sealed, recipient=entity.card, request={"job_id": job_id}),
        lambda: log.record_countersignature(countersign_checkpoint(log.checkpoint(), owner=owner.card, entity=entity), entity=entity.card),
        lambda: log.record_receipt(make_receipt(opened, entity=entity, job_id=job_id), entity=entity.card),
        lambda: log.append("job.finished", {"job_id": job_id}),
        lambda: log.checkpoint(),
    ]


def make_log(path: Path, records: int) -> tuple[bytes, bytes]:
    """A log of ``records`` records shaped like real jobs; returns (owner card, entity card)."""
    import torch
    from safetensors.torch import save

    from protocol.audit import AuditLog
    from protocol.keys import Identity
    from protocol.sealing import open_bundle, seal_bundle_detailed
    from protocol.signing import digest

    owner, entity = Identity.generate("owner", "bench-owner"), Identity.generate("entity", "bench-entity")
    files = {"weights.safetensors": save({"w": torch.ones(8)}), "request.json": b"{}"}
    with AuditLog.open(path, owner) as log:
        job = 0
        while log.size < records:
            job_id = f"job-{job}"
            sealed = seal_bundle_detailed(files, kind="model", job_id=job_id, request_hash=digest(b"o"), sender=owner, recipient=entity.card)
            opened = open_bundle(
                sealed.blob, kind="model", job_id=job_id, request_hash=digest(b"o"), recipient=entity, senders={owner.fingerprint: owner.card}
            )
            for step in _job_steps(log, job_id, sealed, opened, owner, entity):
                if log.size >= records:
                    break
                step()
            job += 1
    return owner.card.to_bytes(), entity.card.to_bytes()


def bench_log(records: int, reps: int) -> dict[str, Any]:
    from protocol.audit import verify_log
    from protocol.keys import IdentityCard

    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "audit.jsonl"
        start = time.perf_counter()
        owner_b, entity_b = make_log(path, records)
        build = time.perf_counter() - start
        owner, entity = IdentityCard.from_bytes(owner_b), IdentityCard.from_bytes(entity_b)
        (Path(tmp) / "owner.json").write_bytes(owner_b)
        (Path(tmp) / "entity.json").write_bytes(entity_b)
        verdict = verify_log(path, owner=owner, entity=entity)
        assert verdict.ok, verdict.error
        full = _measure(lambda: verify_log(path, owner=owner, entity=entity), reps)
        quick = _measure(lambda: verify_log(path, owner=owner, entity=entity, every_signature=False), reps)
        cli = [
            sys.executable,
            "-m",
            "owner.audit",
            "verify",
            str(path),
            "--owner",
            str(Path(tmp) / "owner.json"),
            "--entity",
            str(Path(tmp) / "entity.json"),
        ]
        cli_full = _measure_child([*cli, "--every-signature"], max(3, reps // 2))
        cli_quick = _measure_child(cli, max(3, reps // 2))
        return {
            "records": verdict.records,
            "checkpoints": verdict.checkpoints,
            "receipts": verdict.receipts,
            "bytes": path.stat().st_size,
            "build_seconds": build,
            "verify": full,
            "verify_quick": quick,
            "cli": cli_full,
            "cli_quick": cli_quick,
        }


def _ed25519_verify_us(n: int = 2000) -> float:
    """Microseconds per Ed25519 verification right now: a gauge of how loaded the machine is."""
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    key = Ed25519PrivateKey.generate()
    message = b"x" * 300
    sig, public = key.sign(message), key.public_key()
    start = time.perf_counter()
    for _ in range(n):
        public.verify(sig, message)
    return (time.perf_counter() - start) / n * 1e6


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.protocol_overhead", description=__doc__.split("\n")[0])
    parser.add_argument("--reps", type=int, default=7)
    parser.add_argument("--records", type=int, default=10_000)
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results")
    args = parser.parse_args(argv)
    import torch

    torch.set_num_threads(1)
    import os

    load_start = os.getloadavg()
    artifact = bench_artifact(args.reps)
    log = bench_log(args.records, args.reps)
    load_end = os.getloadavg()
    ed_us = _ed25519_verify_us()
    import cryptography

    result = {
        "machine": {
            "platform": platform.platform(),
            "python": platform.python_version(),
            "torch": torch.__version__,
            "cryptography": cryptography.__version__,
            "cpu_count": os.cpu_count(),
            "loadavg_start": [round(x, 2) for x in load_start],
            "loadavg_end": [round(x, 2) for x in load_end],
            "ed25519_verify_us": ed_us,
        },
        "artifact": artifact,
        "audit_log": log,
        "targets": {"ratio_seal_open_to_save": 1.5, "verify_10k_cpu_seconds": 1.0},
    }
    args.out.mkdir(parents=True, exist_ok=True)
    from protocol._files import atomic_write

    atomic_write(args.out / "protocol_overhead.json", (json.dumps(result, indent=2, sort_keys=True) + "\n").encode())
    t = artifact["timings"]

    def row(label: str, m: dict) -> str:
        return f"| {label} | {m['wall_median']:.3f} | {m['wall_min']:.3f} | {m['cpu_median']:.3f} |"

    r = artifact["ratios"]
    md = [
        "# Protocol overhead (ResNet-18 artifact, 10k-record audit log)",
        "",
        f"Machine: {result['machine']['platform']}, {result['machine']['cpu_count']} cores shared with other jobs "
        f"(load average {result['machine']['loadavg_start'][0]} at start, {result['machine']['loadavg_end'][0]} at end; "
        f"Ed25519 verify {result['machine']['ed25519_verify_us']:.0f} us per signature at the end), "
        f"torch {torch.__version__}, cryptography {cryptography.__version__}, one torch thread, {args.reps} repetitions. "
        "Wall medians on a loaded machine measure the load as much as the code: the wall minimum and the CPU time are "
        "the better estimates of the cost on an idle one.",
        "",
        f"Artifact: ResNet-18 state_dict ({artifact['parameters']:,} parameters, {artifact['safetensors_bytes']:,} bytes of "
        f"safetensors) + stripped torch.export graph ({artifact['program_json_bytes']:,} bytes) + request.json; "
        f"{artifact['sealed_bytes']:,} bytes sealed.",
        "",
        "| step | wall median (s) | wall min (s) | CPU median (s) |",
        "|---|---|---|---|",
        row("safetensors save (baseline)", t["save"]),
        row("safetensors load", t["load"]),
        row("seal_bundle (hash every file and tensor, sign, HPKE seal)", t["seal"]),
        row("open_bundle (HPKE open, verify signature and every hash)", t["open"]),
        row("EgressGuard.check (schema, finite, fresh re-serialisation, program, request)", t["egress_check"]),
        "",
        "| ratio | wall median | wall min | CPU |",
        "|---|---|---|---|",
        f"| (seal + open) / save (target at most 1.5) | {r['wall_median']['seal_open_to_save']:.2f} | "
        f"{r['wall_min']['seal_open_to_save']:.2f} | {r['cpu_median']['seal_open_to_save']:.2f} |",
        f"| (save + seal + open + load) / (save + load) | {r['wall_median']['end_to_end']:.2f} | "
        f"{r['wall_min']['end_to_end']:.2f} | {r['cpu_median']['end_to_end']:.2f} |",
        "",
        f"Audit log: {log['records']:,} records ({log['checkpoints']} signed checkpoints, {log['receipts']} receipts, "
        f"as many countersignatures; {log['bytes']:,} bytes). Target: `owner.audit verify` (the default, "
        "which verifies the owner's signature on the last checkpoint and every entity signature) at most 1 s of CPU.",
        "",
        "| verify | wall median (s) | wall min (s) | CPU median (s) |",
        "|---|---|---|---|",
        row("`verify_log` (every signature)", log["verify"]),
        row("`verify_log(every_signature=False)`", log["verify_quick"]),
        row("`python -m owner.audit verify --every-signature` (process)", log["cli"]),
        row("`python -m owner.audit verify` (process, the default)", log["cli_quick"]),
        "",
    ]
    atomic_write(args.out / "protocol_overhead.md", "\n".join(md).encode())
    print("\n".join(md))
    return 0


if __name__ == "__main__":
    sys.exit(main())
