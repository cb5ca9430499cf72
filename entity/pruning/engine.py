"""The ``prune`` driver: exported program + input spec + config -> pruned weights, masks, report.

The lifecycle follows torch.ao.pruning's prepare / step / finalize: ``prepare`` finds the
prunable layers (``graph.pruning_of``), builds the pattern library and splits the budget exactly;
a recipe (``recipes.RECIPES``) then chooses every 3x3 conv's mask and weights in topological
order, and ``extra_layers`` the depthwise 3x3 convs' (one pattern per channel) and, for a
whole-model rate, the 1x1 convs' and linear layers' (whole input columns); ``finalize`` bakes the
masks in, measures each layer's reconstruction error on synthetic data and writes a
canonical-JSON-safe report (fractions as strings, never floats).

Two rates, one rule: ``rate`` is always the conv rate of the pattern-pruned group-1 3x3 convs
(pattern + connectivity, exact to a kernel); depthwise 3x3 convs keep one pattern per channel,
their fixed 9/4, and are not part of the conv rate (a conv rate they would cap at 9/4 on a
MobileNet); ``model_rate``, when given, is dense / kept over every conv and linear weight of the
model (dense layers count as kept), and the 1x1 and linear layers lose as many whole columns as
it needs (exact to a column). Without ``model_rate`` the 1x1 and linear layers stay dense.
"""

from __future__ import annotations

import copy
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, TypeVar

import torch
from torch import fx

from protocol.spec import InputSpec

from . import patterns as pat
from . import structured as st
from .extra_layers import prune_extra_layers
from .graph import (
    COLUMNS,
    DENSE,
    PATTERN,
    ConvLayer,
    GraphError,
    Layer,
    LinearLayer,
    find_convs,
    find_linears,
    get_tensor,
    kind_of,
    pruning_of,
    record,
    set_tensor,
)
from .options import PruneError, RecipeSettings
from .recipes import DEFAULT_RECIPE, RECIPES, recipe_settings
from .synthetic import has_batchnorm, synthesize, uniform_inputs

Progress = Callable[[dict], None]
S = TypeVar("S", bound=RecipeSettings)

# Synthetic-image sources, with the words the job report uses for them.
SYNTHETIC_SOURCES = {
    "uniform": "uniform-noise",
    "bn": "BatchNorm-matched",
    "inversion": "class-inversion (no BatchNorm statistics)",
}


def synthetic_words(kind: str) -> str:
    """How the report names a synthetic source (``supplied`` is the benchmarks' own images)."""
    return SYNTHETIC_SOURCES.get(kind, kind)


