"""Generated pattern-sparse C vs dense runtimes (torch eager, ONNX Runtime), one thread.

    python -m benchmarks.codegen_speed [--rounds N] [--quick] [--skip-layers] [--out benchmarks/results]

Per layer: ResNet-18's 3x3 conv shapes at 2.25x/6x/12x against torch ``conv2d`` and ONNX Runtime
on the same masked weights. Whole network: ResNet-18 (224x224) and the demo model (small VGG,
1x28x28) at the same rates against torch eager and ONNX Runtime, plus an ablation of the three
optimisations. Every runtime is called in the same process, runs are interleaved round by round,
and medians are reported; on a machine shared with other jobs the per-thread CPU time is the
primary figure (all three runtimes compute on the calling thread) and wall time is given too.
Writes ``codegen_speed.md`` (tables) and ``codegen_speed.png`` (bar chart).
"""

from __future__ import annotations

import argparse
import io
import os
import platform
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NoReturn

import numpy as np
import torch
from torch import nn

import codegen
from codegen import build, fixtures
from codegen.emit import Options
from protocol.cli import fatal

RATES = (2.25, 6.0, 12.0)
# (cin, cout, input size, stride) of ResNet-18's 3x3 convolutions at 224x224
LAYERS = ((64, 64, 56, 1), (64, 128, 56, 2), (128, 128, 28, 1), (128, 256, 28, 2), (256, 256, 14, 1), (256, 512, 14, 2), (512, 512, 7, 1))


def _fatal(msg: str) -> NoReturn:
    fatal("benchmarks.codegen_speed", msg)


@dataclass(frozen=True)
class Timing:
    cpu_ms: float
    wall_ms: float


def interleaved(fns: dict[str, Callable[[], object]], rounds: int, calls: int) -> dict[str, Timing]:
    """Median per-call time of each function over ``rounds`` rounds, runtimes alternating."""
    cpu: dict[str, list[float]] = {k: [] for k in fns}
    wall: dict[str, list[float]] = {k: [] for k in fns}
    for fn in fns.values():
        fn()  # warm-up
    names = list(fns)
    for r in range(rounds):
        order = names if r % 2 == 0 else names[::-1]
        for name in order:
            fn = fns[name]
            for _ in range(calls):
                c0, w0 = time.thread_time(), time.perf_counter()
                fn()
                cpu[name].append((time.thread_time() - c0) * 1e3)
                wall[name].append((time.perf_counter() - w0) * 1e3)
    return {k: Timing(float(np.median(cpu[k])), float(np.median(wall[k]))) for k in fns}


def _bound(lib: Callable[[np.ndarray], object], x: np.ndarray) -> Callable[[], object]:
    """``lib(x)`` as a call without arguments (one per library, bound now, not at loop end)."""
    return lambda: lib(x)


def _bound_torch(model: nn.Module, x: torch.Tensor) -> Callable[[], object]:
    """One torch inference of ``model`` on ``x`` as a call without arguments."""

    def run() -> object:
        with torch.no_grad():
            return model(x)

    return run


def _bound_ort(session: Any, x: np.ndarray) -> Callable[[], object]:
    """One ONNX Runtime inference on ``x`` as a call without arguments."""
    return lambda: session.run(None, {"x": x})


def _export(model: nn.Module, shape: tuple[int, ...]) -> torch.export.ExportedProgram:
    example = torch.randn(2, *shape)
    return torch.export.export(model, (example,), dynamic_shapes=({0: torch.export.Dim("batch", min=1, max=64)},))


def _ort_session(model: nn.Module, x: torch.Tensor):
    import onnxruntime as ort

    buf = io.BytesIO()
    # torch.onnx.export documents file objects as well as paths; its annotation names paths only.
    torch.onnx.export(model, (x,), buf, opset_version=17, input_names=["x"], output_names=["y"], dynamo=False)  # type: ignore[arg-type]  # see above
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 1
    opts.inter_op_num_threads = 1
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    return ort.InferenceSession(buf.getvalue(), opts, providers=["CPUExecutionProvider"])


