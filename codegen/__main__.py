"""python -m codegen MODEL --target aarch64-neon|host --out DIR

MODEL is a final-model directory (program.json, weights.safetensors, masks.safetensors) as the
owner writes it. ``--target host`` is the widest host vector flavour this CPU runs (AVX-512 or
AVX2); ``host-avx2`` / ``host-avx512`` name one. ``--threads N`` sets the thread pool the library
starts with. DIR receives bp_model.h, bp_model.c, weights.bin, bp_main.c, a Makefile and a
README. With --build the library and harness are compiled (cross-compiled for aarch64); with
--verify N they are also run on N random inputs (aarch64 under qemu-aarch64) and compared with
PyTorch. Exit 0 ok, 1 error or failed verification, 2 bad usage.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from .emit import MAX_THREADS, Generated, Options
from .ir import CodegenError
from .targets import TARGETS


def _summary(gen: Generated) -> str:
    lines = [
        "| layer | kind | shape (out, in, kh, kw) | stride | out | patterns | kernels | MACs | blocking |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in gen.layers:
        lines.append(
            f"| {r.name} | {r.kind} | {r.shape} | {r.stride} | {r.out_hw[0]}x{r.out_hw[1]} | {r.patterns} | {r.kernels} | {r.macs} | {r.blocking} |"
        )
    sto = [r.storage for r in gen.layers if r.storage is not None]
    if sto:
        dense, csr, comp = sum(s.dense for s in sto), sum(s.csr for s in sto), sum(s.compact for s in sto)
        lines += ["", f"Pattern-sparse 3x3 weights: compact {comp} bytes, CSR {csr} bytes ({comp / csr:.2f} of CSR), dense {dense} bytes."]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m codegen", description="Final model -> pattern-sparse C.")
    parser.add_argument("model", type=Path, help="final-model directory (program.json, weights, masks)")
    parser.add_argument("--target", required=True, choices=sorted(TARGETS), help="code generation target")
    parser.add_argument("--out", type=Path, required=True, help="output folder")
    parser.add_argument("--no-reorder", action="store_true", help="disable filter kernel reorder")
    parser.add_argument("--no-compact", action="store_true", help="disable compressed weight storage")
    parser.add_argument("--no-lre", action="store_true", help="disable load redundancy elimination")
    parser.add_argument("--build", action="store_true", help="compile the library and harness")
    parser.add_argument("--verify", type=int, default=0, metavar="N", help="build, run N random inputs and compare with PyTorch (implies --build)")
    parser.add_argument("--cc", help="compiler to use instead of the target's default")
    parser.add_argument(
        "--threads",
        type=int,
        default=1,
        metavar="N",
        help=f"threads the library starts (1..{MAX_THREADS}; results do not depend on it; BP_THREADS overrides at run time)",
    )
    args = parser.parse_args(argv)
    if args.verify < 0:
        parser.error("--verify must be >= 0")
    if not 1 <= args.threads <= MAX_THREADS:
        parser.error(f"--threads must be between 1 and {MAX_THREADS}")
    target = TARGETS[args.target]
    options = Options(reorder=not args.no_reorder, compact=not args.no_compact, lre=not args.no_lre, threads=args.threads)

    # heavy imports after argument parsing so that --help stays fast
    from protocol.artifact import load_model_dir
    from protocol.cli import run_cli
    from protocol.errors import ArtifactError

    from . import build
    from .emit import generate
    from .ir import lower
    from .templates import render

    def body() -> int:
        try:
            program, masks = load_model_dir(args.model)
        except (ArtifactError, OSError) as exc:
            raise CodegenError(f"cannot read model {args.model}: {exc}") from None
        graph = lower(program, masks)
        gen = generate(graph, target, options)
        files = dict(gen.files)
        files["README.md"] = render(
            "README.md.in", TARGET=target.name, CC=target.cc, IN_SHAPE=gen.in_shape, OUT_SHAPE=gen.out_shape, LAYERS=_summary(gen)
        ).encode()
        build.write_files(files, args.out)
        print(f"wrote {args.out} ({len(gen.layers)} convs, weights.bin {len(files['weights.bin'])} bytes)", file=sys.stderr)
        if args.build or args.verify:
            build.compile_dir(args.out, target, cc=args.cc)
            print(f"built {args.out / 'bp_main'}", file=sys.stderr)
        if args.verify:
            import torch

            from .verify import relative_error

            x = torch.randn(args.verify, *gen.in_shape, generator=torch.Generator().manual_seed(0))
            with torch.no_grad():
                ref = program.module()(x).numpy()
            got, _ = build.run_harness(args.out, target, x.numpy(), gen.out_shape)
            err = relative_error(got, ref.reshape(got.shape))
            if not err <= 1e-4:
                print(f"FAIL: relative error {err:.2e} against PyTorch", file=sys.stderr)
                return 1
            print(f"OK: {args.verify} inputs, relative error {err:.2e} against PyTorch", file=sys.stderr)
        return 0

    return run_cli("codegen", body, errors=(CodegenError,))


if __name__ == "__main__":
    raise SystemExit(main())
