"""Generated pattern-sparse C vs torch eager, ONNX Runtime and MNN's sparse path, 1 and 2 threads.

    python -m benchmarks.codegen_speed [--rounds N] [--quick] [--skip-layers | --layers-only] [--threads 1,2] [--out benchmarks/results]

Whole networks: ResNet-18 (224x224, 3x3 convs pattern-pruned to 6x and 12x) and MobileNet-V2
(224x224, dense, and pruned: depthwise 3x3 kernels to one library pattern each, 1x1 convs and the
classifier by whole rows and columns), each runtime at 1 and 2 threads on the same masked
weights. MNN is converted from the same ONNX file with its converter binding (``_tools.mnnconvert``,
``--detectSparseSpeedUp``), never its console script, which installs a logging package and sends
usage data. Per layer: ResNet-18's 3x3 conv shapes at 2.25x/6x/12x and the two dense stems
against torch ``conv2d`` and ONNX Runtime, one thread, with the % of ideal (speedup over torch
divided by the compression rate). Every runtime is called in the same process, runs are
interleaved round by round (each batch after one untimed call) and medians of wall time are
reported; the load average at the start and end goes into the file, since numbers from a loaded
machine are not results.
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
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NoReturn

import numpy as np
import torch
from torch import nn

import codegen
from codegen import build, fixtures
from codegen.emit import Generated, Options
from codegen.targets import host_cpu_flags
from protocol.cli import fatal

RATES = (2.25, 6.0, 12.0)
# (cin, cout, input size, stride) of ResNet-18's 3x3 convolutions at 224x224
LAYERS = ((64, 64, 56, 1), (64, 128, 56, 2), (128, 128, 28, 1), (128, 256, 28, 2), (256, 256, 14, 1), (256, 512, 14, 2), (512, 512, 7, 1))
# (name, cin, cout, kernel, stride, input size) of the dense stems, timed at rate 1
STEMS = (("ResNet-18 stem", 3, 64, 7, 2, 224), ("MobileNet-V2 stem", 3, 32, 3, 2, 224))
STRUCTURED_RATE = 4.0  # MobileNet-V2 pruned: 1x1 convs and the classifier, rows x columns


def _fatal(msg: str) -> NoReturn:
    fatal("benchmarks.codegen_speed", msg)


@dataclass(frozen=True)
class Timing:
    cpu_ms: float
    wall_ms: float


def interleaved(fns: dict[str, Callable[[], object]], rounds: int, calls: int) -> dict[str, Timing]:
    """Median per-call time of each function over ``rounds`` rounds, runtimes alternating.

    Each runtime's batch starts with one untimed call: the timed calls then measure a runtime
    running frame after frame, as an app does, not the caches the one before left cold, its pool
    threads woken from sleep, or another runtime's workers still spinning on the same cores.
    """
    cpu: dict[str, list[float]] = {k: [] for k in fns}
    wall: dict[str, list[float]] = {k: [] for k in fns}
    names = list(fns)
    for r in range(rounds):
        order = names if r % 2 == 0 else names[::-1]
        for name in order:
            fn = fns[name]
            fn()
            for _ in range(calls):
                c0, w0 = time.thread_time(), time.perf_counter()
                fn()
                cpu[name].append((time.thread_time() - c0) * 1e3)
                wall[name].append((time.perf_counter() - w0) * 1e3)
    return {k: Timing(float(np.median(cpu[k])), float(np.median(wall[k]))) for k in fns}


def _bound(lib: Callable[[np.ndarray], object], x: np.ndarray) -> Callable[[], object]:
    """``lib(x)`` as a call without arguments (one per library, bound now, not at loop end)."""
    return lambda: lib(x)


def _bound_torch(model: nn.Module, x: torch.Tensor, threads: int = 1) -> Callable[[], object]:
    """One torch inference of ``model`` on ``x`` with ``threads`` intra-op threads."""

    def run() -> object:
        if torch.get_num_threads() != threads:
            torch.set_num_threads(threads)
        with torch.no_grad():
            return model(x)

    return run


def _bound_ort(session: Any, x: np.ndarray) -> Callable[[], object]:
    """One ONNX Runtime inference on ``x`` as a call without arguments."""
    return lambda: session.run(None, {"x": x})


def _export(model: nn.Module, shape: tuple[int, ...]) -> torch.export.ExportedProgram:
    example = torch.randn(2, *shape)
    return torch.export.export(model, (example,), dynamic_shapes=({0: torch.export.Dim("batch", min=1, max=64)},))


def _onnx(model: nn.Module, x: torch.Tensor) -> bytes:
    buf = io.BytesIO()
    # torch.onnx.export documents file objects as well as paths; its annotation names paths only.
    torch.onnx.export(model, (x,), buf, opset_version=17, input_names=["x"], output_names=["y"], dynamo=False)  # type: ignore[arg-type]  # see above
    return buf.getvalue()


def _ort_session(onnx: bytes, threads: int = 1):
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    opts.inter_op_num_threads = 1
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    return ort.InferenceSession(onnx, opts, providers=["CPUExecutionProvider"])


@contextmanager
def _quiet_stdout() -> Iterator[None]:
    """Silence C-level writes to fd 1 (MNN's converter prints its progress there)."""
    sys.stdout.flush()
    saved = os.dup(1)
    try:
        with open(os.devnull, "wb") as null:
            os.dup2(null.fileno(), 1)
            yield
    finally:
        os.dup2(saved, 1)
        os.close(saved)


def mnn_convert(onnx: bytes, workdir: Path, tag: str) -> Path:
    """ONNX -> MNN with sparse detection, through the converter's C binding only."""
    import _tools  # MNN's converter binding (not MNN.tools.mnnconvert: it phones home)

    src, dst = workdir / f"{tag}.onnx", workdir / f"{tag}.mnn"
    src.write_bytes(onnx)
    argv = ["mnnconvert", "-f", "ONNX", "--modelFile", str(src), "--MNNModel", str(dst), "--bizCode", "blindprune", "--detectSparseSpeedUp"]
    with _quiet_stdout():
        ok = _tools.mnnconvert(argv)
    if not ok or not dst.is_file():
        _fatal(f"MNN could not convert {tag}")
    return dst


class MnnRunner:
    """One MNN CPU session (``threads`` threads) with its input and output tensors bound."""

    def __init__(self, path: Path, shape: tuple[int, ...], threads: int) -> None:
        import MNN

        self._mnn = MNN
        self._interp = MNN.Interpreter(str(path))
        self._sess = self._interp.createSession({"numThread": threads, "backend": "CPU"})
        self._in = self._interp.getSessionInput(self._sess)
        self._out = self._interp.getSessionOutput(self._sess)
        self._shape = shape

    def __call__(self, x: np.ndarray) -> np.ndarray:
        mnn = self._mnn
        self._in.copyFrom(mnn.Tensor(self._shape, mnn.Halide_Type_Float, np.ascontiguousarray(x, np.float32), mnn.Tensor_DimensionType_Caffe))
        self._interp.runSession(self._sess)
        shape = self._out.getShape()
        host = mnn.Tensor(shape, mnn.Halide_Type_Float, np.zeros(shape, np.float32), mnn.Tensor_DimensionType_Caffe)
        self._out.copyToHostTensor(host)
        return np.array(host.getData(), dtype=np.float32).reshape(shape)


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
        _fatal(f"{name}: output disagrees with torch (relative error {err:.2e})")
    return err


def _layer_row(name: str, conv: nn.Conv2d, masks: dict, size: int, rate: float, workdir: Path, rounds: int, calls: int) -> dict:
    """One conv against torch and ONNX Runtime on the same (masked) weights, one thread."""
    x = torch.randn(1, conv.in_channels, size, size)
    xn = x.numpy()
    lib, gen = _compile(conv, (conv.in_channels, size, size), masks, workdir, name.replace(" ", "_").replace(">", "") + f"_{rate}")
    sess = _ort_session(_onnx(conv, x))
    with torch.no_grad():
        ref = conv(x).numpy()
    _check(f"layer {name}", lib(xn), ref)
    t = interleaved({"torch": _bound_torch(conv, x), "ort": _bound_ort(sess, xn), "ours": _bound(lib, xn)}, rounds, calls)
    lib.close()
    return dict(layer=name, rate=rate, torch=t["torch"], ort=t["ort"], ours=t["ours"], blocking=gen.layers[0].blocking)


def bench_layers(workdir: Path, rounds: int, calls: int, log: Callable[[str], None]) -> list[dict]:
    rows = []
    for name, cin, cout, k, stride, size in STEMS:
        torch.manual_seed(0)
        conv = nn.Conv2d(cin, cout, k, stride, k // 2, bias=False).eval()
        rows.append(_layer_row(f"{name} {cin}->{cout} {k}x{k} {size}x{size} s{stride}", conv, {}, size, 1.0, workdir, rounds, calls))
        log(_layer_line(rows[-1]))
    for cin, cout, size, stride in LAYERS:
        for rate in RATES:
            torch.manual_seed(0)
            conv = nn.Conv2d(cin, cout, 3, stride, 1, bias=False).eval()
            masks = {"weight": fixtures.prune_model(conv, rate)["weight"]}
            rows.append(_layer_row(f"{cin}->{cout} {size}x{size} s{stride}", conv, masks, size, rate, workdir, rounds, calls))
            log(_layer_line(rows[-1]))
    return rows


def _layer_line(row: dict) -> str:
    t = {k: row[k].wall_ms for k in ("torch", "ort", "ours")}
    speed = t["torch"] / t["ours"]
    return f"layer {row['layer']} {row['rate']}x: torch {t['torch']:.3f} ort {t['ort']:.3f} ours {t['ours']:.3f} ms -> {speed:.2f}x torch"


@dataclass(frozen=True)
class Net:
    """One whole-network case: a torchvision factory and how its masks are made."""

    label: str
    factory: str
    rate: float | None  # 3x3 pattern-pruning rate (None: dense)
    mobile: bool = False  # also depthwise patterns and structured 1x1 / Linear masks


NETS = (
    Net("ResNet-18 6x", "resnet18", 6.0),
    Net("ResNet-18 12x", "resnet18", 12.0),
    Net("MobileNet-V2 dense", "mobilenet_v2", None),
    Net("MobileNet-V2 pruned", "mobilenet_v2", 6.0, mobile=True),
)


def _masked(net: Net) -> tuple[nn.Module, dict[str, torch.Tensor]]:
    import torchvision

    torch.manual_seed(0)
    model = getattr(torchvision.models, net.factory)(weights=None).eval()
    fixtures.randomize_batchnorm(model)
    if net.rate is None:
        return model, {}
    structured = STRUCTURED_RATE if net.mobile else None
    return model, fixtures.prune_model(model, net.rate, depthwise=net.mobile, structured=structured)


def _model_rate(model: nn.Module, masks: dict[str, torch.Tensor]) -> float:
    """Whole-model weight compression: all conv and linear weights / the ones kept."""
    total = kept = 0
    for name, p in model.named_parameters():
        if name.endswith("weight") and p.dim() in (2, 4):
            total += p.numel()
            kept += int(masks[name].sum()) if name in masks else p.numel()
    return total / max(1, kept)


def _work_rate(gen: Generated) -> float:
    """Conv MACs of the dense model / the ones the generated code computes (kept weights of the
    channels some layer reads)."""
    dense = sum(int(np.prod(r.shape)) * r.out_hw[0] * r.out_hw[1] for r in gen.layers)
    return dense / max(1, sum(r.macs for r in gen.layers))


def bench_networks(
    workdir: Path, rounds: int, calls: int, threads: tuple[int, ...], log: Callable[[str], None]
) -> tuple[list[dict], list[dict], list[dict]]:
    rows, ablation, storage = [], [], []
    shape = (3, 224, 224)
    for net in NETS:
        model, masks = _masked(net)
        x = torch.randn(1, *shape)
        xn = x.numpy()
        with torch.no_grad():
            ref = model(x).numpy()
        onnx = _onnx(model, x)
        mnn_path = mnn_convert(onnx, workdir, net.label.replace(" ", "_"))
        fns: dict[str, Callable[[], object]] = {}
        tag = net.label.replace(" ", "_")
        first, gen = _compile(model, shape, masks, workdir, tag)
        libs = [first]
        for n in threads:
            lib = first if n == threads[0] else build.HostLibrary(workdir / tag, gen)  # one more model on the same library
            lib.set_threads(n)
            _check(f"{net.label} ours, {n} threads", lib(xn), ref)
            mnn = MnnRunner(mnn_path, (1, *shape), n)
            _check(f"{net.label} MNN, {n} threads", mnn(xn), ref)
            if lib is not first:
                libs.append(lib)
            fns[f"torch/{n}"] = _bound_torch(model, x, n)
            fns[f"ort/{n}"] = _bound_ort(_ort_session(onnx, n), xn)
            fns[f"mnn/{n}"] = _bound(mnn, xn)
            fns[f"ours/{n}"] = _bound(lib, xn)
        variants: dict[str, Options] = {}
        if net.label == "ResNet-18 6x":
            variants = {
                "none": Options(reorder=False, compact=False, lre=False),
                "reorder": Options(reorder=True, compact=False, lre=False),
                "reorder+compact": Options(reorder=True, compact=True, lre=False),
                "reorder+lre": Options(reorder=True, compact=False, lre=True),
            }
        for variant, opts in variants.items():
            lib, _ = _compile(model, shape, masks, workdir, f"{tag}_{variant}", opts)
            _check(f"{net.label} {variant}", lib(xn), ref)
            libs.append(lib)
            fns[variant] = _bound(lib, xn)
        t = interleaved(fns, rounds, calls)
        torch.set_num_threads(1)
        for n in threads:
            times = {k: t[f"{k}/{n}"] for k in ("torch", "ort", "mnn", "ours")}
            rows.append(dict(net=net.label, threads=n, rate=_model_rate(model, masks), work=_work_rate(gen), **times))
            ms = {k: v.wall_ms for k, v in times.items()}
            log(
                f"{net.label} {n} thread(s): torch {ms['torch']:.2f} ort {ms['ort']:.2f} mnn {ms['mnn']:.2f} ours {ms['ours']:.2f} ms -> "
                f"{ms['torch'] / ms['ours']:.2f}x torch, {ms['ort'] / ms['ours']:.2f}x ORT, {ms['mnn'] / ms['ours']:.2f}x MNN"
            )
        for variant in ("ours", *variants) if variants else ():
            key = f"ours/{threads[0]}" if variant == "ours" else variant
            ablation.append(dict(net=net.label, variant=variant, t=t[key], torch=t[f"torch/{threads[0]}"]))
        sto = [r.storage for r in gen.layers if r.storage is not None]
        storage.append(
            dict(
                net=net.label,
                dense=sum(s.dense for s in sto),
                csr=sum(s.csr for s in sto),
                compact=sum(s.compact for s in sto),
                file=len(gen.files["weights.bin"]),
            )
        )
        for lib in libs:
            lib.close()
    return rows, ablation, storage


def _x(a: Timing, b: Timing) -> float:
    return a.wall_ms / b.wall_ms


def targets(nets: list[dict], layers: list[dict]) -> list[str]:
    """The issue's bars, each with its measured value and verdict."""
    out = []

    def line(what: str, value: float, bar: float) -> None:
        out.append(f"- {what}: {value:.2f} (bar {bar:g}): **{'met' if value >= bar else 'NOT met'}**")

    by = {(r["net"], r["threads"]): r for r in nets}
    r6 = by.get(("ResNet-18 6x", 1))
    if r6:
        line("ResNet-18 6x, 1 thread, x torch", _x(r6["torch"], r6["ours"]), 4.0)
        line("ResNet-18 6x, 1 thread, x ONNX Runtime", _x(r6["ort"], r6["ours"]), 2.2)
        line("ResNet-18 6x, 1 thread, x MNN sparse", _x(r6["mnn"], r6["ours"]), 2.0)
    mp = by.get(("MobileNet-V2 pruned", 1))
    if mp:
        line("MobileNet-V2 pruned, 1 thread, x ONNX Runtime", _x(mp["ort"], mp["ours"]), 1.5)
    for r in nets:
        one = by.get((r["net"], 1))
        if r["threads"] == 2 and one:
            line(f"{r['net']}: ours on 2 threads, x ours on 1", _x(one["ours"], r["ours"]), 1.7)
    for r in layers:
        if r["rate"] in (1.0, 6.0):
            line(f"layer {r['layer']} at {r['rate']:g}x, % of ideal / 100", _x(r["torch"], r["ours"]) / r["rate"], 0.6)
    return out


def render(layers: list[dict], nets: list[dict], ablation: list[dict], storage: list[dict], meta: str) -> str:
    out = ["# Generated pattern-sparse C vs torch, ONNX Runtime and MNN (sparse), 1 and 2 threads", "", meta, ""]
    if nets:  # absent with --layers-only
        out += [
            "## Whole network (224x224, batch 1, median wall ms)",
            "",
            "| model | weights / kept | conv MACs / ours | threads | torch eager | ONNX Runtime | MNN sparse | ours | x torch | x ORT | x MNN |",
            "|---|---|---|---|---|---|---|---|---|---|---|",
        ]
    for r in nets:
        out.append(
            f"| {r['net']} | {r['rate']:.2f}x | {r['work']:.2f}x | {r['threads']} | "
            f"{r['torch'].wall_ms:.2f} | {r['ort'].wall_ms:.2f} | {r['mnn'].wall_ms:.2f} | {r['ours'].wall_ms:.2f} | "
            f"**{_x(r['torch'], r['ours']):.2f}** | **{_x(r['ort'], r['ours']):.2f}** | **{_x(r['mnn'], r['ours']):.2f}** |"
        )
    by = {(r["net"], r["threads"]): r for r in nets}
    scaling = [f"{r['net']} {_x(by[r['net'], 1]['ours'], r['ours']):.2f}x" for r in nets if r["threads"] > 1 and (r["net"], 1) in by]
    if scaling:
        out += ["", "Scaling of ours from 1 to 2 threads: " + ", ".join(scaling) + "."]
    if ablation:
        out += [
            "",
            "## The three optimisations (ResNet-18 6x, 1 thread)",
            "",
            "Each switch of `codegen.Options` on top of the previous ones (`none`: natural filter order with "
            "a pattern `switch` per kernel, dense 3x3 weights read through the pattern, 1x1 tiles).",
            "",
            "| variant | ms | x torch |",
            "|---|---|---|",
        ]
        for r in ablation:
            out.append(f"| {r['variant']} | {r['t'].wall_ms:.2f} | {_x(r['torch'], r['t']):.2f} |")
    if storage:
        out += [
            "",
            "## Weight storage of the pattern-sparse convs (3x3 and depthwise)",
            "",
            "| model | dense fp32 | CSR (fp32 + int32 idx) | compact (ours) | compact / CSR | weights.bin (all layers) |",
            "|---|---|---|---|---|---|",
        ]
        for s in storage:
            ratio = f"{s['compact'] / s['csr']:.2f}" if s["csr"] else "-"
            mb = {k: f"{s[k] / 1e6:.2f} MB" for k in ("dense", "csr", "compact", "file")}
            out.append(f"| {s['net']} | {mb['dense']} | {mb['csr']} | {mb['compact']} | {ratio} | {mb['file']} |")
    if layers:
        out += [
            "",
            "## Per layer (ResNet-18 3x3 shapes and the dense stems, 1 thread)",
            "",
            "Ideal speedup over dense = the compression rate (1 for a dense stem); % of ideal = speedup over torch / rate.",
            "",
            "| layer | rate | torch ms | ORT ms | ours ms | x torch | x ORT | % of ideal | blocking |",
            "|---|---|---|---|---|---|---|---|---|",
        ]
        for r in layers:
            sp = _x(r["torch"], r["ours"])
            out.append(
                f"| {r['layer']} | {r['rate']:g}x | {r['torch'].wall_ms:.3f} | {r['ort'].wall_ms:.3f} | {r['ours'].wall_ms:.3f} | "
                f"{sp:.2f} | {_x(r['ort'], r['ours']):.2f} | {100 * sp / r['rate']:.0f}% | {r['blocking']} |"
            )
    out += ["", "## Targets (issue 13)", "", *targets(nets, layers)]
    return "\n".join(out) + "\n"


def plot(nets: list[dict], layers: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    n_axes = 2 if layers else 1
    fig, axes = plt.subplots(1, n_axes, figsize=(7 * n_axes, 4.2))
    axes = np.atleast_1d(axes)
    labels = [f"{r['net']}\n{r['threads']} thr" for r in nets]
    xs = np.arange(len(nets))
    runtimes = (("torch", "torch eager"), ("ort", "ONNX Runtime"), ("mnn", "MNN sparse"), ("ours", "generated C"))
    for k, (key, name) in enumerate(runtimes):
        axes[0].bar(xs + (k - 1.5) * 0.2, [r[key].wall_ms for r in nets], 0.2, label=name)
    axes[0].set_xticks(xs, labels, fontsize=6)
    axes[0].set_ylabel("ms per image (median wall)")
    axes[0].set_yscale("log")
    axes[0].set_title("whole network, 224x224")
    axes[0].legend(fontsize=7)
    if layers:
        ll = [f"{r['layer'].split()[0]}\n{r['rate']:g}x" for r in layers]
        xs = np.arange(len(layers))
        axes[1].bar(xs - 0.2, [_x(r["torch"], r["ours"]) for r in layers], 0.4, label="x torch")
        axes[1].bar(xs + 0.2, [r["rate"] for r in layers], 0.4, label="ideal (rate)", alpha=0.5)
        axes[1].set_xticks(xs, ll, fontsize=5, rotation=90)
        axes[1].set_ylabel("speedup over dense torch conv2d")
        axes[1].set_title("ResNet-18 3x3 layers and stems")
        axes[1].legend(fontsize=8)
    fig.tight_layout()
    tmp = path.with_suffix(".tmp.png")
    fig.savefig(tmp, dpi=120)
    os.replace(tmp, path)


def cpu_model() -> str:
    """The CPU's name, family/model and vector extensions from /proc/cpuinfo: the ratios depend on
    them (an AVX-512 machine and an AVX2-only one of the same family differ a lot)."""
    try:
        text = Path("/proc/cpuinfo").read_text(errors="replace")
    except OSError:
        return "CPU unknown"
    fields: dict[str, str] = {}
    for line in text.splitlines():
        key, _, value = line.partition(":")
        fields.setdefault(key.strip(), value.strip())
    vector = [f for f in ("avx2", "fma", "avx512f") if f in host_cpu_flags()]
    family = f"family {fields.get('cpu family', '?')} model {fields.get('model', '?')}"
    return f"{fields.get('model name', 'CPU unknown')} ({family}; {' '.join(vector) or 'no AVX2'})"


def _threads(text: str) -> tuple[int, ...]:
    try:
        values = tuple(int(v) for v in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a comma-separated list of thread counts") from None
    if not values or any(not 1 <= v <= 64 for v in values) or values[0] != 1:
        raise argparse.ArgumentTypeError("thread counts must be 1..64 and start with 1 (the baseline)")
    return values


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.codegen_speed", description=__doc__.split("\n")[0])
    parser.add_argument("--rounds", type=int, default=15, help="interleaved rounds (default 15)")
    parser.add_argument("--calls", type=int, default=3, help="calls per runtime per round (default 3)")
    parser.add_argument("--threads", type=_threads, default=(1, 2), help="thread counts of the whole-network runs (default 1,2)")
    only = parser.add_mutually_exclusive_group()
    only.add_argument("--skip-layers", action="store_true", help="whole networks only")
    only.add_argument("--layers-only", action="store_true", help="the per-layer table only (no whole networks, no MNN)")
    parser.add_argument("--quick", action="store_true", help="3 rounds of 1 call (smoke run)")
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results"))
    args = parser.parse_args(argv)
    if args.quick:
        args.rounds, args.calls = 3, 1
    torch.set_num_threads(1)
    missing = codegen.HOST.missing()
    if missing:
        _fatal(f"the host build needs {', '.join(missing)}")
    for module in ("onnxruntime", "matplotlib") if args.layers_only else ("onnxruntime", "MNN", "_tools", "matplotlib"):
        try:
            __import__(module)
        except ImportError:
            _fatal(f"{module} is missing: pip install -e '.[bench]'")

    def log(msg: str) -> None:
        print(msg, file=sys.stderr, flush=True)

    load_start = os.getloadavg()[0]
    with tempfile.TemporaryDirectory(prefix="bp-codegen-") as tmp:
        workdir = Path(tmp)
        nets, ablation, storage = ([], [], []) if args.layers_only else bench_networks(workdir, args.rounds, args.calls, args.threads, log)
        layers = [] if args.skip_layers else bench_layers(workdir, args.rounds, args.calls, log)
    load_end = os.getloadavg()[0]
    import onnxruntime

    try:
        import MNN

        mnn_version = getattr(MNN, "__version__", "3.6.1")
    except ImportError:  # --layers-only runs without it
        mnn_version = "not installed"
    meta = (
        f"Machine: {platform.machine()}, {cpu_model()}, {os.cpu_count()} cores, **load average {load_start:.1f} at the start, "
        f"{load_end:.1f} at the end** (the run's own two-thread calls add to the end figure; above about 1 at the start something else was "
        f"running and the figures are not results). torch {torch.__version__}, "
        f"onnxruntime {onnxruntime.__version__}, MNN {mnn_version} (sparse: converted with "
        f"`--detectSparseSpeedUp`), host target `{codegen.HOST.isa.name}` ({4 * codegen.HOST.vec * 8}-bit vectors, "
        f"`cc {' '.join(codegen.HOST.cflags)}`). {args.rounds} interleaved rounds x {args.calls} calls after one untimed call, medians of wall time. "
        f"Threads: torch `set_num_threads`, ORT `intra_op_num_threads`, MNN `numThread`, ours `bp_set_threads`. Masks: "
        f"magnitude pattern pruning of 3x3 convs (8 patterns per layer, whole kernels removed; conv rate = 9/4 / kept-kernel "
        f"fraction, stem dense); MobileNet-V2 pruned also keeps one library pattern per depthwise 3x3 kernel and prunes 1x1 convs "
        f"and the classifier by whole rows and columns ({STRUCTURED_RATE:g}x), each layer's rows and columns chosen on their own, so some "
        f"kept weights only feed channels no layer reads: ours does not compute those (`conv MACs / ours`: the dense model's conv "
        f"MACs over the ones our code computes), torch, ORT and MNN run the masked model as it is. Every output checked against torch "
        f"(rel. err <= 1e-4)."
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