def _compile(
    model: nn.Module, shape: tuple[int, ...], masks: dict, workdir: Path, tag: str, options: Options | None = None
) -> tuple[build.HostLibrary, codegen.Generated]:
    gen = codegen.compile_program(_export(model, shape), masks, codegen.HOST, options or Options())
    out = workdir / tag
    build.write_files(gen.files, out)
    build.compile_dir(out, codegen.HOST, shared=True)
    return build.HostLibrary(out, gen), gen


def _check(name: str, ours: np.ndarray, ref: np.ndarray) -> float:
    err = float(np.abs(ours - ref).max() / max(1e-12, np.abs(ref).max()))
    if err > 1e-4:
        _fatal(f"{name}: generated code disagrees with torch (relative error {err:.2e})")
    return err


def bench_layers(workdir: Path, rounds: int, calls: int, log) -> list[dict]:
    rows = []
    for cin, cout, size, stride in LAYERS:
        for rate in RATES:
            torch.manual_seed(0)
            conv = nn.Conv2d(cin, cout, 3, stride, 1, bias=False).eval()
            masks = fixtures.prune_model(conv, rate)
            masks = {"weight": masks["weight"]}
            x = torch.randn(1, cin, size, size)
            xn = x.numpy()
            lib, gen = _compile(conv, (cin, size, size), masks, workdir, f"l{cin}_{cout}_{size}_{stride}_{rate}")
            sess = _ort_session(conv, x)
            with torch.no_grad():
                ref = conv(x).numpy()
            err = _check(f"layer {cin}->{cout}", lib(xn), ref)

            t = interleaved({"torch": _bound_torch(conv, x), "ort": _bound_ort(sess, xn), "ours": _bound(lib, xn)}, rounds, calls)
            rep = gen.layers[0]
            row = dict(
                layer=f"{cin}->{cout} {size}x{size} s{stride}",
                rate=rate,
                torch=t["torch"],
                ort=t["ort"],
                ours=t["ours"],
                err=err,
                blocking=rep.blocking,
                patterns=rep.patterns,
            )
            rows.append(row)
            log(
                f"layer {row['layer']} {rate}x: torch {t['torch'].cpu_ms:.3f} ort {t['ort'].cpu_ms:.3f} "
                f"ours {t['ours'].cpu_ms:.3f} ms cpu -> {t['torch'].cpu_ms / t['ours'].cpu_ms:.2f}x torch"
            )
            lib.close()
    return rows


def _resnet18() -> tuple[nn.Module, tuple[int, ...]]:
    import torchvision

    return torchvision.models.resnet18(weights=None), (3, 224, 224)


def _demo() -> tuple[nn.Module, tuple[int, ...]]:
    from simulations.models import small_vgg

    return small_vgg(), (1, 28, 28)


def bench_networks(workdir: Path, rounds: int, calls: int, log) -> tuple[list[dict], list[dict], list[dict]]:
    rows, ablation, storage = [], [], []
    for net_name, factory in (("ResNet-18 224x224", _resnet18), ("demo small VGG 28x28", _demo)):
        for rate in RATES:
            torch.manual_seed(0)
            model, shape = factory()
            model.eval()
            fixtures.randomize_batchnorm(model)
            masks = fixtures.prune_model(model, rate)
            x = torch.randn(1, *shape)
            xn = x.numpy()
            with torch.no_grad():
                ref = model(x).numpy()
            variants = {"ours": Options()}
            if rate == 6.0:
                variants.update(
                    {
                        "none": Options(reorder=False, compact=False, lre=False),
                        "reorder": Options(reorder=True, compact=False, lre=False),
                        "reorder+compact": Options(reorder=True, compact=True, lre=False),
                        "reorder+lre": Options(reorder=True, compact=False, lre=True),
                    }
                )
            libs = {}
            for tag, opts in variants.items():
                lib, gen = _compile(model, shape, masks, workdir, f"{net_name.split()[0]}_{rate}_{tag}", opts)
                _check(f"{net_name} {rate}x {tag}", lib(xn), ref)
                libs[tag] = lib
                if tag == "ours":
                    size = sum(len(v) for k, v in gen.files.items() if k == "weights.bin")
                    sto = [r.storage for r in gen.layers if r.storage is not None]
                    storage.append(
                        dict(
                            net=net_name,
                            rate=rate,
                            dense=sum(s.dense for s in sto),
                            csr=sum(s.csr for s in sto),
                            compact=sum(s.compact for s in sto),
                            file=size,
                        )
                    )
            sess = _ort_session(model, x)

            fns: dict[str, Callable[[], object]] = {"torch": _bound_torch(model, x), "ort": _bound_ort(sess, xn)}
            fns.update({k: _bound(lib, xn) for k, lib in libs.items()})
            t = interleaved(fns, rounds, calls)
            rows.append(dict(net=net_name, rate=rate, torch=t["torch"], ort=t["ort"], ours=t["ours"]))
            log(
                f"{net_name} {rate}x: torch {t['torch'].cpu_ms:.2f} ort {t['ort'].cpu_ms:.2f} "
                f"ours {t['ours'].cpu_ms:.2f} ms cpu -> {t['torch'].cpu_ms / t['ours'].cpu_ms:.2f}x torch, "
                f"{t['ort'].cpu_ms / t['ours'].cpu_ms:.2f}x ORT"
            )
            if len(variants) > 1:
                for k in variants:
                    ablation.append(dict(net=net_name, rate=rate, variant=k, t=t[k], torch=t["torch"]))
            for lib in libs.values():
                lib.close()
    return rows, ablation, storage


