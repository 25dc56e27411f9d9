"""The quantize/dequantize vocabulary shared by insert_qdq, calibrate and fold_qdq.

Affine quantization of a real x with scale s > 0 and zero point z into [q_min, q_max]:

    q = clamp(round(x · (1/s)) + z, q_min, q_max)        (round half to even)
    x̂ = (q − z) · s

Activations use ``quantized_decomposed.quantize_per_tensor`` → ``dequantize_per_tensor`` (scale and zero
point are scalars in the node's arguments); weights ``quantize_per_channel`` → ``dequantize_per_channel``
along the output-channel axis. Every Q/DQ node carries ``meta[QDQ_KEY] = {"role", "group"}``; the Q/DQ
nodes of one group share a scale and zero point.
"""
from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Iterable, Iterator, Literal, Sequence

import sympy
import torch
import torch.fx as fx

from fxforge.compiler.errors import CalibrationError, PassError
from fxforge.compiler.graph import get_tensor, set_tensor
from fxforge.compiler.ops import (DEQUANTIZE, MATMUL, QUANTIZE, data, is_op, operands, q_params, qd, set_q_scale,
                                  value_of, weight_of)

from .observers import HistogramObserver, Method

QDQ_KEY = "fxforge.qdq"
DTYPES = {"uint8": torch.uint8, "int8": torch.int8}
INT32 = (-(2 ** 31), 2 ** 31 - 1)


def bounds(dtype: torch.dtype) -> tuple[int, int]:
    info = torch.iinfo(dtype)
    return info.min, info.max


def activation_qparams(lo: float, hi: float, dtype: torch.dtype, symmetric: bool) -> tuple[float, int]:
    """(scale, zero_point) that represent [lo, hi] ∋ 0 over the whole range of ``dtype``."""
    qmin, qmax = bounds(dtype)
    if symmetric:
        m = max(abs(lo), abs(hi))
        scale = 2 * m / (qmax - qmin)
        return (scale if scale > 0 else 1.0), (qmin + qmax + 1) // 2
    scale = (hi - lo) / (qmax - qmin)
    if not scale > 0:
        return 1.0, max(qmin, min(qmax, 0))
    return scale, int(min(qmax, max(qmin, qmin - round(lo / scale))))


def weight_scales(w: torch.Tensor, qmax: int, per_channel: bool) -> torch.Tensor:
    """Symmetric scales max|w| / q_max, one per output channel (axis 0) or one for the whole tensor."""
    amax = w.detach().abs().flatten(1).amax(1) if per_channel else w.detach().abs().amax().reshape(1)
    return (amax.float().clamp(min=1e-8) / qmax).to(torch.float32)


def weight_bits(qmax: int) -> int:
    """The bits a symmetric weight grid of ±``qmax`` spans (127: 8; 63: the 7 a CPU without VNNI gets), as stats
    report it."""
    return (qmax + 1).bit_length()


def int8_weight(weight: torch.Tensor, qmax: int) -> tuple[torch.Tensor, torch.Tensor]:
    """A linear's weight as ``fxforge::dynamic_linear`` takes it: int8 values in [−q_max, q_max] and the
    per-output-channel scales of ``weight_scales``."""
    scales = weight_scales(weight, qmax, per_channel=True)
    return torch.clamp(torch.round(weight.detach() / scales[:, None]), -qmax, qmax).to(torch.int8), scales


def is_q(node: object) -> bool:
    return is_op(node, *QUANTIZE)


def is_dq(node: object) -> bool:
    return is_op(node, *DEQUANTIZE)


def role(node: fx.Node) -> str | None:
    return node.meta.get(QDQ_KEY, {}).get("role")


def weight_name(node: fx.Node) -> str:
    """The attribute name of the float constant a layer reads as its weight (a matmul: its right operand), through
    the weight's quantize → dequantize pair where it has one; "" where there is none."""
    rhs = operands(node)[1] if is_op(node, *MATMUL) else weight_of(node)
    while is_dq(rhs) or is_q(rhs):
        rhs = data(rhs)
    return str(getattr(rhs, "target", "")) if getattr(rhs, "op", None) == "get_attr" else ""