def resolve_device(name: str) -> torch.device:
    """``auto`` is CUDA when present, else the CPU; asking for CUDA without it is a ``PruneError``."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise PruneError("device 'cuda' requested but CUDA is not available; use --device cpu or auto")
    return device


@dataclass(frozen=True)
class PruneConfig:
    """What to prune and how. Per-layer settings are keyed by state_dict key, like torch.ao.pruning.

    ``rate`` is the conv compression rate over all prunable group-1 3x3 conv weights (dense /
    kept); ``layer_rates`` pins some of them to their own rate, the others share the rest of the
    budget. ``model_rate`` (optional) is the rate over every conv and linear weight of the model,
    met by pruning the 1x1 convs and linear layers by whole input columns (see the module
    docstring). Depthwise 3x3 convs are always pattern-pruned (9/4). By default the stem conv and
    layers with fewer than ``min_in_channels`` inputs stay dense.

    The fields are what every recipe shares. A recipe's own settings (ADMM's iterations, refit's
    damping...) are ``options``, merged over that recipe's defaults as torch.ao merges a config
    over a sparsifier's ``defaults``; the merged value is ``settings`` (a frozen dataclass of the
    recipe's ``RecipeSettings`` class). An option the recipe does not have is refused.
    """

    rate: float
    model_rate: float | None = None
    skip_layers: tuple[str, ...] = ()
    recipe: str = DEFAULT_RECIPE
    patterns: int = 8
    seed: int = 0
    device: str = "cpu"
    skip_stem: bool = True
    min_in_channels: int = 4
    layer_rates: tuple[tuple[str, float], ...] = ()
    # Synthetic data: "uniform" (the paper), "bn" (ZeroQ BatchNorm matching; a model without
    # BatchNorm gets "inversion" instead) or "inversion" (class-balanced model inversion, no
    # BatchNorm needed); None = the recipe's default.
    synthetic: str | None = None
    synthetic_images: int = 256
    synthetic_steps: int = 200
    eval_images: int = 64
    batch_size: int = 32
    # The recipe's own settings, by name (plain values: they cross into the pruning process as JSON).
    options: Mapping[str, Any] = field(default_factory=dict)
    settings: RecipeSettings = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        if not isinstance(self.rate, (int, float)) or not self.rate >= pat.MIN_RATE - 1e-9:
            raise PruneError(f"compression rate must be at least {pat.MIN_RATE} (four-entry patterns), got {self.rate!r}")
        if self.model_rate is not None and (
            isinstance(self.model_rate, bool) or not isinstance(self.model_rate, (int, float)) or not self.model_rate >= 1
        ):
            raise PruneError(f"whole-model rate must be a number of at least 1, got {self.model_rate!r}")
        if not isinstance(self.options, Mapping):
            raise PruneError(f"recipe options must be a mapping of names to values, got {type(self.options).__name__}")
        object.__setattr__(self, "options", dict(self.options))  # a value: later edits to the caller's dict do not leak in
        object.__setattr__(self, "settings", recipe_settings(self.recipe, self.options))
        if not 1 <= self.patterns <= 56:
            raise PruneError(f"pattern library size must be 1..56, got {self.patterns}")
        if self.synthetic not in (None, *SYNTHETIC_SOURCES):
            raise PruneError(f"synthetic must be one of {', '.join(map(repr, SYNTHETIC_SOURCES))}, got {self.synthetic!r}")
        if self.device not in ("auto", "cpu", "cuda") and not self.device.startswith("cuda:"):
            raise PruneError(f"device must be 'auto', 'cpu' or 'cuda', got {self.device!r}")
        for key, own in self.layer_rates:
            if not own >= pat.MIN_RATE - 1e-9:
                raise PruneError(f"rate for {key} must be at least {pat.MIN_RATE}, got {own}")
        if self.synthetic_images < 1 or self.eval_images < 1 or self.batch_size < 1:
            raise PruneError("synthetic_images, eval_images and batch_size must be positive")


@dataclass(frozen=True)
class PruneResult:
    """Pruned weights (same keys, dtypes, shapes as the program's state_dict), bool masks, report."""

    state_dict: dict[str, torch.Tensor]
    masks: dict[str, torch.Tensor]
    report: dict


@dataclass
class Job:
    """Mutable state a recipe works on: the working model, the dense reference, the plan."""

    config: PruneConfig
    spec: InputSpec
    work: fx.GraphModule  # weights being pruned, in place
    dense: fx.GraphModule  # untouched reference
    layers: list[ConvLayer]  # pattern-pruned group-1 3x3 convs (what a recipe prunes), topological order
    all_layers: list[ConvLayer]  # every conv, pruned or not
    keep: dict[str, int]  # kernels each layer keeps
    library: torch.Tensor  # (P, 3, 3) bool
    device: torch.device
    progress: Progress
    depthwise: list[ConvLayer] = field(default_factory=list)  # depthwise 3x3 convs, one pattern per channel
    structured: list[Layer] = field(default_factory=list)  # 1x1 convs and linear layers losing whole columns
    columns: dict[str, int] = field(default_factory=dict)  # input columns each structured layer keeps
    all_linears: list[LinearLayer] = field(default_factory=list)  # every linear layer, pruned or not
    masks: dict[str, torch.Tensor] = field(default_factory=dict)
    notes: dict = field(default_factory=dict)
    _synthetic: torch.Tensor | None = None

    def dense_weight(self, layer: Layer) -> torch.Tensor:
        return get_tensor(self.dense, layer.key).float()

    def weight_layers(self) -> list[Layer]:
        """Every conv and linear layer of the model, pruned or not (convs first)."""
        return [*self.all_layers, *self.all_linears]

    def pruned_layers(self) -> list[Layer]:
        """Every layer that gets a mask (3x3, depthwise, structured), in graph order."""
        order = {node.name: i for i, node in enumerate(self.dense.graph.nodes)}
        return sorted([*self.layers, *self.depthwise, *self.structured], key=lambda lay: order[lay.node])

    def recipe_settings(self, kind: type[S]) -> S:
        """The config's merged recipe settings, as the running recipe's own class (checked, for its types)."""
        settings = self.config.settings
        if not isinstance(settings, kind):
            raise TypeError(f"recipe {self.config.recipe!r} runs with {type(settings).__name__}, not {kind.__name__}")
        return settings

    def synthetic_kind(self) -> str:
        """The synthetic source this job uses: BatchNorm matching needs BatchNorm, else inversion."""
        kind = self.config.synthetic or RECIPES[self.config.recipe].synthetic
        if kind == "bn" and not has_batchnorm(self.dense):
            return "inversion"
        return kind

    def synthetic(self) -> torch.Tensor:
        """The recipe's synthetic inputs (made once, deterministic for the seed)."""
        if self._synthetic is None:
            kind = self.synthetic_kind()
            start = time.perf_counter()
            x, notes = synthesize(
                kind, self.dense, self.spec, self.config.synthetic_images, self.config.seed, self.config.synthetic_steps, self.device, self.progress
            )
            self.notes.update(notes)
            self.notes["synthetic"] = kind
            self.notes["synthetic_images"] = int(x.shape[0])
            self.notes["synthetic_seconds"] = f"{time.perf_counter() - start:.1f}"
            self._synthetic = x
        return self._synthetic

    def apply(self, layer: Layer, mask: torch.Tensor, weight: torch.Tensor | None = None) -> None:
        """Bake a mask (and optionally new weights) into the working model."""
        w = get_tensor(self.work, layer.key) if weight is None else weight
        mask = mask.to(torch.bool).cpu()
        set_tensor(self.work, layer.key, w.cpu() * mask)
        self.masks[layer.key] = mask


def _fraction(x: float) -> str:
    return f"{x:.4f}"


def _probe(layer: Layer) -> str:
    """Where a layer's error is measured: after its BatchNorm if it has one (rescale-invariant)."""
    return layer.bn.output if layer.bn is not None else layer.node


def layer_errors(job: Job, x: torch.Tensor) -> dict[str, float]:
    """Relative error ||Y_pruned - Y_dense|| / ||Y_dense|| of each pruned layer's output, end to end.

    Y is the conv's BatchNorm output when one follows (so rescaling a conv against its BatchNorm
    does not count as error), else the conv output.
    """
    layers = job.pruned_layers()
    names = {_probe(layer) for layer in layers}
    sums = {n: [0.0, 0.0] for n in names}
    with torch.no_grad():
        for chunk in x.split(128):
            d = record(job.dense, chunk, names)
            p = record(job.work, chunk, names)
            for n in names:
                sums[n][0] += float((p[n] - d[n]).pow(2).sum())
                sums[n][1] += float(d[n].pow(2).sum())
    return {layer.key: (sums[_probe(layer)][0] / max(sums[_probe(layer)][1], 1e-30)) ** 0.5 for layer in layers}


def model_weights(all_layers: list[ConvLayer], linears: list[LinearLayer]) -> dict[str, int]:
    """Weights of every conv and linear layer of the model by key: what the whole-model rate counts."""
    layers: list[Layer] = [*all_layers, *linears]
    return {lay.key: lay.weights for lay in layers}


def allocate_structured(job: Job, model_rate: float) -> dict[str, int]:
    """Input columns each structured layer keeps so the whole-model rate is ``model_rate`` (to a column).

    The group-1 3x3 convs keep what the conv rate gives them, the depthwise convs 4 of 9, every
    dense layer all of its weights; the 1x1 and linear layers share what is left of
    ``round(total / model_rate)`` at one kept fraction where they can (``structured.allocate_columns``).
    """
    total = model_weights(job.all_layers, job.all_linears)
    covered = {lay.key for lay in job.pruned_layers()}
    fixed = 4 * sum(job.keep.values()) + sum(4 * lay.shape[0] for lay in job.depthwise)
    fixed += sum(n for key, n in total.items() if key not in covered)
    target = max(1, round(sum(total.values()) / model_rate))
    rows = [lay.shape[0] for lay in job.structured]
    cols = [lay.shape[1] for lay in job.structured]
    low, high = fixed + sum(rows), fixed + sum(r * c for r, c in zip(rows, cols, strict=True))
    if not job.structured or not low <= target <= high:
        span = (
            f"between {sum(total.values()) / high:.4f} and {sum(total.values()) / low:.4f}"
            if job.structured
            else f"{sum(total.values()) / max(fixed, 1):.4f}"
        )
        raise PruneError(
            f"whole-model rate {model_rate:g} cannot be met at conv rate {job.config.rate:g}: with the 3x3 convs at that rate, "
            f"depthwise convs at 9/4 and {len(job.structured)} 1x1/linear layers pruned by whole columns the model rate is {span}; "
            "change the whole-model rate or the conv rate"
        )
    kept = st.allocate_columns(rows, cols, target - fixed)
    return {lay.key: k for lay, k in zip(job.structured, kept, strict=True)}


def _nothing_for_the_conv_rate(all_layers: list[ConvLayer], depthwise: int, structured: int) -> PruneError:
    grouped = sum(1 for lay in all_layers if lay.groups > 1 and not lay.is_depthwise_3x3)
    parts = [f"its {depthwise} depthwise 3x3 conv(s) keep 9/4 whatever the conv rate"] if depthwise else []
    if structured:
        parts.append(f"its {structured} 1x1 conv/linear layer(s) are pruned only for a whole-model rate (model_rate)")
    if grouped:
        parts.append(f"its {grouped} grouped conv(s) always stay dense")
    why = "; ".join(parts)
    return PruneError(
        "no prunable 3x3 convolution in the model (after skips) for the conv rate"
        + (f"; {why}" if why else "")
        + "; name a whole-model rate, or set skip_stem=False or min_in_channels lower to prune the stem"
    )


def prepare(program: torch.export.ExportedProgram, spec: InputSpec, config: PruneConfig, progress: Progress | None = None) -> Job:
    """Find prunable layers, build the pattern library from the dense weights, split the budget."""
    device = resolve_device(config.device)
    try:
        dense = program.module()
    except Exception as exc:  # torch raises many kinds here; the message is what matters
        raise PruneError(f"cannot rebuild the exported program ({type(exc).__name__})") from exc
    dense = dense.to(device)
    try:
        all_layers = find_convs(dense)
        linears = find_linears(dense)
    except GraphError as exc:
        raise PruneError(str(exc)) from exc
    structured_wanted = config.model_rate is not None

    def pruning(lay: Layer, structured: bool = structured_wanted) -> str:
        return pruning_of(lay, config.skip_layers, config.skip_stem, config.min_in_channels, structured)

    every: list[Layer] = [*all_layers, *linears]
    layers = [lay for lay in all_layers if kind_of(lay) == "3x3" and pruning(lay) == PATTERN]
    depthwise = [lay for lay in all_layers if kind_of(lay) == "depthwise" and pruning(lay) == PATTERN]
    structured = [lay for lay in every if pruning(lay) == COLUMNS]
    if not layers and not structured_wanted:
        raise _nothing_for_the_conv_rate(all_layers, len(depthwise), sum(pruning(lay, True) == COLUMNS for lay in every))
    if not layers and not depthwise and not structured:
        raise PruneError("nothing to prune: the model has no 3x3, depthwise 3x3, 1x1 or linear layer outside the stem, thin layers and skips")
    known = {lay.key for lay in all_layers}
    for key, _ in config.layer_rates:
        if key not in known:
            raise PruneError(f"layer_rates names {key!r}, which is not a conv weight of this model")
    fixed = {i: own for i, lay in enumerate(layers) for key, own in config.layer_rates if key == lay.key}
    try:
        counts = pat.allocate_kernels([lay.kernels for lay in layers], config.rate, fixed) if layers else []
    except pat.RateError as exc:
        raise PruneError(str(exc)) from exc
    # One library for the model: the code generator emits one loop per pattern, whichever layer uses it.
    library = pat.build_library([get_tensor(dense, lay.key).cpu() for lay in [*layers, *depthwise]], config.patterns)
    work = copy.deepcopy(dense)
    job = Job(
        config=config,
        spec=spec,
        work=work,
        dense=dense,
        layers=layers,
        all_layers=all_layers,
        keep={lay.key: k for lay, k in zip(layers, counts, strict=True)},
        library=library,
        device=device,
        progress=progress or (lambda event: None),
        depthwise=depthwise,
        structured=structured,
        all_linears=linears,
    )
    if config.model_rate is not None:
        try:
            job.columns = allocate_structured(job, config.model_rate)
        except pat.RateError as exc:
            raise PruneError(str(exc)) from exc
    return job


def _layer_entry(layer: Layer, mask: torch.Tensor, error: float) -> dict[str, Any]:
    """One pruned layer in the report: kind, how it was pruned, what it keeps, its rate and error."""
    kind, lk = kind_of(layer), int(mask.sum())
    entry: dict[str, Any] = {
        "layer": layer.key,
        "kind": kind,
        "pruning": COLUMNS if kind in ("1x1", "linear") else PATTERN,
        "shape": list(layer.shape),
    }
    if kind == "3x3":
        assert isinstance(layer, ConvLayer)
        entry.update(kernels=layer.kernels, kept_kernels=int(mask.any(dim=(2, 3)).sum()))
    elif entry["pruning"] == COLUMNS:
        entry.update(columns=layer.shape[1], kept_columns=int(st.columns_of(mask).sum()))
    entry.update(kept_weights=lk, rate=_fraction(pat.compression_rate(mask.numel(), lk)), error=_fraction(error))
    return entry


def finalize(job: Job, program: torch.export.ExportedProgram, started: float) -> PruneResult:
    """Bake masks in, measure errors on synthetic data, assemble the result and report."""
    prune_seconds = time.perf_counter() - started
    pruned = job.pruned_layers()
    for layer in pruned:  # masks are the truth: zero anything a recipe left outside them
        set_tensor(job.work, layer.key, get_tensor(job.work, layer.key) * job.masks[layer.key].to(job.device))
    if job._synthetic is not None:
        x = job._synthetic[: job.config.eval_images]
    else:
        x = uniform_inputs(job.spec, job.config.eval_images, job.config.seed + 1, job.device)
        job.notes.setdefault("synthetic", "uniform")
    errors = layer_errors(job, x)
    work_sd = job.work.state_dict()
    state_dict = {}
    for key, ref in program.state_dict.items():
        value = work_sd.get(key, ref)
        state_dict[key] = value.detach().to(device="cpu", dtype=ref.dtype).clone().reshape(ref.shape)
    total = sum(9 * lay.kernels for lay in job.layers)
    kept = sum(int(job.masks[lay.key].sum()) for lay in job.layers)
    per_layer = [_layer_entry(lay, job.masks[lay.key], errors[lay.key]) for lay in pruned]
    weights = model_weights(job.all_layers, job.all_linears)
    model_kept = sum(int(job.masks[key].sum()) if key in job.masks else n for key, n in weights.items())
    report: dict[str, Any] = {
        "recipe": job.config.recipe,
        "recipe_description": RECIPES[job.config.recipe].description,
        "target_rate": _fraction(job.config.rate),
        # The conv rate covers the group-1 3x3 convs only: a model without any has none to claim.
        **({"achieved_rate": _fraction(pat.compression_rate(total, kept))} if job.layers else {}),
        "prunable_weights": total,
        "kept_weights": kept,
        **({"target_model_rate": _fraction(job.config.model_rate)} if job.config.model_rate is not None else {}),
        "achieved_model_rate": _fraction(pat.compression_rate(sum(weights.values()), model_kept)),
        "model_weights": sum(weights.values()),
        "model_kept_weights": model_kept,
        "library": [lib.reshape(-1).to(torch.int64).tolist() for lib in job.library],
        "allocation": job.notes.get("allocation", "uniform"),
        "layers": per_layer,
        "dense_layers": [
            {"layer": lay.key, "kind": kind_of(lay), "pruning": DENSE, "shape": list(lay.shape), "rate": _fraction(1.0)}
            for lay in job.weight_layers()
            if lay.key not in job.masks
        ],
        "dense_convs": [lay.key for lay in job.all_layers if lay.key not in job.masks],
        # Grouped convs other than depthwise 3x3 are never pruned (no pattern library for their kernels).
        "grouped_convs": [lay.key for lay in job.all_layers if lay.groups > 1 and lay.key not in job.masks],
        "seed": job.config.seed,
        "device": job.device.type,
        "seconds": f"{prune_seconds:.2f}",
        "error_measured_on": f"{int(x.shape[0])} {synthetic_words(job.notes.get('synthetic', 'uniform'))} synthetic images",
    }
    report.update({k: v for k, v in job.notes.items() if k not in report})
    return PruneResult(state_dict=state_dict, masks={k: v.clone() for k, v in job.masks.items()}, report=report)


def prune(
    program: torch.export.ExportedProgram,
    spec: InputSpec,
    config: PruneConfig,
    progress: Progress | None = None,
    *,
    inputs: torch.Tensor | None = None,
) -> PruneResult:
    """Prune ``program`` to ``config.rate`` (and ``config.model_rate``) without any real data.

    ``progress`` receives plain dict events (``{"event": "layer", "layer": key, ...}``,
    ``{"event": "synthetic", ...}``); the library never renders them itself.
    ``inputs`` replaces the recipe's synthetic images with given (already normalised) ones: for
    benchmarks only (real images as an upper bound, or synthetic images made once and reused
    across rates). The entity never passes it; the report then says ``"synthetic": "supplied"``.
    """
    started = time.perf_counter()
    torch.manual_seed(config.seed)
    job = prepare(program, spec, config, progress)
    if inputs is not None:
        if tuple(inputs.shape[1:]) != tuple(spec.shape):
            raise PruneError(f"supplied inputs have shape {tuple(inputs.shape[1:])}, the spec says {spec.shape}")
        job._synthetic = inputs.to(job.device)
        job.notes.update({"synthetic": "supplied", "synthetic_images": int(inputs.shape[0])})
    job.progress({"event": "start", "recipe": config.recipe, "layers": len(job.pruned_layers()), "target_rate": _fraction(config.rate)})
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(config.seed)
        RECIPES[config.recipe].run(job)
        prune_extra_layers(job)  # what the recipe left: depthwise and structured layers (none for distill)
    missing = [lay.key for lay in job.pruned_layers() if lay.key not in job.masks]
    if missing:
        raise PruneError(f"recipe {config.recipe} left layers without a mask: {missing}")
    result = finalize(job, program, started)
    report = result.report
    job.progress(
        {
            "event": "done",
            "achieved_rate": report.get("achieved_rate"),
            "achieved_model_rate": report["achieved_model_rate"],
            "seconds": report["seconds"],
        }
    )
    return result