def render(layers: list[dict], nets: list[dict], ablation: list[dict], storage: list[dict], meta: str) -> str:
    out = ["# Generated pattern-sparse C vs dense runtimes (1 thread)", "", meta, ""]
    out += [
        "## Whole network",
        "",
        "| model | rate | torch eager ms | ONNX Runtime ms | ours ms | x torch | x ORT | ours wall ms |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in nets:
        out.append(
            f"| {r['net']} | {r['rate']}x | {r['torch'].cpu_ms:.2f} | {r['ort'].cpu_ms:.2f} | "
            f"{r['ours'].cpu_ms:.2f} | **{r['torch'].cpu_ms / r['ours'].cpu_ms:.2f}** | "
            f"**{r['ort'].cpu_ms / r['ours'].cpu_ms:.2f}** | {r['ours'].wall_ms:.2f} |"
        )
    if ablation:
        out += [
            "",
            "## The three optimisations (6x)",
            "",
            "Each switch of `codegen.Options` on top of the previous ones (`none`: natural filter order with "
            "a pattern `switch` per kernel, dense 3x3 weights read through the pattern, 1x1 tiles).",
            "",
            "| model | variant | ms | x torch |",
            "|---|---|---|---|",
        ]
        for r in ablation:
            out.append(f"| {r['net']} | {r['variant']} | {r['t'].cpu_ms:.2f} | {r['torch'].cpu_ms / r['t'].cpu_ms:.2f} |")
    if storage:
        out += [
            "",
            "## Weight storage of the pattern-sparse 3x3 convs",
            "",
            "| model | rate | dense fp32 | CSR (fp32 + int32 idx) | compact (ours) | compact / CSR | weights.bin (all layers) |",
            "|---|---|---|---|---|---|---|",
        ]
        for s in storage:
            out.append(
                f"| {s['net']} | {s['rate']}x | {s['dense'] / 1e6:.2f} MB | {s['csr'] / 1e6:.2f} MB | "
                f"{s['compact'] / 1e6:.2f} MB | {s['compact'] / s['csr']:.2f} | {s['file'] / 1e6:.2f} MB |"
            )
    if layers:
        out += [
            "",
            "## Per layer (ResNet-18 3x3 shapes)",
            "",
            "Ideal speedup over dense = the compression rate; efficiency = speedup over torch / rate.",
            "",
            "| layer | rate | torch ms | ORT ms | ours ms | x torch | x ORT | % of ideal | blocking |",
            "|---|---|---|---|---|---|---|---|---|",
        ]
        for r in layers:
            sp = r["torch"].cpu_ms / r["ours"].cpu_ms
            out.append(
                f"| {r['layer']} | {r['rate']}x | {r['torch'].cpu_ms:.3f} | {r['ort'].cpu_ms:.3f} | "
                f"{r['ours'].cpu_ms:.3f} | {sp:.2f} | {r['ort'].cpu_ms / r['ours'].cpu_ms:.2f} | "
                f"{100 * sp / r['rate']:.0f}% | {r['blocking']} |"
            )
    return "\n".join(out) + "\n"


def plot(nets: list[dict], layers: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    n_axes = 2 if layers else 1
    fig, axes = plt.subplots(1, n_axes, figsize=(7 * n_axes, 4.2))
    axes = np.atleast_1d(axes)
    labels = [f"{r['net'].split()[0]}\n{r['rate']}x" for r in nets]
    xs = np.arange(len(nets))
    for k, (key, name) in enumerate((("torch", "torch eager"), ("ort", "ONNX Runtime"), ("ours", "generated C"))):
        axes[0].bar(xs + (k - 1) * 0.27, [r[key].cpu_ms for r in nets], 0.27, label=name)
    axes[0].set_xticks(xs, labels, fontsize=8)
    axes[0].set_ylabel("ms per image (1 thread, median)")
    axes[0].set_yscale("log")
    axes[0].set_title("whole network")
    axes[0].legend(fontsize=8)
    if layers:
        ll = [f"{r['layer'].split()[0]}\ns{r['layer'][-1]} {r['rate']:g}x" for r in layers]
        xs = np.arange(len(layers))
        axes[1].bar(xs - 0.2, [r["torch"].cpu_ms / r["ours"].cpu_ms for r in layers], 0.4, label="x torch")
        axes[1].bar(xs + 0.2, [r["rate"] for r in layers], 0.4, label="ideal (rate)", alpha=0.5)
        axes[1].set_xticks(xs, ll, fontsize=6, rotation=90)
        axes[1].set_ylabel("speedup over dense torch conv2d")
        axes[1].set_title("ResNet-18 3x3 layers")
        axes[1].legend(fontsize=8)
    fig.tight_layout()
    tmp = path.with_suffix(".tmp.png")
    fig.savefig(tmp, dpi=120)
    os.replace(tmp, path)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.codegen_speed", description=__doc__.split("\n")[0])
    parser.add_argument("--rounds", type=int, default=15, help="interleaved rounds (default 15)")
    parser.add_argument("--calls", type=int, default=3, help="calls per runtime per round (default 3)")
    parser.add_argument("--skip-layers", action="store_true", help="whole networks only")
    parser.add_argument("--quick", action="store_true", help="3 rounds of 1 call (smoke run)")
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results"))
    args = parser.parse_args(argv)
    if args.quick:
        args.rounds, args.calls = 3, 1
    torch.set_num_threads(1)
    missing = codegen.HOST.missing()
    if missing:
        _fatal(f"the host build needs Debian package(s) {', '.join(missing)}")

    def log(msg: str) -> None:
        print(msg, file=sys.stderr, flush=True)

    with tempfile.TemporaryDirectory(prefix="bp-codegen-") as tmp:
        workdir = Path(tmp)
        nets, ablation, storage = bench_networks(workdir, args.rounds, args.calls, log)
        layers = [] if args.skip_layers else bench_layers(workdir, args.rounds, args.calls, log)
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    meta = (
        f"Machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores **shared with other "
        f"jobs** (load average {load:.1f} at the end), torch {torch.__version__}, onnxruntime "
        f"{__import__('onnxruntime').__version__}, host build `cc {' '.join(codegen.HOST.cflags)}`. One thread "
        f"everywhere; {args.rounds} interleaved rounds x {args.calls} calls, medians of per-thread CPU time "
        f"(all runtimes compute on the calling thread; wall medians are inflated by the other jobs). Batch 1. "
        f"Masks: magnitude pattern pruning (8 patterns per layer, whole kernels removed; conv rate = "
        f"9/4 / kept-kernel fraction, stem and 1x1 convs dense). Outputs checked against torch (rel. err <= 1e-4)."
    )
    args.out.mkdir(parents=True, exist_ok=True)
    text = render(layers, nets, ablation, storage, meta)
    tmp_md = args.out / ".codegen_speed.md.tmp"
    tmp_md.write_text(text)
    os.replace(tmp_md, args.out / "codegen_speed.md")
    plot(nets, layers, args.out / "codegen_speed.png")
    print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