def named(node: fx.Node, name: str) -> bool:
    """Whether a ``skip`` entry ``name`` names the layer ``node``: its node name, or a prefix of its weight's name
    ("stem.0" for "stem.0.weight")."""
    return node.name == name or weight_name(node).startswith(name + ".")


def check_skip(pass_name: str, skip: Sequence[str], layers: Sequence[fx.Node]) -> None:
    """Refuse a ``skip`` entry that names none of ``layers``: a misspelt name left the layer changed without a word."""
    unknown = [s for s in skip if not any(named(n, s) for n in layers)]
    if unknown:
        prefixes = [repr(w.rpartition(".")[0]) for w in map(weight_name, layers[:2]) if "." in w]
        prefixes = f", or weight prefixes such as {', '.join(prefixes)}" if prefixes else ""
        names = f"node names such as {', '.join(repr(n.name) for n in layers[:3])}{prefixes}" if layers else \
            "the graph has no layer with weights"
        raise PassError(f"{pass_name}: skip {', '.join(map(repr, unknown))} names no layer ({names})")


def weights_folded(gm: fx.GraphModule) -> bool:
    """Whether ``fold_qdq`` has stored ``gm``'s weights as int8: a weight's dequantize reads a constant, no quantize
    (what runs after it cannot observe the float graph or undo a weight's rounding)."""
    return any(is_dq(n) and role(n) == "weight" and not is_q(data(n)) for n in gm.graph.nodes)


def refuse_if_folded(gm: fx.GraphModule, pass_name: str) -> None:
    """A PassError when ``gm``'s quantization is already folded: the passes that observe the float graph, move a
    weight's rounding (``calibrate``, ``bias_correction``, ``adaround``) or train (``distill``) run before
    ``fold_qdq``. A pipeline listing them after it is refused before anything runs (their ``before``); this catches
    a folded graph given to them directly, where they would otherwise have observed integer ops or skipped every
    layer."""
    if weights_folded(gm):
        raise PassError(f"{pass_name} must run before fold_qdq: this graph's quantization is already folded (its "
                        f"weights are stored as int8); list {pass_name} before fold_qdq, and int8 once")


def set_params(q: fx.Node, scale: float, zero_point: int) -> None:
    """Give an activation Q node and every DQ reading it the same scale and zero point.

    The scale is rounded to float32, the precision ONNX stores it in, so both runtimes divide by the same number.
    """
    scale = torch.tensor(scale, dtype=torch.float32).item()
    for node in (q, *(u for u in q.users if is_dq(u))):
        set_q_scale(node, scale, int(zero_point))


def quantize_scalar(x: float, q: fx.Node) -> int:
    """The integer activation Q node ``q`` gives for the float32 value ``x`` (the op's own arithmetic)."""
    return int(q.target(torch.tensor([x], dtype=torch.float32), *q_params(q).args()).item())


def bias_scales(gm: fx.GraphModule, op: fx.Node, channels: int) -> torch.Tensor:
    """s_x · s_w per output channel for the bias of a quantized conv/linear ``op`` (the int32 accumulator's scale)."""
    x_scale, w_dq = q_params(data(op)).scale, weight_of(op)
    per_channel = is_op(w_dq, qd.dequantize_per_channel)
    w_scale = get_tensor(gm, q_params(w_dq).scale) if per_channel else torch.tensor([q_params(w_dq).scale])
    return (x_scale * w_scale.double()).float().expand(channels).clone()


