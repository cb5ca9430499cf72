"""Protocol overhead: signing + sealing + verifying a ResNet-18-size artifact, and audit verify.

    python -m benchmarks.protocol_overhead [--reps 7] [--records 10000] [--out benchmarks/results]

Measures (median of ``--reps``, one torch thread) on ``torchvision.models.resnet18()``'s
state_dict (11.7 M parameters, 46.8 MB of safetensors):

* ``save``: plain ``safetensors.torch.save`` (the baseline), ``load``: plain ``load``;
* ``seal``: ``seal_bundle`` (SHA-256 of the file and of every tensor, in-toto statement, Ed25519
  DSSE signature, HPKE X25519/HKDF-SHA256/AES-256-GCM), ``open``: ``open_bundle`` (HPKE open,
  signature, every file and tensor hash, strict header parse, pickle scan);
* ratios: ``(seal + open) / save`` (the brief's target: at most 1.5) and the end-to-end
  ``(save + seal + open + load) / (save + load)``;
* ``verify_log`` on a log of ``--records`` records shaped like real jobs (transfer, signed
  checkpoint, countersignature, receipt, ...), in process and as the ``owner.audit verify`` CLI
  (wall time including interpreter start; target under 2 s).

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
from pathlib import Path
from typing import Callable

ROOT = Path(__file__).resolve().parents[1]


def _median(fn: Callable[[], object], reps: int) -> tuple[float, list[float]]:
    times = []
    for _ in range(reps):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times), times


def bench_artifact(reps: int) -> dict[str, object]:
    import torch
    import torchvision
    from safetensors.torch import load, save

    from protocol import canonical
    from protocol.keys import Identity
    from protocol.sealing import open_bundle, seal_bundle
    from protocol.signing import digest

    torch.manual_seed(0)
    state = torchvision.models.resnet18().state_dict()
    weights = save(state)
    owner, entity = Identity.generate("owner", "bench-owner"), Identity.generate("entity", "bench-entity")
    request = canonical.dumps({"job_id": "job-bench", "nonce": "0" * 32})
    files = {"weights.safetensors": weights, "request.json": request}
    request_hash = digest(b"offer")
    blob = seal_bundle(files, kind="model", job_id="job-bench", request_hash=request_hash, sender=owner, recipient=entity.card)
    senders = {owner.fingerprint: owner.card}

    def do_seal() -> bytes:
        return seal_bundle(files, kind="model", job_id="job-bench", request_hash=request_hash, sender=owner, recipient=entity.card)

    def do_open() -> object:
        return open_bundle(blob, kind="model", job_id="job-bench", request_hash=request_hash, recipient=entity, senders=senders)

    do_seal(), do_open(), save(state), load(weights)  # warm up
    t_save, s_save = _median(lambda: save(state), reps)
    t_load, s_load = _median(lambda: load(weights), reps)
    t_seal, s_seal = _median(do_seal, reps)
    t_open, s_open = _median(do_open, reps)
    return {
        "parameters": sum(t.numel() for t in state.values()),
        "safetensors_bytes": len(weights),
        "sealed_bytes": len(blob),
        "seconds": {"save": t_save, "load": t_load, "seal": t_seal, "open": t_open},
        "samples": {"save": s_save, "load": s_load, "seal": s_seal, "open": s_open},
        "ratio_seal_open_to_save": (t_seal + t_open) / t_save,
        "ratio_end_to_end": (t_save + t_seal + t_open + t_load) / (t_save + t_load),
    }


def make_log(path: Path, records: int) -> tuple[bytes, bytes]:
    """A log of ``records`` records shaped like real jobs; returns (owner card, entity card)."""
    import torch
    from safetensors.torch import save

    from protocol.audit import AuditLog, countersign_checkpoint, make_receipt
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
            opened = open_bundle(sealed.blob, kind="model", job_id=job_id, request_hash=digest(b"o"), recipient=entity, senders={owner.fingerprint: owner.card})
            steps = [
                lambda: log.append("job.started", {"job_id": job_id}),
                lambda: log.record_sent(sealed, recipient=entity.card, request={"job_id": job_id}),
                lambda: log.record_countersignature(countersign_checkpoint(log.checkpoint(), owner=owner.card, entity=entity), entity=entity.card),
                lambda: log.record_receipt(make_receipt(opened, entity=entity, job_id=job_id), entity=entity.card),
                lambda: log.append("job.finished", {"job_id": job_id}),
                lambda: log.checkpoint(),
            ]
            for step in steps:
                if log.size >= records:
                    break
                step()
            job += 1
    return owner.card.to_bytes(), entity.card.to_bytes()


def bench_log(records: int, reps: int) -> dict[str, object]:
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
        t_verify, samples = _median(lambda: verify_log(path, owner=owner, entity=entity), reps)
        t_quick, quick_samples = _median(lambda: verify_log(path, owner=owner, entity=entity, every_signature=False), reps)
        cli = [sys.executable, "-m", "owner.audit", "verify", str(path), "--owner", str(Path(tmp) / "owner.json"), "--entity", str(Path(tmp) / "entity.json")]

        def run_cli() -> None:
            out = subprocess.run(cli, cwd=ROOT, capture_output=True, text=True)
            assert out.returncode == 0, out.stdout + out.stderr

        t_cli, cli_samples = _median(run_cli, max(3, reps // 2))
        cli.append("--quick")
        t_cli_quick, cli_quick_samples = _median(run_cli, max(3, reps // 2))
        return {
            "records": verdict.records, "checkpoints": verdict.checkpoints, "receipts": verdict.receipts,
            "bytes": path.stat().st_size, "build_seconds": build,
            "verify_seconds": t_verify, "verify_samples": samples,
            "cli_seconds": t_cli, "cli_samples": cli_samples,
            "verify_quick_seconds": t_quick, "verify_quick_samples": quick_samples,
            "cli_quick_seconds": t_cli_quick, "cli_quick_samples": cli_quick_samples,
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
        "machine": {"platform": platform.platform(), "python": platform.python_version(), "torch": torch.__version__,
                    "cryptography": cryptography.__version__, "cpu_count": os.cpu_count(),
                    "loadavg_start": [round(x, 2) for x in load_start], "loadavg_end": [round(x, 2) for x in load_end],
                    "ed25519_verify_us": ed_us},
        "artifact": artifact,
        "audit_log": log,
        "targets": {"ratio_seal_open_to_save": 1.5, "verify_10k_seconds": 2.0},
    }
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "protocol_overhead.json").write_text(json.dumps(result, indent=2, sort_keys=True) + "\n")
    s = artifact["seconds"]
    md = [
        "# Protocol overhead (ResNet-18 artifact, 10k-record audit log)",
        "",
        f"Machine: {result['machine']['platform']}, {result['machine']['cpu_count']} cores (shared), "
        f"torch {torch.__version__}, cryptography {cryptography.__version__}; one torch thread; median of {args.reps}.",
        "",
        f"ResNet-18 state_dict: {artifact['parameters']:,} parameters, {artifact['safetensors_bytes']:,} bytes of safetensors.",
        "",
        "| step | seconds |",
        "|---|---|",
        f"| safetensors save (baseline) | {s['save']:.3f} |",
        f"| safetensors load | {s['load']:.3f} |",
        f"| seal_bundle (hash files + tensors, sign, HPKE seal) | {s['seal']:.3f} |",
        f"| open_bundle (HPKE open, verify signature + every hash) | {s['open']:.3f} |",
        "",
        f"- (seal + open) / save = **{artifact['ratio_seal_open_to_save']:.2f}x** (target at most 1.5x)",
        f"- end to end, (save + seal + open + load) / (save + load) = **{artifact['ratio_end_to_end']:.2f}x**",
        "",
        f"Audit log: {log['records']:,} records ({log['checkpoints']} signed checkpoints, {log['receipts']} receipts, "
        f"{log['bytes']:,} bytes): `verify_log` **{log['verify_seconds']:.3f} s**, "
        f"`python -m owner.audit verify` **{log['cli_seconds']:.3f} s** wall (target under 2 s); "
        f"with `--quick` (owner signature of the last checkpoint only): `verify_log` {log['verify_quick_seconds']:.3f} s, "
        f"CLI {log['cli_quick_seconds']:.3f} s.",
        "",
        f"Load average during the run: {result['machine']['loadavg_start']} at start, {result['machine']['loadavg_end']} at end "
        f"(the machine is shared; Ed25519 verify measured at {result['machine']['ed25519_verify_us']:.0f} us per signature).",
        "",
    ]
    (args.out / "protocol_overhead.md").write_text("\n".join(md))
    print("\n".join(md))
    return 0


if __name__ == "__main__":
    sys.exit(main())