def refresh_bias_scales(gm: fx.GraphModule) -> int:
    """Give every bias Q/DQ pair the scale s_x · s_w of its op's current activation and weight grids.

    A bias b_c with |b_c| / (s_x · s_w,c) past the int32 range (a layer whose input grid is tiny: activations near 0
    ahead of a large bias) would saturate, and the layer's output with it. There the weight's scale is widened,
    s_w,c = 2 |b_c| / (s_x · (2^31 − 1)) (half the range, room for bias_correction), as ONNX Runtime's quantizer
    does: that channel's weights get a coarser grid, its bias stays exact. Returns how many channels widened."""
    widened = 0
    for q in gm.graph.nodes:
        if is_q(q) and role(q) == "bias":
            op = next(iter(next(iter(q.users)).users))
            widened += _fit_int32_bias(gm, op, get_tensor(gm, data(q)))
            set_tensor(gm, q_params(q).scale, bias_scales(gm, op, get_tensor(gm, data(q)).shape[0]))
    return widened


def _fit_int32_bias(gm: fx.GraphModule, op: fx.Node, bias: torch.Tensor) -> int:
    """Widen the weight scales of ``op``'s channels whose bias would overflow int32 (``refresh_bias_scales``). The
    weight's own scale is kept in its Q node's meta (``natural_scale``), so a later refresh on a wider input grid
    (calibration after insert_qdq's first guess from the example inputs) narrows it back."""
    x_scale, w_dq = q_params(data(op)).scale, weight_of(op)
    w_q = data(w_dq)
    need = 2 * bias.detach().double().abs() / (x_scale * INT32[1])
    per_channel = is_op(w_dq, qd.dequantize_per_channel)
    current = (get_tensor(gm, q_params(w_dq).scale) if per_channel else
               torch.tensor([q_params(w_dq).scale])).float()  # float32, as stored: a refresh that changes nothing
    natural = w_q.meta[QDQ_KEY].get("natural_scale", current)   # compares equal and writes nothing
    fitted = torch.maximum(natural.double(), need if per_channel else need.max().reshape(1)).float()
    if torch.equal(fitted, current):
        return 0
    w_q.meta[QDQ_KEY]["natural_scale"] = natural
    if per_channel:
        set_tensor(gm, q_params(w_dq).scale, fitted)
    else:
        for node in (w_q, w_dq):  # the weight's Q and DQ, one per-tensor grid
            set_q_scale(node, float(fitted), 0)
    return int((fitted > natural).sum())


class _FloatRun(fx.Interpreter):
    """Runs the graph in float (every Q/DQ passes its input through) and shows the inputs of activation Q
    nodes to their group's observer: calibration sees the float model's values, as PT2E and ORT do. On batches
    concatenated from calibration batches of ``sizes`` samples each, every observed tensor is shown to its observer
    one calibration batch at a time (split along dimension 0 in proportion), as if the batches had run one by one."""

    def __init__(self, gm: fx.GraphModule, observers: dict[fx.Node, HistogramObserver],
                 sizes: Sequence[int] = (1,)) -> None:
        super().__init__(gm)
        self.observers, self.sizes = observers, sizes
        self.extra_traceback = False  # an error names its node in one line, without the interpreter's note

    def run_node(self, n: fx.Node):
        if is_q(n) or is_dq(n):
            x = self.env[data(n)]
            if n in self.observers:
                total = sum(self.sizes)
                rows = x.shape[0] // total if len(self.sizes) > 1 and x.shape[0] % total == 0 else 0
                for part in x.split([rows * s for s in self.sizes]) if rows else (x,):
                    try:
                        self.observers[n].update(part)
                    except CalibrationError as e:
                        raise CalibrationError(
                            f"the model computes {e} at {data(n).name} on the calibration data, whose inputs are "
                            "finite (values past float32's range?): no int8 range holds it; give calibration data on "
                            "which the model's values stay finite") from None
            return x
        return super().run_node(n)


class Lockstep(fx.Interpreter):
    """Runs the float graph (every Q/DQ passes its input through) and the quantized graph side by side on every
    calibration batch in lockstep: each value is (float values, quantized values), one per batch. ``step`` computes
    one node from its evaluated inputs on both sides; a pass that corrects layers in graph order (adaround,
    bias_correction) overrides it for its layers and goes on with the corrected output."""

    def __init__(self, gm: fx.GraphModule, batches: int) -> None:
        super().__init__(gm)
        self.batches = batches

    def run_node(self, n: fx.Node) -> Any:
        if n.op in ("placeholder", "get_attr"):
            value = super().run_node(n)
            values = value if n.op == "placeholder" else [value] * self.batches
            return values, values
        if n.op == "output":
            return None
        floats = all(self.env[a][0] is not None for a in n.all_input_nodes)  # a step may leave the float side out
        fp_inputs = [fx.node.map_arg((n.args, n.kwargs), lambda a: self.env[a][0][i]) for i in range(self.batches)] \
            if floats else None
        q_inputs = [fx.node.map_arg((n.args, n.kwargs), lambda a: self.env[a][1][i]) for i in range(self.batches)]
        return self.step(n, fp_inputs, q_inputs)

    def step(self, n: fx.Node, fp_inputs: list | None, q_inputs: list) -> tuple[list | None, list]:
        return self.float_side(n, fp_inputs), [n.target(*a, **k) for a, k in q_inputs]

    @staticmethod
    def float_side(n: fx.Node, fp_inputs: list | None) -> list | None:
        """``n`` on the float side: a Q or DQ passes its input through (None where the float side is left out)."""
        if fp_inputs is None:
            return None
        return [value_of(n, a, k, "input") if is_q(n) or is_dq(n) else n.target(*a, **k) for a, k in fp_inputs]


CONCAT_SAMPLES = 16  # calibration samples concatenated into one run of the graph (where its batch is dynamic)


def batch_symbol(gm: fx.GraphModule) -> Any:
    """The symbol of ``gm``'s dynamic batch (dimension 0 of every input, from the capture's ``meta["val"]``), or
    None when the batch is static or an input's shape is unknown."""
    dims = {v.shape[0].node.expr if isinstance(v, torch.Tensor) and v.dim() and isinstance(v.shape[0], torch.SymInt)
            else None for v in (n.meta.get("val") for n in gm.graph.find_nodes(op="placeholder"))}
    symbol = dims.pop() if len(dims) == 1 else None
    return symbol if isinstance(symbol, sympy.Symbol) else None


def batch_leading(node: fx.Node, symbol: Any) -> bool:
    """Does ``node``'s value (its ``meta["val"]``) hold the batch in dimension 0 as a whole multiple k·batch? Read as
    the samples (or the windows or heads of each sample) stacked sample after sample, as a view of a batch-first
    tensor gives; a [T, B, …] tensor flattened to T·B rows would pass too and be split across samples: its min/max
    stay exact, its histogram is then re-binned at other points than batch by batch."""
    val = node.meta.get("val")
    if symbol is None or not isinstance(val, torch.Tensor) or not val.dim() or not isinstance(val.shape[0],
                                                                                                torch.SymInt):
        return False
    ratio = sympy.simplify(val.shape[0].node.expr / symbol)
    return bool(ratio.is_Integer and ratio > 0)


def concatenated(batches: Iterable[tuple[torch.Tensor, ...]], limit: int = CONCAT_SAMPLES
                 ) -> Iterator[tuple[list[tuple[torch.Tensor, ...]], tuple[torch.Tensor, ...]]]:
    """Consecutive batches joined along dimension 0, up to ``limit`` samples a group (a batch larger than that
    alone): each group's batches as given and their concatenation."""
    group: list[tuple[torch.Tensor, ...]] = []
    for batch in batches:
        if group and sum(int(b[0].shape[0]) for b in group) + int(batch[0].shape[0]) > limit:
            yield group, tuple(torch.cat(parts) for parts in zip(*group))
            group = []
        group.append(batch)
    if group:
        yield group, tuple(torch.cat(parts) for parts in zip(*group))


Choice = Literal["minmax", "percentile", "entropy", "mse", "auto"]  # a Method, or the best of AUTO_CANDIDATES
AUTO_CANDIDATES: tuple[Method, ...] = ("percentile", "mse", "minmax")  # ties go to the first
AUTO_SAMPLES = 16  # the calibration samples on which method="auto" measures its candidates' output error


def fit_activations(gm: fx.GraphModule, batches: Iterable[tuple[torch.Tensor, ...]], method: Choice,
                    percentile: float = 99.99) -> dict[str, Any]:
    """Observe every activation group on ``batches`` and set its Q/DQ parameters; then refresh bias scales.

    ``method="auto"`` chooses per group among ``AUTO_CANDIDATES`` the range whose quantization moves the outputs
    of the ops reading the group least (squared error, on the first ``AUTO_SAMPLES`` calibration samples).

    Where the graph's batch is dynamic and every observed tensor holds it in dimension 0 sample after sample, up to
    ``CONCAT_SAMPLES`` samples run through the graph at once (the interpreter's per-node cost paid once, not per
    batch), and each observer still sees the batches one at a time in their order: the same min/max and the same
    histogram (re-binned at the same points) as batch by batch, up to the rounding of a batched kernel."""
    qs = [n for n in gm.graph.nodes if is_q(n) and role(n) == "activation"]
    shared: dict[int, HistogramObserver] = {}
    observers = {q: shared.setdefault(q.meta[QDQ_KEY]["group"], HistogramObserver()) for q in qs}
    kept, count, samples = [], 0, 0
    symbol = batch_symbol(gm)
    joined = symbol is not None and all(batch_leading(data(q), symbol) for q in qs)
    with torch.no_grad():
        for group, batch in concatenated(batches) if joined else (([b], b) for b in batches):
            _FloatRun(gm, observers, [int(b[0].shape[0]) for b in group] if joined else (1,)).run(*batch)
            count += len(group)
            for b in group:
                if method == "auto" and samples < AUTO_SAMPLES:
                    kept.append(b)
                    samples += len(b[0]) if b and b[0].dim() else 1
    methods = list(AUTO_CANDIDATES) if method == "auto" else [method]
    grids: dict[int, list[tuple[float, int, int, int]]] = {}
    for q in qs:
        dtype = q_params(q).dtype
        qmin, qmax = bounds(dtype)
        symmetric = q.meta[QDQ_KEY].get("symmetric", False)
        grids[q.meta[QDQ_KEY]["group"]] = [
            (*activation_qparams(*observers[q].range(m, qmax - qmin + 1, percentile), dtype, symmetric), qmin, qmax)
            for m in methods]
    choice = {g: 0 for g in grids}
    if len(methods) > 1 and kept:
        run = _ReaderError(gm, grids)
        with torch.no_grad():
            for batch in kept:
                run.run(*batch)
        choice = {g: min(range(len(methods)), key=lambda i: (errors[i], i)) for g, errors in run.errors.items()}
    for q in qs:
        set_params(q, *grids[q.meta[QDQ_KEY]["group"]][choice[q.meta[QDQ_KEY]["group"]]][:2])
    widened = refresh_bias_scales(gm)
    stats: dict[str, Any] = {"activation_groups": len(shared), "batches": count,
                             **({"weight_scales_widened": widened} if widened else {})}
    if len(methods) > 1:
        stats.update({f"chosen.{m}": sum(1 for c in choice.values() if c == i) for i, m in enumerate(methods)})
    return stats


class _ReaderError(fx.Interpreter):
    """Runs the graph in float and, at every op reading an activation DQ, runs that op again with the DQ's value
    on each candidate grid of its group: ``errors[group][i]`` sums the squared change of those ops' outputs."""

    def __init__(self, gm: fx.GraphModule, grids: dict[int, list[tuple[float, int, int, int]]]) -> None:
        super().__init__(gm)
        self.grids = grids
        self.errors = {g: [0.0] * len(c) for g, c in grids.items()}

    def run_node(self, n: fx.Node) -> Any:
        if is_q(n) or is_dq(n):
            return self.env[data(n)]
        out = super().run_node(n)
        if n.op != "call_function" or not isinstance(out, torch.Tensor):
            return out
        args, kwargs = self.fetch_args_kwargs_from_env(n)
        for i, a in enumerate(n.args):
            if is_dq(a) and role(a) == "activation":
                group = a.meta[QDQ_KEY]["group"]
                for j, (scale, zero, qmin, qmax) in enumerate(self.grids[group]):
                    moved = list(args)
                    moved[i] = torch.fake_quantize_per_tensor_affine(args[i], scale, zero, qmin, qmax)
                    self.errors[group][j] += float((n.target(*moved, **kwargs) - out).double().square().sum())
        return out


def checked_batches(batches: Any, example: Sequence[torch.Tensor]) -> Iterator[tuple[torch.Tensor, ...]]:
    """Each calibration entry as a tuple of tensors matching the example inputs' count, dtypes and ranks."""
    try:
        iterator = iter(batches)
    except TypeError:
        raise CalibrationError(f"calibration data must be an iterable of input tuples, got "
                               f"{type(batches).__name__}") from None
    for i, raw in enumerate(iterator):
        batch = (raw,) if isinstance(raw, torch.Tensor) else tuple(raw) if isinstance(raw, (tuple, list)) \
            else None
        if batch is None or len(batch) != len(example) or not all(isinstance(t, torch.Tensor) for t in batch):
            got = type(raw).__name__ if batch is None else \
                f"{len(batch)}: {', '.join(_describe(t) for t in batch)}"
            hint = (" (a DataLoader of (input, label) pairs? give input_key=0, or calibration_fn=lambda batch: "
                    "batch[:1])") if batch is not None and len(batch) > len(example) else \
                f" with keys {list(raw)} (give input_key= the key(s) of the model's inputs)" \
                if isinstance(raw, Mapping) else ""
            raise CalibrationError(f"calibration batch {i} must be a tuple of {len(example)} tensor(s) like the "
                                   f"example inputs, got {got}{hint}")
        for j, (t, ref) in enumerate(zip(batch, example)):
            if t.dtype != ref.dtype or t.dim() != ref.dim() or t.shape[1:] != ref.shape[1:]:
                raise CalibrationError(f"calibration batch {i}, input {j}: {t.dtype} {tuple(t.shape)} does not "
                                       f"match the example input {ref.dtype} {tuple(ref.shape)}")
            if t.is_floating_point() and not torch.isfinite(t).all():
                raise CalibrationError(f"calibration batch {i}, input {j} holds NaN or Inf")
            if t.dim() and not t.shape[0] and ref.shape[0]:  # calibrate failed on it with a ZeroDivisionError
                raise CalibrationError(f"calibration batch {i}, input {j} has batch size 0: an empty batch has "
                                       "nothing to calibrate on (leave it out)")
        yield batch


def first_samples(batches: Sequence[tuple[torch.Tensor, ...]], limit: int, cut: bool = True
                  ) -> tuple[list[tuple[torch.Tensor, ...]], int]:
    """The batches holding the first ``limit`` samples, the last one cut where ``cut`` (a graph whose every input
    has the dynamic batch, ``batch_symbol``); else whole, as given: a graph captured with a static batch takes no
    other size, and an input without the batch (a matrix shared by all samples) is not cut (cut, the model failed
    with an internal shape error). Returns them and their sample count."""
    chunks, samples = [], 0
    for batch in batches:
        if samples >= limit:
            break
        size = int(batch[0].shape[0]) if batch[0].dim() else 1
        keep = min(size, limit - samples) if cut else size
        chunks.append(batch if keep == size else tuple(t[:keep] for t in batch))
        samples += keep
    return chunks, samples


def _describe(value: Any) -> str:
    return f"{str(value.dtype).removeprefix('torch.')} {list(value.shape)}" if isinstance(value, torch.Tensor) \
        else type(value).__name__
