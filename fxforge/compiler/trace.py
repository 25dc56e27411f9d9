"""Capture a model as the one IR: the functional, unlifted ATen-level fx graph from torch.export.

``trace`` exports non-strictly with a dynamic batch dimension, makes the graph functional as the empty
decomposition table does (in-place ops become functional, inference batch norm becomes
``_native_batch_norm_legit_no_training``, ``aten.conv2d``/``aten.linear`` stay; by local rewrites where they
apply, compiler/functionalize.py), checks it against the model, and returns a GraphModule with flat positional
inputs and a flat tuple of outputs. The pytree structure of the original inputs and outputs lives in the ``Signature``.
"""
from __future__ import annotations

import collections
import contextlib
import functools
import importlib
import inspect
import itertools
import json
import logging
import math
import re
import sys
import threading
import traceback
import warnings
from collections.abc import Mapping
from dataclasses import dataclass, replace
from typing import Any, Callable, Iterator, NamedTuple, Sequence

import numpy as np
import torch
import torch.fx as fx
import torch.utils._pytree as pytree
from torch._subclasses.fake_tensor import DynamicOutputShapeException
from torch.export import Dim

from .errors import ArtifactError, InputError, TraceError, first_line
from .functionalize import functional_graph
from .graph import get_tensor, views_as_reshapes
from .ops import (CLASS_INDEX_LOSSES, NAN_PROPAGATING, QUANTIZE, SAME_VALUES, argument, aten, data, graph_outputs,
                  is_op, set_argument, set_graph_outputs)
from .verify import (BACKEND_SEED, EXACT_TOLERANCE, ModelRuns, beyond, clone_inputs, compare, copy_model,
                     discrete_mismatch, exact_tolerances, fresh_inputs, nesting)

MAX_BATCH = 1 << 16
REMEDIES = ("replace data-dependent Python control flow with torch.cond or tensor ops, or move unsupported Python out "
            "of forward")  # not static_batch=True: the capture that failed had a static batch already


@dataclass(frozen=True)
class TensorSpec:
    """Shape (None where the dimension is dynamic) and dtype of one flat input."""

    shape: tuple[int | None, ...]
    dtype: torch.dtype

    def to_dict(self) -> dict[str, Any]:
        return {"shape": list(self.shape), "dtype": str(self.dtype).removeprefix("torch.")}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> TensorSpec:
        return cls(tuple(d["shape"]), getattr(torch, d["dtype"]))


# held around every torch.export / torch.onnx.export / torch.export.save / load / run_decompositions: they patch
# process-wide state (the current tracer, serializer, patcher), so two threads exporting at once failed with raw
# AssertionErrors, and a decomposition beside another thread's export with a TraceError blaming the model
EXPORT_LOCK = threading.RLock()
# an index bound standing for the call's batch size, k × BATCH + c for k times it plus c (Signature.index_bounds;
# JSON-safe; |c| < BATCH / 2, as a number bound is)
BATCH = 2 ** 62
# the high end of a bound where eager has none: bincount's values, whose output grows to hold the largest (a number,
# which call_bound keeps as it is); such an index is read clamped at 0, never mod a size (_wrapped)
NO_HIGH = BATCH // 2 - 1


def interval(low: int, high: int) -> str:
    """[low, high) as an error states it, [low, ∞) for :data:`NO_HIGH`: the number says nothing a reader can use."""
    return f"[{low}, {'∞' if high == NO_HIGH else high})"


def call_bound(low: int, high: int, batch: int | None) -> tuple[int, int]:
    """The [low, high) an index bound stands for at a call of batch size ``batch``: a ``high`` of k × :data:`BATCH`
    + c is k × ``batch`` + c (``low`` then 0, or its negation for [−n, n)); a number is itself."""
    if high < BATCH // 2 or batch is None:
        return low, high
    k, c = divmod(high + BATCH // 2, BATCH)
    n = k * batch + c - BATCH // 2
    return (-n if low < 0 else 0), n


SCALAR_TYPES = {"int": int, "float": float, "bool": bool}  # Signature.scalar_outputs: the Python type of each
SYMBOLIC_SCALARS = {torch.SymInt: "int", torch.SymFloat: "float", torch.SymBool: "bool"}  # a graph value's kind


def batch_bound(bound: Sequence[Any], batch: int) -> list[Any]:
    """``bound`` (an index bound of :attr:`Signature.index_bounds` or an index guard, ``base.INDEX_GUARDS``: (what
    is read, low, high, ...)) with :data:`BATCH` replaced by ``batch``: for a signature made static after the
    capture (``Signature.with_static_batch``), whose calls give no batch dimension to read the batch size from (a
    TVM fallback to the example's batch raised ``TypeError`` on each call, compile's own checks included)."""
    where, low, high, *rest = bound
    return [where, *call_bound(low, high, batch), *rest]


@contextlib.contextmanager
def silenced_warnings() -> Iterator[None]:
    """A library's warnings ignored (scripting, freezing, exporting warn about their internals), under EXPORT_LOCK:
    ``warnings.catch_warnings`` swaps the process's filters, and two threads' save-and-restore pairs interleaved
    (a TorchScript lowering beside an ONNX export left "ignore" installed for every later warning of the process).
    Another thread's warnings are ignored too while a section runs: Python's filters are process-wide."""
    with EXPORT_LOCK, warnings.catch_warnings():
        warnings.simplefilter("ignore")
        yield


@dataclass(frozen=True)
class Signature:
    """What a compiled model accepts and returns: flat input specs plus the pytree structure around them."""

    inputs: tuple[TensorSpec, ...]
    in_spec: str  # torch.utils._pytree.treespec_dumps of (args, kwargs)
    out_spec: str
    dynamic_batch: bool
    note: str = ""  # why the batch is static, when it is
    # (input, low, high, what[, ignored]): an integer input that an op reads directly as indices into a dimension of
    # static size (an embedding's rows, a gather's or index_select's dim, an index, a loss's classes); eager PyTorch
    # accepts [low, high), and a loss also its ignore_index (``ignored``). Backends differ outside it: ONNX's Gather
    # wraps a negative index around and its loss returns a number where eager raises, TVM reads whatever memory is
    # there, so the signature checks it for all.
    index_bounds: tuple[tuple[Any, ...], ...] = ()
    # (position among out_spec's leaves, value): outputs that are no tensor (a None, a number), returned as they are
    # and absent from the graph, whose outputs are the tensors alone (the ONNX exporter drops a None output)
    constant_outputs: tuple[tuple[int, Any], ...] = ()
    # the flat inputs the model writes into in place (the compiled graph computes its outputs without writing back);
    # called with such an input sharing memory with another one, eager would read the write through the other
    written_inputs: tuple[int, ...] = ()
    # (import path, fields) of each namedtuple class in the inputs and outputs: a class loaded with other fields would
    # be filled by position
    namedtuple_fields: tuple[tuple[str, tuple[str, ...]], ...] = ()
    # the smallest batch at which the captured graph computes what the model does (x[1] needs two rows): a graph
    # reads past a smaller batch, or clamps a narrow to nothing, where eager raises
    min_batch: int = 1
    # (position among out_spec's leaves, "int" | "float" | "bool"): outputs that are a number computed from the
    # inputs' sizes (``x.shape[0]``); a backend whose graph returns them as 0-d tensors (ONNX, TVM) gives them back
    # as the Python number eager returns
    scalar_outputs: tuple[tuple[int, str], ...] = ()
    # the float inputs whose values reach a static int8 quantizer (:func:`quantized_inputs`): it rounds NaN and Inf
    # to finite integers, so the int8 model answered a NaN pixel with ordinary logits where the fp32 model gives NaN;
    # or any float input of a TorchScript artifact whose oneDNN kernels do the same (backends/torchscript.py);
    # calls holding them are refused
    finite_inputs: tuple[int, ...] = ()

    def with_static_batch(self, example_inputs: Sequence[torch.Tensor], note: str) -> Signature:
        """This signature fixed to the example's shapes, saying why: for a backend whose artifact holds them (a
        TorchScript trace, a TVM build tuned for one shape)."""
        if not self.dynamic_batch:
            return self
        specs = tuple(TensorSpec(tuple(t.shape), s.dtype) for t, s in zip(example_inputs, self.inputs))
        batch = self.call_batch(example_inputs)
        bounds = self.index_bounds if batch is None else tuple(tuple(batch_bound(b, batch)) for b in self.index_bounds)
        return replace(self, inputs=specs, dynamic_batch=False, note=note, index_bounds=bounds)

    def batched(self) -> list[bool]:
        """Which flat inputs have the dynamic batch dimension (none when the batch is static)."""
        return [bool(s.shape) and s.shape[0] is None and self.dynamic_batch for s in self.inputs]

    def call_batch(self, flat: Sequence[torch.Tensor]) -> int | None:
        """The batch size of a call's flat inputs (what a bound of :data:`BATCH` stands for there), None where the
        batch is static."""
        return next((t.shape[0] for t, b in zip(flat, self.batched()) if b), None)

    def arguments(self, flat: Sequence[Any]) -> tuple[Any, ...]:
        """The call arguments holding ``flat`` (tensors in the order :meth:`flatten` gives them) where the model's
        arguments hold them: nested in its dicts, lists and tuples as the example was."""
        if len(flat) != len(self.inputs):
            raise InputError(f"the model takes {len(self.inputs)} input tensor(s), shaped like "
                             f"{[list(s.shape) for s in self.inputs]}, got {len(flat)}")
        return pytree.tree_unflatten(list(flat), _loads(self.in_spec))[0]

    def flatten(self, args: Sequence[Any]) -> list[torch.Tensor]:
        """Flatten call arguments and check count, shape and dtype against the compiled signature."""
        aligned, flat = self._aligned_flat(args)
        return self.check(flat, lambda i: _input_name(aligned, i))

    def flat(self, args: Sequence[Any]) -> list[Any]:
        """Call arguments flattened in the compiled order (a dict's keys as compiled), not checked: calibration
        items before a static batch cuts them (:meth:`check` then)."""
        return self._aligned_flat(args)[1]

    def _aligned_flat(self, args: Sequence[Any]) -> tuple[Any, list[Any]]:
        aligned = _aligned((as_plain(tuple(args)), {}), _loads(self.in_spec))
        flat, spec = pytree.tree_flatten(aligned)
        if len(flat) == len(self.inputs) and _dumps(spec) != self.in_spec:  # the count alone made no sense of it
            raise InputError(f"the inputs are nested as {nesting(spec.children()[0])}, but the model was compiled "
                             f"for {nesting(_loads(self.in_spec).children()[0])} (* a tensor)")
        return aligned, flat

    def check(self, flat: list[Any], name: Callable[[int], str] = lambda i: f"input {i}") -> list[torch.Tensor]:
        """Check flat inputs (as :meth:`flatten` gives them; also the calibration batches the passes read) against
        the compiled signature: count, tensors with values, dtype, shape, index bounds, finite values where a
        quantizer reads them, one batch size. ``name``: how an error names flat input ``i``."""
        if len(flat) != len(self.inputs):
            raise InputError(f"expected {len(self.inputs)} input tensor(s) shaped like "
                             f"{[list(s.shape) for s in self.inputs]}, got {_describe(flat)}")
        for i, (t, s) in enumerate(zip(flat, self.inputs)):
            if not isinstance(t, torch.Tensor):
                raise InputError(f"{name(i)} must be a tensor, got {type(t).__name__}")
            if t.is_meta or t.layout != torch.strided:  # the index bounds below read values
                raise InputError(f"{name(i)} is a {'meta' if t.is_meta else t.layout} tensor; a "
                                 "compiled model takes dense tensors with values")
            if t.dtype != s.dtype:
                raise InputError(f"{name(i)} has dtype {t.dtype}, compiled for {s.dtype}")
            if t.dim() != len(s.shape) or any(e is not None and e != d for e, d in zip(s.shape, t.shape)):
                raise InputError(f"{name(i)} has shape {list(t.shape)}, compiled for "
                                 f"{list(s.shape)} (None = any size)")
        batch = self.call_batch(flat)
        for i, low, high, what, *ignored in self.index_bounds:
            t = flat[i]
            low, high = call_bound(low, high, batch)  # a dimension of the call's batch size (or k times it)
            if ignored:
                t = t[t != ignored[0]]
            if t.numel() and (int(t.min()) < low or int(t.max()) >= high):
                also = f" or {ignored[0]} (its ignore_index)" if ignored else ""
                raise InputError(f"input {i} holds {'labels' if ignored else 'indices'} from {int(t.min())} to "
                                 f"{int(t.max())}, but it indexes {what}: each must be in {interval(low, high)}{also}")
        for i in self.finite_inputs:
            if not _all_finite(flat[i]):
                raise InputError(f"input {i} holds NaN or Inf: the compiled model would turn them into finite numbers "
                                 "(int8 quantizers, TorchScript's oneDNN kernels) and answer as if they were data (the "
                                 "fp32 model gives NaN); clean the input first")
        for i in self.written_inputs:
            j = next((j for j, t in enumerate(flat) if j != i and _overlap(flat[i], t)), None)
            if j is not None:
                raise InputError(f"inputs {i} and {j} share memory, and the model writes into input {i} in place, "
                                 f"which it would then read through input {j}; the compiled model does not write "
                                 f"back, so pass separate tensors (a clone of one)")
        sizes = {i: t.shape[0] for i, (t, b) in enumerate(zip(flat, self.batched())) if b}
        small = next((i for i, n in sizes.items() if n < self.min_batch), None)
        if small is not None and self.min_batch == 1:  # an empty batch: no batch size was found wrong, none is taken
            raise InputError(f"input {small} has batch size 0: a compiled model takes batches of 1 or more (an empty "
                             "batch has nothing to compute; skip the call)")
        if small is not None:
            raise InputError(f"input {small} has batch size {sizes[small]}, but the model runs only from batch size "
                             f"{self.min_batch} (below it eager PyTorch raises, or computes otherwise than the captured graph)")
        if len(set(sizes.values())) > 1:
            i, j = next((i, j) for i in sizes for j in sizes if sizes[i] != sizes[j])
            raise InputError(f"inputs {i} and {j} have batch sizes {sizes[i]} and {sizes[j]}: the model was compiled "
                             "with one batch dimension for the inputs whose example batch sizes were equal; give "
                             "example inputs of different sizes where their first dimensions are independent")
        return flat

    def leaves(self, outputs: Sequence[Any]) -> list[Any]:
        """The model's flat outputs from the graph's (``outputs``): its numbers, strings and Nones put back where it
        returns them, a number computed from the batch size as the Python number it is."""
        expected = _leaf_count(self.out_spec) - len(self.constant_outputs)
        if len(outputs) != expected:  # a saved signature that does not fit the artifact's program
            raise ArtifactError(f"the artifact returned {len(outputs)} output(s) where its signature expects "
                                f"{expected}: its fxforge.json does not belong to its program")
        leaves = list(outputs)
        for position, value in self.constant_outputs:
            leaves.insert(position, value)
        for position, kind in self.scalar_outputs:
            if isinstance(leaves[position], torch.Tensor):
                if leaves[position].numel() != 1:
                    raise ArtifactError(f"the artifact's output {position} has shape {list(leaves[position].shape)}, "
                                        f"but its signature says it is a number: its fxforge.json does not belong to "
                                        "its program")
                leaves[position] = SCALAR_TYPES[kind](leaves[position].item())
        return leaves

    def unflatten(self, outputs: Sequence[Any]) -> Any:
        """The model's outputs, nested as it returns them, from the graph's (``outputs``)."""
        return pytree.tree_unflatten(self.leaves(outputs), _loads(self.out_spec))

    def to_dict(self) -> dict[str, Any]:
        return {"inputs": [s.to_dict() for s in self.inputs], "in_spec": self.in_spec,
                "out_spec": self.out_spec, "dynamic_batch": self.dynamic_batch, "note": self.note,
                "index_bounds": [list(b) for b in self.index_bounds],
                "constant_outputs": [list(c) for c in self.constant_outputs],
                "written_inputs": list(self.written_inputs),
                "namedtuple_fields": {path: list(fields) for path, fields in self.namedtuple_fields},
                "min_batch": self.min_batch, "scalar_outputs": [list(o) for o in self.scalar_outputs],
                "finite_inputs": list(self.finite_inputs)}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Signature:
        for key in ("in_spec", "out_spec"):  # read now: corrupt, it failed every call with a raw JSON error
            try:
                _loads(d[key])
            except ArtifactError:
                pass  # a class that cannot be imported here: named when a call needs it (`fxforge run` does not)
            except (ValueError, KeyError, TypeError, IndexError, AttributeError):
                raise ArtifactError(f"the signature's {key} is corrupt: not the structure fxforge wrote") from None
        problem = _signature_problem(d)
        if problem:  # read as it is, a bad field failed every call with a raw IndexError or ValueError
            raise ArtifactError(f"the artifact's signature is corrupt: {problem}")
        namedtuples = d.get("namedtuple_fields", {})
        _check_namedtuple_fields(namedtuples)
        return cls(tuple(TensorSpec.from_dict(s) for s in d["inputs"]), d["in_spec"], d["out_spec"],
                   d["dynamic_batch"], d.get("note", ""), tuple(_index_bound(b) for b in d.get("index_bounds", ())),
                   tuple((int(i), v) for i, v in d.get("constant_outputs", ())),
                   tuple(int(i) for i in d.get("written_inputs", ())),
                   tuple((path, tuple(fields)) for path, fields in namedtuples.items()), int(d.get("min_batch", 1)),
                   tuple((int(i), _scalar_kind(k)) for i, k in d.get("scalar_outputs", ())),
                   tuple(int(i) for i in d.get("finite_inputs", ())))


AUTOCAST_DEVICES = ("cpu", "cuda")


def ambient_autocast() -> list[str]:
    """The device types ``torch.autocast`` is on for where this is called."""
    return [device for device in AUTOCAST_DEVICES if torch.is_autocast_enabled(device)]


@contextlib.contextmanager
def without_autocast() -> Iterator[None]:
    """``torch.autocast`` off for the devices it is on for: a model is captured, checked and run in the dtypes it
    holds. Under a caller's autocast, a TorchScript artifact kept autocast's bfloat16 and returned it outside
    autocast (the model: float32), while every check, made under the same autocast, stated an error of 0."""
    with contextlib.ExitStack() as stack:
        for device in ambient_autocast():
            stack.enter_context(torch.autocast(device, enabled=False))
        yield


def _describe(flat: Sequence[Any]) -> str:
    return str([list(t.shape) if isinstance(t, torch.Tensor) else type(t).__name__ for t in flat])


def _namedtuples(spec: pytree.TreeSpec) -> list[type]:
    """The namedtuple classes in ``spec`` (pytree keeps a namedtuple's class as its node's context)."""
    found, todo = [], [spec]
    while todo:
        node = todo.pop()
        if isinstance(node.context, type) and issubclass(node.context, tuple) and hasattr(node.context, "_fields"):
            found.append(node.context)
        todo.extend(node.children())
    return found


def _name_unnamed(cls: type, name: str) -> None:
    """Give ``cls``, a pytree node type registered without a serialized name (``register_dataclass`` and
    ``torch.return_types`` leave it out), the name ``name``: ``treespec_dumps`` refused such a type ("no registered
    serialization name") and every compile of a model returning one failed with a raw error."""
    node = pytree.SUPPORTED_SERIALIZED_TYPES.get(cls)
    if node is not None and node.serialized_type_name == pytree.NO_SERIALIZED_TYPE_NAME_FOUND:
        pytree.SUPPORTED_SERIALIZED_TYPES[cls] = node._replace(serialized_type_name=name)
        pytree.SERIALIZED_TYPE_TO_PYTHON_TYPE[name] = cls


def _name_structseqs() -> None:
    """Name each ``torch.return_types`` class (what ``torch.topk`` or ``x.max(dim)`` returns) at import, so a process
    loading an artifact reads the name back too; the class flattens as torch registered it (its values; the class
    is the node's type)."""
    for cls in torch.return_types.all_return_types:
        _name_unnamed(cls, f"torch.return_types.{cls.__name__}")


_name_structseqs()


def _dumps(spec: pytree.TreeSpec) -> str:
    """``treespec_dumps``, each namedtuple class of ``spec`` first registered under its import path: torch writes a
    namedtuple only under a registered name, and ``_loads`` finds the class again by that path. A second class of
    the same path (a model factory defining its output type, a notebook cell run again with the fields reordered)
    gets the path with ``#k`` after it: under the path alone, the name read back the first class, and the second
    model's outputs were filled into its fields by position (``out.logits`` holding the probabilities)."""
    for cls in _namedtuples(spec):
        if cls not in pytree.SUPPORTED_SERIALIZED_TYPES:
            path = name = f"{cls.__module__}.{cls.__qualname__}"
            for k in itertools.count(2):
                if name not in pytree.SERIALIZED_TYPE_TO_PYTHON_TYPE:
                    break
                name = f"{path}#{k}"
            pytree._register_namedtuple(cls, serialized_type_name=name)
    todo = [spec]
    while todo:  # a registered dataclass: named by its import path, which _loads imports it by
        node = todo.pop()
        if node.type is not None and not (isinstance(node.context, type) and hasattr(node.context, "_fields")):
            _name_unnamed(node.type, f"{node.type.__module__}.{node.type.__qualname__}")
        if node.type in (dict, collections.OrderedDict) and any(
                not isinstance(k, (str, int, bool, type(None))) for k in node.context):
            key = next(k for k in node.context if not isinstance(k, (str, int, bool, type(None))))
            raise InputError(f"the model's inputs or outputs hold a dict keyed by {key!r} ({type(key).__name__}): a "
                             "compiled model's structure is saved as JSON, whose keys are strings and numbers; use "
                             "str keys")
        todo.extend(node.children())
    return pytree.treespec_dumps(spec)


@functools.lru_cache(maxsize=256)
def _loads(text: str) -> pytree.TreeSpec:
    """``treespec_loads``; a namedtuple class not registered in this process (a saved artifact loaded elsewhere) is
    imported by the path ``_dumps`` wrote and registered, or an ArtifactError names it."""
    try:
        return pytree.treespec_loads(text)
    except NotImplementedError:
        pass
    tree = json.loads(text)[1]
    for path in _namedtuple_paths(tree):
        cls = _class_at(path)
        if cls not in pytree.SUPPORTED_SERIALIZED_TYPES:
            pytree._register_namedtuple(cls, serialized_type_name=path)
        else:  # registered under another name (``#k``, or by an artifact loaded before): this one reads it too
            pytree.SERIALIZED_TYPE_TO_PYTHON_TYPE.setdefault(path, cls)
    for name in _unregistered_types(tree):  # a container registered by its module on import (transformers' outputs)
        try:
            _name_unnamed(_class_at(name), name)  # imports the module; a dataclass it registers unnamed
        except ArtifactError:
            pass
        if name not in pytree.SERIALIZED_TYPE_TO_PYTHON_TYPE:
            raise ArtifactError(f"the model's inputs or outputs hold {name}, which is not registered with "
                                f"torch.utils._pytree here: import {name.rpartition('.')[0]} (which registers it) "
                                "first")
    return pytree.treespec_loads(text)


def _class_at(path: str) -> type:
    """The class (a namedtuple, a registered dataclass) ``_dumps`` wrote as ``path`` (``#k`` after it left out),
    imported; or an ArtifactError naming it."""
    module, _, name = path.partition("#")[0].rpartition(".")
    try:
        return functools.reduce(getattr, name.split("."), importlib.import_module(module))
    except (ImportError, AttributeError, ValueError):
        raise ArtifactError(f"the model's inputs or outputs hold {path}, which cannot be imported here: import the "
                            "module that defines it first") from None


def _signature_problem(d: dict[str, Any]) -> str | None:
    """What is wrong with a saved signature's fields (their types, the inputs and outputs they point at), or None:
    a manifest whose checksum was recomputed after an edit gets this far."""
    missing = [key for key in ("inputs", "in_spec", "out_spec", "dynamic_batch") if key not in d]
    if missing:
        return f"it lacks {missing[0]!r}"
    inputs = d["inputs"]
    if not _list_of(inputs, lambda s: isinstance(s, dict) and _list_of(s.get("shape"), lambda e: e is None or (
            _is_int(e) and e >= 0)) and isinstance(getattr(torch, str(s.get("dtype")), None), torch.dtype)):
        return "'inputs' is not a list of shapes and dtypes"
    if not isinstance(d["dynamic_batch"], bool) or not isinstance(d.get("note", ""), str):
        return "'dynamic_batch' or 'note' has the wrong type"
    n = len(inputs)
    if not _list_of(d.get("index_bounds", []), lambda b: _list_of(b, None) and len(b) in (2, 4, 5) and all(
            map(_is_int, b[:3])) and b[0] in range(n) and (len(b) == 2 or isinstance(b[3], str)) and
            (len(b) < 5 or _is_int(b[4]))):
        return f"'index_bounds' is not a list of (input, low, high, what[, ignored]) of its {n} input(s)"
    for key in ("written_inputs", "finite_inputs"):
        if not _list_of(d.get(key, []), lambda i: _is_int(i) and i in range(n)):
            return f"{key!r} is not a list of indices of its {n} input(s)"
    fields_ = d.get("namedtuple_fields", {})
    if not isinstance(fields_, dict) or not all(_list_of(f, lambda e: isinstance(e, str)) for f in fields_.values()):
        return "'namedtuple_fields' is not a table of field names"
    if not _is_int(d.get("min_batch", 1)) or d.get("min_batch", 1) < 1:
        return "'min_batch' is not an int >= 1"
    positions = []
    for key in ("constant_outputs", "scalar_outputs"):
        if not _list_of(d.get(key, []), lambda o: _list_of(o, None) and len(o) == 2 and _is_int(o[0])):
            return f"{key!r} is not a list of (position, value) pairs"
        positions += [o[0] for o in d.get(key, [])]
    leaves, constants = _leaf_count(d["out_spec"]), [o[0] for o in d.get("constant_outputs", [])]
    if any(p not in range(leaves) for p in positions) or len(set(constants)) < len(constants):
        return f"an output position is repeated or not among the model's {leaves} output(s)"
    return None


@functools.lru_cache(maxsize=256)
def _leaf_count(text: str) -> int:
    """The number of leaves of a ``treespec_dumps`` text, read from its JSON: no class in it is imported (``fxforge
    run`` needs none)."""
    todo, count = [json.loads(text)[1]], 0
    while todo:
        node = todo.pop()
        count += node["type"] is None
        todo.extend(node["children_spec"])
    return count


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _list_of(value: Any, item: Callable[[Any], bool] | None) -> bool:
    """Whether ``value`` is a JSON list, each item of which ``item`` accepts (any item, without one)."""
    return isinstance(value, list) and (item is None or all(item(v) for v in value))


def _check_namedtuple_fields(saved: dict[str, list[str]]) -> None:
    """A saved namedtuple whose class now has other fields would fill them by position (``out.a`` holding what was
    ``b``): an ArtifactError names it. A class that cannot be imported is named when a call needs it."""
    for path, fields in saved.items():
        try:
            cls = _class_at(path)
        except ArtifactError:
            continue
        if list(getattr(cls, "_fields", ())) != list(fields):
            raise ArtifactError(f"the namedtuple {path} has fields {list(getattr(cls, '_fields', ()))} here, but the "
                                f"artifact was compiled with {list(fields)}; the values would land in other fields")


def _unregistered_types(node: dict) -> list[str]:
    """The serialized type names in a ``treespec_dumps`` tree that this process has no pytree node for."""
    kind = node.get("type")
    own = [kind] if kind and kind != "collections.namedtuple" and kind not in pytree.SERIALIZED_TYPE_TO_PYTHON_TYPE \
        else []
    return own + [t for child in node.get("children_spec", []) for t in _unregistered_types(child)]


def _namedtuple_paths(node: dict) -> list[str]:
    """The serialized names of the namedtuples in a ``treespec_dumps`` tree (its JSON)."""
    own = [node["context"]] if node.get("type") == "collections.namedtuple" else []
    return own + [p for child in node.get("children_spec", []) for p in _namedtuple_paths(child)]


def _aligned(value: Any, spec: pytree.TreeSpec) -> Any:
    """``value`` with the keys of each dict in the order ``spec`` has them (a caller may pass a dict's keys in any
    order, as the eager model takes them); a key the compiled model lacks, or one it needs, is an InputError."""
    if spec.type is dict and isinstance(value, dict):
        keys = list(spec.context)
        missing, unexpected = [k for k in keys if k not in value], [k for k in value if k not in keys]
        if missing or unexpected:
            raise InputError(f"input dict keys differ from the compiled model's {keys}: missing {missing}, "
                             f"unexpected {unexpected}")
        return {k: _aligned(value[k], spec.child(i)) for i, k in enumerate(keys)}
    if spec.type in (tuple, list) and type(value) is spec.type and len(value) == spec.num_children:
        return spec.type(_aligned(v, spec.child(i)) for i, v in enumerate(value))
    return value


def trace(model: torch.nn.Module, example_inputs: Sequence[Any], *, static_batch: bool = False,
          runs: ModelRuns | None = None) -> tuple[fx.GraphModule, Signature]:
    """Export a copy of ``model`` in eval mode; the user's model is never touched. ``runs``: the model's outputs
    (an eval copy of ``model``), shared with a later check of the compiled artifact so no input set runs twice."""
    if not isinstance(model, torch.nn.Module):
        raise TraceError(f"expected a torch.nn.Module, got {type(model).__name__}")
    args = as_plain(tuple(example_inputs) if isinstance(example_inputs, (tuple, list)) else (example_inputs,))
    flat = pytree.tree_leaves(args)
    if not flat or not all(isinstance(t, torch.Tensor) for t in flat):
        skipped = next((i for i, t in enumerate(flat) if t is None), None)
        why = "" if skipped is None else (f": input {skipped} is None (a skipped optional argument), which a compiled "
                                          "model cannot take; compile a wrapper whose forward passes it for you")
        raise InputError(f"example_inputs must be a tuple of tensors, got {_describe(flat)}{why}")
    scripted = next((name for name, m in model.named_modules() if isinstance(m, torch.jit.ScriptModule)), None)
    if scripted is not None:
        raise TraceError(f"{'the model' if not scripted else f'submodule {scripted!r}'} is a TorchScript module "
                         "(torch.jit.script or torch.jit.trace), which torch.export cannot capture: pass the plain "
                         "nn.Module")
    forward = getattr(model, "forward", None)
    if callable(forward) and not hasattr(forward, "__code__") and \
            not isinstance(forward, functools.partial):
        raise TraceError(f"the model's forward is a {type(forward).__name__} object, not a function: torch.export "
                         "reads the code of a function; define forward as a method that calls it")
    model = copy_model(model).eval()
    refs = _References(runs or ModelRuns(model), args)
    note = "static batch requested" if static_batch else ""
    ep = gm = None
    if not static_batch:
        try:
            ep = _export(model, args, dynamic=True)
        except Exception as e:  # the model fixes its batch size: fall back to static shapes
            note = f"batch dimension is static: {first_line(e)}"
        else:
            gm, err = _functional(ep, refs)
            if err > EXACT_TOLERANCE:  # captured on another branch than the example's batch takes
                note = (f"batch dimension is static: the model computes differently at batch "
                        f"{batch_size(args)} than at the batch it was exported with (it branches on its batch "
                        f"size; relative error {err:.3g})")
                ep = gm = None
    if ep is None:
        try:
            ep = _export(model, args, dynamic=False)
        except Exception as e:
            raise _trace_error(e) from None
        gm, err = _functional(ep, refs)
        if err > EXACT_TOLERANCE:
            mutated = _mutated_buffers(ep)
            shared = next(((i, j) for j, b in enumerate(flat) for i, a in enumerate(flat[:j]) if _overlap(a, b)), None)
            if mutated:
                cause = (f"forward updates the buffer(s) {', '.join(mutated)} in place, so each call depends on the "
                         "calls before it, and a compiled graph computes one call from a fixed state; keep that state "
                         "out of forward or pass it as an input")
            elif shared:
                cause = (f"example inputs {shared[0]} and {shared[1]} are one tensor, and export captured them as one "
                         "input; give separate tensors (a clone of one) for inputs that can differ")
            elif nested := _nested_encoder(model, args, refs):  # one more run of the model, only here
                cause = (f"nn.TransformerEncoder {nested!r} runs a padded batch as nested tensors in eager inference "
                         "(its padded positions zero), which export does not; build it with "
                         "enable_nested_tensor=False")
            else:
                cause = ("forward takes another path while exported (e.g. it asks torch.compiler.is_exporting()) or "
                         "reads Python state export freezes; make forward compute the same under export")
            raise TraceError(f"the captured graph does not reproduce the model on the example inputs and fresh "
                             f"ones of their shapes (relative error {err:.3g}): {cause}")
    dynamic = not note
    batch = batch_size(args)
    in_spec, out_spec = pytree.tree_flatten((args, {}))[1], ep.call_spec.out_spec
    scalars = _scalar_outputs(gm)
    sig = Signature(tuple(TensorSpec(_spec_shape(t, dynamic and t.dim() > 0 and t.shape[0] == batch), t.dtype)
                          for t in flat),
                    _dumps(in_spec), _dumps(out_spec), dynamic, note, _index_bounds(gm), _constant_outputs(gm),
                    _written_inputs(gm), tuple((f"{c.__module__}.{c.__qualname__}", tuple(c._fields))
                                               for c in dict.fromkeys(_namedtuples(in_spec) + _namedtuples(out_spec))),
                    _smallest_batch(refs.model, gm, args) if dynamic else 1, scalars)
    return gm, sig


def _smallest_batch(runs: ModelRuns, gm: fx.GraphModule, args: tuple) -> int:
    """The smallest batch size, up to the example's, at which the captured graph computes what the model does on the
    example's first rows. The graph is symbolic in the batch, but a model that reads row 1 (``x[1]``,
    ``x.narrow(0, 1, 1)``) raises below 2 in eager, where a backend reads past the tensor or returns an empty slice;
    and export takes a dynamic size to be at least 2, so a ``squeeze`` of the batch is not in the graph."""
    leaves, spec = pytree.tree_flatten(args)
    batch, tolerances = batch_size(args), exact_tolerances(gm)
    for n in range(1, batch or 1):
        rows = [t[:n] if t.dim() and t.shape[0] == batch else t for t in leaves]
        inputs = pytree.tree_unflatten(rows, spec)
        try:
            want = pytree.tree_leaves(runs.run(inputs))
        except Exception:
            continue
        with torch.no_grad():
            got = list(gm(*clone_inputs(rows)))
        if not _past_tolerance(got, want, tolerances):
            return n
        if _distance(pytree.tree_leaves(runs.run(inputs)), want) > EXACT_TOLERANCE:
            return n  # a model with random ops (as the capture check, it cannot be compared run by run)
    return batch or 1


def _distance(outputs: list[Any], reference: list[Any]) -> float:
    """Relative max error of ``outputs``, infinite where a dtype, shape or integer value differs."""
    return math.inf if discrete_mismatch(outputs, reference) else compare(outputs, reference).max_rel


def _past_tolerance(outputs: list[Any], reference: list[Any], tolerances: Sequence[float]) -> float:
    """The relative error of the output of ``outputs`` furthest past its own exact tolerance, 0 where each is within
    its own; infinite where a dtype, shape or integer value differs."""
    if discrete_mismatch(outputs, reference):
        return math.inf
    over = beyond(compare(outputs, reference), tolerances)
    return over[0] if over else 0.0


def _written_inputs(gm: fx.GraphModule) -> tuple[int, ...]:
    """The positions of the placeholders whose write-back ``_flat_graph_module`` dropped."""
    written = set(gm.meta.get("input_writes_dropped", ()))
    return tuple(i for i, n in enumerate(gm.graph.find_nodes(op="placeholder")) if n.name in written)


def _all_finite(t: torch.Tensor) -> bool:
    """Whether ``t`` holds no NaN or Inf; on the CPU by NumPy, on one thread: called right after an ONNX Runtime run,
    whose threads spin on for a while, a torch kernel waited for them (6–9 ms per call where it needs 0.05 ms)."""
    if t.device.type == "cpu" and t.dtype in (torch.float16, torch.float32, torch.float64):
        return bool(np.isfinite(t.detach().resolve_neg().numpy()).all())
    return bool(torch.isfinite(t).all())


def quantized_inputs(gm: fx.GraphModule) -> tuple[int, ...]:
    """The positions of the float placeholders whose NaN or Inf a static quantizer would receive (the signature's
    ``finite_inputs``): a path to it through ops that carry them (``NAN_PROPAGATING``: an image's float stem, a
    reshape). An op that makes them finite ends the path: a -inf attention mask through softmax, a model cleaning
    missing values with nan_to_num, are legitimate inputs. A dynamic int8 linear computes its scale from the row
    and keeps a NaN a NaN."""
    found = []
    for i, node in enumerate(gm.graph.find_nodes(op="placeholder")):
        value = node.meta.get("val")
        if not isinstance(value, torch.Tensor) or not value.is_floating_point():
            continue
        seen, todo = {node}, [node]
        while todo:
            current = todo.pop()
            if is_op(current, *QUANTIZE):
                found.append(i)
                break
            if current is node or is_op(current, *NAN_PROPAGATING):
                todo += [u for u in current.users if u not in seen]
                seen.update(current.users)
    return tuple(found)


def _overlap(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Whether two tensors share an element of memory. Views of one storage are marked element by element (the
    columns ``t[:, :4]`` and ``t[:, 4:]`` interleave without sharing one); views of another dtype count as sharing
    where their byte spans overlap."""
    if not a.numel() or not b.numel() or a.device != b.device or \
            a.untyped_storage().data_ptr() != b.untyped_storage().data_ptr():
        return False
    if a.dtype != b.dtype:
        spans = [byte_span(t) for t in (a, b)]
        return spans[0][0] < spans[1][1] and spans[1][0] < spans[0][1]
    marks = torch.zeros(a.untyped_storage().nbytes() // a.element_size(), dtype=torch.bool, device=a.device)
    marks.as_strided(a.shape, a.stride(), a.storage_offset()).fill_(True)
    return bool(marks.as_strided(b.shape, b.stride(), b.storage_offset()).any())


def byte_span(t: torch.Tensor) -> tuple[int, int]:
    """The addresses [first byte, past the last byte) a non-empty tensor's elements lie in (a strided view's gaps
    included)."""
    return t.data_ptr(), t.data_ptr() + t.element_size() * (1 + sum((n - 1) * st for n, st in zip(t.shape, t.stride())))


def _scalar_outputs(gm: fx.GraphModule) -> tuple[tuple[int, str], ...]:
    """The positions and Python types of ``gm``'s outputs that are numbers computed from symbolic sizes (a
    ``torch.SymInt``: ``x.shape[0]``). They stay graph outputs, which some backends return as 0-d tensors."""
    return tuple((i, SYMBOLIC_SCALARS[type(v.meta.get("val"))]) for i, v in enumerate(graph_outputs(gm.graph))
                 if isinstance(v, fx.Node) and type(v.meta.get("val")) in SYMBOLIC_SCALARS)


def _scalar_kind(kind: Any) -> str:
    if kind not in SCALAR_TYPES:
        raise ArtifactError(f"the artifact's signature names the output type {kind!r}; expected one of "
                            f"{', '.join(SCALAR_TYPES)}")
    return kind


def _constant_outputs(gm: fx.GraphModule) -> tuple[tuple[int, Any], ...]:
    """Take the outputs that are constants of a JSON type (a None, a number, a string) out of ``gm``'s output, in
    place, and return them with their positions: every backend then gets a graph of tensor outputs."""
    values = graph_outputs(gm.graph)
    constants = tuple((i, v) for i, v in enumerate(values) if v is None or isinstance(v, (bool, int, float, str)))
    if constants:
        set_graph_outputs(gm.graph, [v for i, v in enumerate(values) if i not in dict(constants)])
        gm.recompile()
    return constants


class IndexRead(NamedTuple):
    """A tensor an op reads as indices: eager accepts [low, high) (``high`` = k × :data:`BATCH` for a dimension of
    k times the call's batch size, ``low`` = −k × BATCH for [−n, n) there: :func:`call_bound`; :data:`NO_HIGH` for
    bincount's values, which have none), and a loss also its ``ignored`` index; ``label``: a loss's or one_hot's
    classes, read through :data:`LABEL_PATH` too; ``reader``: the op's node; ``slot``: its argument holding ``index``
    and the position there in a list (``x[j, j]`` reads ``j`` twice, into dimensions of two sizes; ``t[t]`` reads
    ``t`` as data too); ``extent``: the tensor and dimension indexed (None: its elements), whose size the guards read
    at run time where it is the batch's."""
    index: fx.Node
    low: int
    high: int
    what: str
    ignored: int | None
    label: bool
    reader: fx.Node
    slot: tuple[str, int | None]
    extent: tuple[fx.Node, int | None] | None = None

    def guard(self) -> list[Any]:
        """(reader, low, high, what): how an artifact names and bounds it (``base.INDEX_GUARDS``; a loss's
        ignore_index named in ``what``)."""
        what = self.what.removesuffix(f" at node {self.reader.name!r}")
        return [self.reader.name, self.low, self.high, what if self.ignored is None else
                f"{what} (or {self.ignored}, its ignore_index)"]


def _index_reads(gm: fx.GraphModule, user: fx.Node, batch: set[str]) -> list[IndexRead]:
    """The tensors ``user`` reads as indices into a dimension of static size n or of the batch's size ``batch``
    (the batch dimension's symbols): an op of :data:`INDEXING` or ``x[index]`` (eager accepts [0, n), and [−n, n)
    for ``x[index]`` and index_fill), ``take``'s into a tensor of n elements ([−n, n)), a loss's labels of C
    classes (:data:`CLASS_INDEX_LOSSES`, [0, C) or its ignore_index), one_hot's (a contrastive loss's classes are
    its batch, or k times it with negatives concatenated) and bincount's values ([0, :data:`NO_HIGH`): eager raises
    for a negative one, which ONNX's ScatterElements counted in a bin from the end)."""
    if is_op(user, *CLASS_INDEX_LOSSES):
        logits, target = argument(user, "self"), argument(user, "target")
        dim = 1 if _rank(logits) > 1 else 0
        classes = _size(gm, logits, dim)
        bound = _batches(classes, batch)
        if _integer_index(target) and (isinstance(classes, int) or bound is not None):
            high, many = (classes, classes) if isinstance(classes, int) else \
                (bound[0], "the batch's" if bound[0] == BATCH else f"the {bound[1].replace('the batch', 'batch')}")
            return [IndexRead(target, 0, high, f"{many} classes at node {user.name!r}",
                              int(argument(user, "ignore_index")), True, user, ("target", None), (logits, dim))]
        return []
    if is_op(user, aten.one_hot):
        classes = argument(user, "num_classes")
        return [IndexRead(data(user), 0, classes, f"{classes} classes at node {user.name!r}", None, True, user,
                          ("self", None))] \
            if classes > 0 and _integer_index(data(user)) else []
    if is_op(user, aten.bincount):
        values = argument(user, "self")
        return [IndexRead(values, 0, NO_HIGH, f"the bins of a bincount at node {user.name!r}", None, False, user,
                          ("self", None))] if _integer_index(values) else []
    if is_op(user, aten.take):  # into the flattened tensor: [−numel, numel)
        value, index = argument(user, "self").meta.get("val"), argument(user, "index")
        n = value.numel() if isinstance(value, torch.Tensor) and _integer_index(index) else None
        if (bound := _batches(n, batch)) is not None:
            return [IndexRead(index, -bound[0], bound[0], f"the {bound[1].replace('the batch', 'batch')} elements at "
                              f"node {user.name!r}", None, False, user, ("index", None),
                              (argument(user, "self"), None))]
        return [IndexRead(index, -n, n, f"the {n} elements at node {user.name!r}", None, False, user,
                          ("index", None))] \
            if isinstance(n, int) else []
    reads = []
    for index, source, dim, low_is_minus_n, slot in _indexed_dims(user):
        size = _size(gm, source, dim)
        if (bound := _batches(size, batch)) is not None:
            reads.append(IndexRead(index, -bound[0] if low_is_minus_n else 0, bound[0],
                                   f"dimension {dim} ({bound[1]}) at node {user.name!r}", None, False, user, slot,
                                   (source, dim)))
        elif isinstance(size, int):
            what = (f"an embedding of {size} rows" if is_op(user, aten.embedding) else
                    f"dimension {dim} (size {size}) at node {user.name!r}")
            reads.append(IndexRead(index, -size if low_is_minus_n else 0, size, what, None, False, user, slot))
    return reads


def _batches(size: Any, batch: set[str]) -> tuple[int, str] | None:
    """The bound (k × :data:`BATCH` + c, :func:`call_bound`) and its words where a symbolic ``size`` is k times the
    batch (of symbol in ``batch``) plus c: a dimension of the batch's size, of the batch flattened with others
    (``x.reshape(-1)``, whose index TVM read past the tensor unchecked), or of a concatenation with more rows
    (``cat([x, x[:1]])``: 4 × the batch + 4, which TVM read past unchecked too)."""
    if not isinstance(size, torch.SymInt):
        return None
    expr = size.node.expr.expand()
    if len(expr.free_symbols) != 1 or str(symbol := next(iter(expr.free_symbols))) not in batch:
        return None
    k, c = expr.coeff(symbol, 1), expr.coeff(symbol, 0)
    if not (k.is_Integer and c.is_Integer and k > 0 and abs(c) < BATCH // 4 and (expr - k * symbol - c).expand() == 0):
        return None
    many = "the batch" if k == 1 else f"{k} × the batch"
    return int(k) * BATCH + int(c), many if c == 0 else f"{many} {'+' if c > 0 else '−'} {abs(c)}"


def _integer_index(node: Any) -> bool:
    """Whether ``node`` is an integer tensor: a bool or uint8 mask selects, a float target holds probabilities."""
    value = node.meta.get("val") if isinstance(node, fx.Node) else None
    return isinstance(value, torch.Tensor) and not (value.is_floating_point() or value.is_complex()) and \
        value.dtype not in (torch.bool, torch.uint8)


def _batch_symbols(gm: fx.GraphModule) -> set[str]:
    """The symbols of the inputs' dynamic batch dimension."""
    values = (p.meta.get("val") for p in gm.graph.find_nodes(op="placeholder"))
    return {str(v.shape[0]) for v in values if isinstance(v, torch.Tensor) and v.dim()
            and not isinstance(v.shape[0], int)}


def _index_bounds(gm: fx.GraphModule) -> tuple[tuple[Any, ...], ...]:
    """(input, low, high, what) for each flat integer input that an op reads as indices (:func:`_index_reads`,
    through :func:`_value_users`), and (input, low, high, what, ignore_index) for a loss's labels: the signature
    checks them on every call (TVM read past a batch; ONNX wrapped −1 around)."""
    batch = _batch_symbols(gm)
    bounds = []
    for i, node in enumerate(gm.graph.find_nodes(op="placeholder")):
        if not _index_input(node):
            continue
        for label, through in ((True, SAME_VALUES + LABEL_PATH), (False, SAME_VALUES)):
            for user, index in _value_users(node, through):
                bounds += [(i, r.low, r.high, r.what, *(() if r.ignored is None else (r.ignored,)))
                           for r in _index_reads(gm, user, batch) if r.index is index and r.label == label]
    return tuple(bounds)


def _index_input(node: fx.Node) -> bool:
    """Whether input ``node`` can hold indices: an integer tensor, uint8 included (cast to ids in forward); a bool
    mask selects, a float holds none."""
    value = node.meta.get("val")
    return _integer_index(node) or (isinstance(value, torch.Tensor) and value.dtype == torch.uint8)


def computed_indices(gm: fx.GraphModule) -> list[IndexRead]:
    """The indices the model computes from its inputs' values (``emb(ids - 1)``, GPT-2's shifted labels, ids
    through ``where``, ``clamp`` or ``masked_fill``) and an op reads (:func:`_index_reads`), in graph order: the
    signature cannot check them. Not those an input holds as they are (:func:`_index_bounds` checks them) nor those
    computed from constants alone (an ``arange``, a buffer of position ids)."""
    batch = _batch_symbols(gm)
    inputs = [p for p in gm.graph.find_nodes(op="placeholder") if _index_input(p)]
    as_is = {label: {n for p in inputs for _, n in _value_users(p, through)} | set(inputs)
             for label, through in ((True, SAME_VALUES + LABEL_PATH), (False, SAME_VALUES))}
    return [read for user in gm.graph.nodes if user.op == "call_function"
            for read in _index_reads(gm, user, batch)
            if read.index not in as_is[read.label] and _computed_from_inputs(read.index)]


# what an empty index's min and max are: past any index, and within what TVM takes as an int64 literal (it failed on
# −2**63, whose negation it holds)
INT64 = (2 ** 62, -2 ** 62)


def index_guards(gm: fx.GraphModule) -> list[list[Any]]:
    """Make ``gm`` return, after the model's outputs, the [min, max] of each of :func:`computed_indices` (a loss's
    ignore_index left out; an empty index's are ±2**62, which no check refuses), for a backend whose kernels read
    an index out of range silently (ONNX's Gather wraps −1 around, TVM reads past a table) where eager raises;
    returns their ``IndexRead.guard``, which the artifact compares the extra outputs with after each run
    (``base.Artifact.checked_indices``). The op reads each index mod the size it indexes, or clamped at 0 where it
    has none (:func:`_wrapped`), since the check follows the run: TVM wrote an ``index_put``'s column 40001 of 5 past
    the tensor before it, and its scatter into row 10**10 of the batch and a cross-entropy's class 10**10 crashed the
    process."""
    graph, found, extremes = gm.graph, computed_indices(gm), []
    for read in found:
        with graph.inserting_before(graph.output_node()):
            flat = graph.call_function(aten._to_copy.default, (graph.call_function(
                aten.reshape.default, (read.index, [-1])),), {"dtype": torch.int64})
            ends = []
            for end, fill in zip((aten.amin.default, aten.amax.default), INT64):  # fill: what neither end can be
                values = flat if read.ignored is None else graph.call_function(aten.masked_fill.Scalar, (
                    flat, graph.call_function(aten.eq.Scalar, (flat, read.ignored)), fill))
                padded = graph.call_function(aten.constant_pad_nd.default, (values, [0, 1], fill))
                ends.append(graph.call_function(end, (padded, [0])))
            extremes.append(graph.call_function(aten.stack.default, (ends,)))
        if read.high < BATCH // 2 or read.extent:
            with graph.inserting_before(read.reader):
                wrapped, (name, position) = _wrapped(graph, read), read.slot
                set_argument(read.reader, name, wrapped if position is None else [
                    wrapped if k == position else t for k, t in enumerate(argument(read.reader, name))])
    if extremes:
        set_graph_outputs(graph, [*graph_outputs(graph), *extremes])
        gm.recompile()
    return [read.guard() for read in found]


def _wrapped(graph: fx.Graph, read: IndexRead) -> fx.Node:
    """``read.index`` mod the size n it indexes (n at run time where it is the batch's), a loss's ignore_index kept
    as it is: no index outside the tensor, the same element for every index eager accepts. Bincount's values
    (:data:`NO_HIGH`) clamped at 0 instead: its output grows to hold them, so a negative value mod a bound would size
    it by that bound; read as they were, ONNX Runtime's ScatterElements failed by itself, naming its own node, for
    −1001 into 8 bins."""
    index = read.index
    if read.high == NO_HIGH:
        return graph.call_function(aten.clamp_min.default, (index, 0))
    wrapped = graph.call_function(aten.remainder.Scalar, (index, read.high)) if read.high < BATCH // 2 else \
        graph.call_function(aten.remainder.Tensor, (index, _run_size(graph, *read.extent)))
    if read.ignored is None:
        return wrapped
    ignored = graph.call_function(aten.eq.Scalar, (index, read.ignored))
    return graph.call_function(aten.where.self, (ignored, index, wrapped))


def _run_size(graph: fx.Graph, source: fx.Node, dim: int | None) -> fx.Node:
    """A 0-d int64 tensor of ``source``'s size along ``dim`` (None: its number of elements) at run time: the ONNX
    exporter takes no symbolic number in ``remainder``, TVM's importer none in ``scalar_tensor``; both take ``full``."""
    size = graph.call_function(aten.sym_numel.default, (source,)) if dim is None else \
        graph.call_function(aten.sym_size.int, (source, dim))
    return graph.call_function(aten.full.default, ([], size), {"dtype": torch.int64})


def _computed_from_inputs(node: fx.Node) -> bool:
    """Whether ``node``'s values depend on an input's values (not on its sizes alone, as an ``arange`` of the
    sequence length does)."""
    stack, seen = [node], {node}
    while stack:
        current = stack.pop()
        if current.op == "placeholder":
            return True
        for source in current.all_input_nodes:  # a size (a SymInt) carries no value of the input
            if source not in seen and not isinstance(source.meta.get("val"), (int, torch.SymInt)):
                seen.add(source)
                stack.append(source)
    return False


# ops whose output holds every value of their input and constants (a pad with the ignore_index): a loss's labels read
# through them are its input's. Not a slice: a slice's other values may be anything (a multi-task model's labels for
# another loss, a length), and checking them refused valid calls; so GPT-2's shifted labels (padded, then sliced by
# one) are not checked
LABEL_PATH = (aten.pad, aten.constant_pad_nd)


def _value_users(node: fx.Node, through: tuple[Any, ...] = SAME_VALUES) -> Iterator[tuple[fx.Node, fx.Node]]:
    """(user, the node it reads) for each user of ``node``'s values, through ops that only rearrange them
    (:data:`SAME_VALUES`, or ``through``) and integer casts that keep every value (int32 ids made int64 by
    ``ids.long()``): GPT-2 and OPT reshape ``input_ids`` before their embedding, and their ids were never checked
    (id −1 read the last row on ONNX, TVM read past the table)."""
    stack, seen = [node], {node}
    while stack:
        current = stack.pop()
        for user in current.users:
            yield user, current
            if (is_op(user, *through) or _widening_cast(user)) and data(user) is current and user not in seen:
                seen.add(user)
                stack.append(user)


# ops reading an argument as indices into a dimension of another: (index argument, indexed argument, its dimension:
# an argument's name or a number, whether eager also accepts [−n, 0)); ONNX's ScatterElements, Gather and friends
# wrap a negative index around where eager raises (scatter, index_add, embedding_bag with index −2 returned numbers)
INDEXING = {aten.embedding: ("indices", "weight", 0, False), aten.gather: ("index", "self", "dim", False),
            aten.index_select: ("index", "self", "dim", False), aten.scatter: ("index", "self", "dim", False),
            aten.scatter_add: ("index", "self", "dim", False), aten.scatter_reduce: ("index", "self", "dim", False),
            aten.index_add: ("index", "self", "dim", False), aten.index_copy: ("index", "self", "dim", False),
            aten.index_fill: ("index", "self", "dim", True), aten.embedding_bag: ("indices", "weight", 0, False),
            aten._embedding_bag: ("indices", "weight", 0, False), aten.multi_margin_loss: ("target", "self", -1, False)}


def _indexed_dims(user: fx.Node) -> list[tuple[fx.Node, fx.Node, int, bool, tuple[str, int | None]]]:
    """(index, source, dim, negatives allowed, ``IndexRead.slot``) for each dimension of ``source`` that ``user``
    indexes with a tensor ``index`` (an integer tensor: a bool or uint8 one of ``x[mask]`` selects); ``x[index] = v``
    (``index_put``) as ``x[index]``: TVM wrote past the tensor for a column outside [−n, n) and returned as if
    valid."""
    if is_op(user, aten.index, aten.index_put):
        reads, dim = [], 0
        # a k-dimensional mask takes k dimensions (x[mask2d, i]: i indexes 2)
        for position, t in enumerate(argument(user, "indices")):
            if _integer_index(t):
                reads.append((t, argument(user, "self"), dim, True, ("indices", position)))
            value = t.meta.get("val") if isinstance(t, fx.Node) else None
            dim += value.dim() if isinstance(value, torch.Tensor) and value.dtype in (torch.bool, torch.uint8) else 1
        return reads
    packet = getattr(user.target, "overloadpacket", None) if user.op == "call_function" else None
    if packet not in INDEXING:
        return []
    index_arg, source, dim, negatives = INDEXING[packet]
    index = argument(user, index_arg)
    return [(index, argument(user, source), argument(user, dim) if isinstance(dim, str) else dim, negatives,
             (index_arg, None))] \
        if _integer_index(index) else []


def _size(gm: fx.GraphModule, source: Any, dim: int) -> Any:
    """``source``'s size along ``dim``: an int where it is known (a constant, or a shape the export fixed), a SymInt
    where it is symbolic (the batch), None where ``source`` is no tensor of such a dimension."""
    value = get_tensor(gm, source) if isinstance(source, fx.Node) else None
    if value is None and isinstance(source, fx.Node):
        value = source.meta.get("val")
    if not isinstance(value, torch.Tensor) or not -value.dim() <= dim < value.dim():
        return None
    return value.shape[dim]


def _widening_cast(node: fx.Node) -> bool:
    """A cast of an integer tensor to an integer dtype holding every value of its own (int32 → int64)."""
    if not is_op(node, aten._to_copy, aten.to):
        return False
    source, dtype = data(node).meta.get("val"), argument(node, "dtype", None)
    if not (isinstance(source, torch.Tensor) and isinstance(dtype, torch.dtype)) or source.dtype == torch.bool or \
            source.dtype.is_floating_point or source.dtype.is_complex or dtype.is_floating_point or dtype.is_complex \
            or dtype == torch.bool:
        return False
    wide, narrow = torch.iinfo(dtype), torch.iinfo(source.dtype)
    return wide.min <= narrow.min and narrow.max <= wide.max


def _nested_encoder(model: torch.nn.Module, args: tuple, refs: _References) -> str | None:
    """The name of an ``nn.TransformerEncoder`` of ``model`` whose nested-tensor fast path (eager inference, given a
    padding mask) changes the model's outputs on the example, or None: a copy with it off is run and compared. An
    encoder merely present is no cause (a review: the advice was given to a model that takes another path under
    export for a reason of its own)."""
    names = [name for name, m in model.named_modules()
             if isinstance(m, torch.nn.TransformerEncoder) and getattr(m, "use_nested_tensor", False)]
    if not names:
        return None
    probe = copy_model(model)
    for m in probe.modules():
        if isinstance(m, torch.nn.TransformerEncoder):
            m.use_nested_tensor = False
    with torch.no_grad():
        plain = pytree.tree_leaves(probe(*clone_inputs(args)))
    return names[0] if compare(plain, refs.model.outputs("example", args)).max_rel > EXACT_TOLERANCE else None


def _rank(node: Any) -> int:
    """The number of dimensions of a graph value (0 where it is no tensor)."""
    value = node.meta.get("val") if isinstance(node, fx.Node) else None
    return value.dim() if isinstance(value, torch.Tensor) else 0


def _index_bound(saved: Sequence[Any]) -> tuple[Any, ...]:
    """A saved index bound; artifacts saved before gather and index were checked hold (input, embedding rows)."""
    if len(saved) == 2:
        return saved[0], 0, saved[1], f"an embedding of {saved[1]} rows"
    return tuple(saved)


def _mutated_buffers(ep: torch.export.ExportedProgram) -> list[str]:
    """The buffers ``ep``'s forward writes in place (a call counter, running statistics): the arguments its ops'
    schemas mark as written that are buffer inputs."""
    buffers = ep.graph_signature.inputs_to_buffers
    found = set()
    for node in ep.graph.nodes:
        schema = getattr(node.target, "_schema", None) if node.op == "call_function" else None
        for arg, spec in zip(node.args, schema.arguments if schema else ()):
            if spec.alias_info is not None and spec.alias_info.is_write and getattr(arg, "name", None) in buffers:
                found.add(buffers[arg.name])
    return sorted(found)


def _functional(ep: torch.export.ExportedProgram, refs: _References) -> tuple[fx.GraphModule, float]:
    """The functional graph of ``ep`` and how far it is from the model (``_References.error``). Local rewrites
    (compiler/functionalize.py) give it in a fraction of the time export's decomposition takes, when they apply;
    the decomposition serves the rest, and a rewritten graph that does not reproduce the model is decomposed anew,
    so that a gap in the rewrites never passes for a model that branches on its batch size."""
    with EXPORT_LOCK:  # unlifting and decomposing trace with process-wide state, as export does
        rewritten = functional_graph(ep.module())
    if rewritten is not None:
        gm = _flat_graph_module(rewritten)
        err = refs.error(gm)
        if err <= EXACT_TOLERANCE:
            return gm, err
    with EXPORT_LOCK:
        try:
            decomposed = ep.run_decompositions({})
        except Exception as e:  # seen: a torch.enable_grad() block inside a torch.no_grad() one (IndexError in torch)
            raise TraceError(f"torch.export captured the model but could not make its graph functional: "
                             f"{type(e).__name__}: {first_line(e)}") from None
        gm = _flat_graph_module(decomposed.module())
    return gm, refs.error(gm)


class _References:
    """The model's own outputs on the example inputs as given and on fresh inputs of the same shapes (those the
    artifact is checked on, ``BACKEND_SEED``), computed once (``ModelRuns``) for every capture attempt (dynamic or
    static batch, rewritten or decomposed) and for the artifact check; the copy that is exported is never run."""

    def __init__(self, runs: ModelRuns, args: tuple) -> None:
        self.model, self.args = runs, args
        flat, spec = pytree.tree_flatten(args)
        try:
            runs.outputs("example", args)
        except Exception as e:
            key = re.fullmatch(r"'dict' object has no attribute '(\w+)'", first_line(e)) \
                if isinstance(e, AttributeError) else None
            hint = (f" (a mapping argument, a tokenizer's BatchEncoding too, reaches the model as a plain dict, "
                    f"which torch.export takes: read it by key, [{key[1]!r}])") if key else ""
            raise InputError(f"the model does not run on the example inputs {_describe(flat)}: "
                             f"{first_line(e)}{hint}") from None
        out = runs.cached["example"]
        nan = next((i for i, v in enumerate(pytree.tree_leaves(out)) if isinstance(v, float) and math.isnan(v)), None)
        if nan is not None:  # export's own message spoke of output order and control flow
            raise InputError(f"the model returns NaN as a Python number (output {nan}), which torch.export cannot match "
                             "to the graph's outputs (NaN equals nothing): return it as a tensor, "
                             "torch.tensor(float('nan'))")
        if not any(isinstance(t, torch.Tensor) for t in pytree.tree_leaves(out)):
            opaque = next((leaf for leaf in pytree.tree_leaves(out) if any(isinstance(v, torch.Tensor) for v in (
                *getattr(leaf, "__dict__", {}).values(),  # a dict or list subclass holds its tensors as items
                *(leaf.values() if isinstance(leaf, dict) else leaf if isinstance(leaf, (list, tuple)) else ())))),
                          None)
            if opaque is not None:  # a dataclass or object that pytree sees as one leaf
                raise InputError(f"the model returns its tensors inside a {type(opaque).__name__}, which "
                                 "torch.utils._pytree cannot see into: register the class (torch.utils._pytree."
                                 "register_dataclass, or register_pytree_node) or return a tuple or dict")
            raise InputError(f"the model returns no tensor (got {type(out).__name__}): there is nothing to compile")
        self.fresh = pytree.tree_unflatten(list(fresh_inputs(flat, BACKEND_SEED)), spec)

    def error(self, gm: fx.GraphModule) -> float:
        """How far ``gm`` is from the model past each output's exact tolerance (``verify.exact_tolerances``: 8 units
        of the last place where an output is computed in half precision; a float16 attention block, 4.8e-4 off by
        its own rounding, was refused against float32's 1e-4): the worst such relative error over the two inputs,
        0 where every output is within its own. A model whose two runs on the same inputs disagree (random ops)
        cannot be checked this way and gives 0."""
        runs = [(self.args, self.model.outputs("example", self.args)),
                (self.fresh, self.model.outputs(BACKEND_SEED, self.fresh))]
        with torch.no_grad():
            got = [(list(gm(*pytree.tree_leaves(clone_inputs(inputs)))), want) for inputs, want in runs]
        worst = max(_past_tolerance(out, want, exact_tolerances(gm)) for out, want in got)
        if worst > EXACT_TOLERANCE:
            if compare(pytree.tree_leaves(self.model.run(self.args)), runs[0][1]).max_rel > EXACT_TOLERANCE:
                return 0.0
        return worst


def as_plain(value: Any) -> Any:
    """``value`` with every mapping that is not a dict (a tokenizer's ``BatchEncoding``, a ``UserDict``) made a
    dict, inside plain tuples, lists and dicts: pytree, and so export and the signature, know dicts only, and a model
    taking a tokenizer's output was refused ("must be a tuple of tensors"). A model reading it by attribute
    (``enc.input_ids``) then fails on the example inputs, named, with the remedy (read it by key)."""
    if type(value) is dict or (isinstance(value, Mapping) and not isinstance(value, dict)):  # OrderedDict stays
        return {k: as_plain(v) for k, v in value.items()}
    if type(value) in (tuple, list):  # a namedtuple stays one
        return type(value)(as_plain(v) for v in value)
    return value


def _input_name(args: tuple, i: int) -> str:
    """Flat input ``i`` of ``(args, kwargs)`` as an error names it: "input 2", and where the arguments nest (a tuple
    or dict argument) also where it sits, "input 2 (argument 1[1])", "input 1 (argument 0['b'])": the flat index
    alone did not say which tensor of a structure was wrong."""
    path = pytree.tree_flatten_with_path(args)[0][i][0]
    where = pytree.keystr(path[2:])  # path[0]: args or kwargs; path[1]: the argument
    if not where:
        return f"input {i}"
    what = f"argument {path[1].idx}" if isinstance(path[1], pytree.SequenceKey) else f"keyword {path[1].key!r}"
    return f"input {i} ({what}{where})"


def batch_size(args: Any) -> int | None:
    """The batch size of model inputs (nested or flat): dimension 0 of the first input that has one, as the signature
    takes it (a leading 0-d input, a scale or a temperature, holds no batch); None where no input has a dimension.
    The one rule: quality, compile's re-batching and every backend ask this."""
    return next((int(t.shape[0]) for t in pytree.tree_leaves(args) if isinstance(t, torch.Tensor) and t.dim()), None)


def _export(model: torch.nn.Module, args: tuple, *, dynamic: bool) -> torch.export.ExportedProgram:
    dynamic_shapes = None
    if dynamic:  # the leaves sharing the first one's batch size get one symbolic batch dimension
        leaves, spec = pytree.tree_flatten(args)
        batch = batch_size(args)
        leaves, shapes = batch_dynamic(leaves, [t.dim() > 0 and t.shape[0] == batch for t in leaves])
        args = pytree.tree_unflatten(list(leaves), spec)
        dynamic_shapes = _per_parameter(model, pytree.tree_unflatten(list(shapes), spec)) if shapes else None
    # the lock first: one thread swaps stderr, and the warning filters, at a time
    with EXPORT_LOCK, torch.no_grad(), _quiet_torch_logs(), warnings.catch_warnings():
        # nn.LSTM/GRU/RNN and parametrizations rebind tensor attributes in forward (``_flat_weights``): export's
        # advice to register them as buffers is about torch's own modules, which a user cannot act on
        warnings.filterwarnings("ignore", message=r"The tensor attributes? .* assigned during export")
        return torch.export.export(model, args, dynamic_shapes=dynamic_shapes, strict=False)


def _per_parameter(model: torch.nn.Module, shapes: tuple) -> tuple:
    """``shapes`` (one per positional argument) in the structure export matches them with, one per parameter of
    ``forward``: the arguments a ``*args`` parameter collects share one entry, a tuple (export refused a flat one,
    and the capture fell back to a static batch); none where it collects nothing (export counted an empty entry as
    one more input than it was given, and the batch became static)."""
    try:
        parameters = list(inspect.signature(model.forward).parameters.values())
    except (TypeError, ValueError):
        return shapes
    for k, p in enumerate(parameters):
        if p.kind is inspect.Parameter.VAR_POSITIONAL:
            return (*shapes[:k], tuple(shapes[k:])) if len(shapes) > k else shapes
    return shapes


def batch_dynamic(args: Sequence[torch.Tensor], batched: Sequence[bool],
                  max_batch: int | None = MAX_BATCH) -> tuple[tuple, tuple | None]:
    """Arguments and ``dynamic_shapes`` to (re-)export a graph with dimension 0 of the ``batched`` inputs
    symbolic (one shared ``Dim``): how capture and every backend that re-exports (eager's save, ONNX, TVM) say
    "dynamic batch". A batch of 1 is doubled, since export specialises size-1 dimensions. ``max_batch`` bounds
    the symbol for the analyses of export and the backends; a saved program checks it at every call, so eager's
    save passes None (unbounded), as the signature promises any batch size."""
    if not any(batched):
        return tuple(args), None
    batch = Dim("batch", min=1, max=max_batch)
    shapes = tuple({0: batch} if b else None for b in batched)
    return tuple(torch.cat([t, t]) if b and t.shape[0] == 1 else t for t, b in zip(args, batched)), shapes


@contextlib.contextmanager
def _quiet_torch_logs():
    """Export logs and prints whole graphs on failure; the TraceError says what matters. Only this thread's writes
    to stderr are dropped: a plain redirect silenced every thread's meanwhile (warnings, progress bars)."""
    logger = logging.getLogger("torch")
    level = logger.level
    logger.setLevel(logging.CRITICAL)
    stderr = sys.stderr
    if stderr is not None:  # no stderr at all (pythonw): nothing to silence
        sys.stderr = _MutedForThisThread(stderr)
    try:
        yield
    finally:
        sys.stderr = stderr
        logger.setLevel(level)


class _MutedForThisThread:
    """A stream that drops what the thread that made it writes and passes every other thread's writes on."""

    def __init__(self, stream: Any) -> None:
        self.stream, self.thread = stream, threading.get_ident()

    def write(self, text: str) -> int:
        return len(text) if threading.get_ident() == self.thread else self.stream.write(text)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.stream, name)


def _spec_shape(t: torch.Tensor, batched: bool) -> tuple[int | None, ...]:
    """The shape a signature states: dimension 0 any size (None) where it is the shared symbolic batch (the inputs
    whose size there is the first input's, as ``_export`` makes them), every other dimension as in the example."""
    return tuple(None if batched and i == 0 else d for i, d in enumerate(t.shape))


def _flat_graph_module(gm: fx.GraphModule) -> fx.GraphModule:
    """Drop export's guards, its tensor-metadata asserts (the Signature checks inputs) and pytree codegen:
    flat tensors in, a flat tuple out. A model that writes into its input (``x.mul_(2)``) is captured as a
    function: its outputs are the same, the write-back into the caller's tensor (``copy_`` into a placeholder,
    which no exported format can express) is dropped and listed in ``meta["input_writes_dropped"]``. Every view
    becomes a reshape (:func:`~fxforge.compiler.graph.views_as_reshapes`)."""
    graph = gm.graph
    dropped = []
    for node in list(graph.nodes):
        if (node.op == "call_module" and node.target == "_guards_fn") or \
                node.target is torch.ops.aten._assert_tensor_metadata.default:
            graph.erase_node(node)
        elif node.target is torch.ops.aten.copy_.default and data(node).op == "placeholder" and (
                not node.users or _same_tensor_type(data(node), argument(node, "src"))):
            # a write returned as an output too (``x.mul_(2); return y, x``) returns the value written: the eager and
            # TorchScript artifacts wrote into the caller's tensor, and the check then blamed "random ops"
            node.replace_all_uses_with(argument(node, "src"))
            dropped.append(data(node).name)
            graph.erase_node(node)
    views_as_reshapes(graph)  # export's views hold for the example's strides: a channels_last call has others
    graph._codegen = fx.graph.CodeGen()
    out = fx.GraphModule(gm, graph, class_name="FxforgeGraph")
    if hasattr(out, "_guards_fn"):
        delattr(out, "_guards_fn")
    out.meta["input_writes_dropped"] = dropped
    out.recompile()
    return out


def _same_tensor_type(a: fx.Node, b: Any) -> bool:
    """Whether nodes ``a`` and ``b`` hold tensors of one shape and dtype (``copy_`` casts and broadcasts)."""
    va, vb = a.meta.get("val"), getattr(b, "meta", {}).get("val")
    return isinstance(va, torch.Tensor) and isinstance(vb, torch.Tensor) and va.dtype == vb.dtype and \
        va.shape == vb.shape


def _user_frame(e: BaseException) -> str:
    """The innermost frame outside torch: where in the user's code export gave up."""
    frames = [f for f in traceback.extract_tb(e.__traceback__) if "/torch/" not in f.filename
              and "/fxforge/" not in f.filename]
    if not frames:
        return ""
    f = frames[-1]
    return f" at {f.filename}:{f.lineno} in {f.name}: {f.line}"


# functions inside torch where export gives up on a model for a reason of torch's own → what the user can do
TORCH_CAUSES = {"_detect_is_causal_mask": "nn.Transformer's layers compare a given mask with a causal one to decide "
                                          "whether it is causal, which a captured graph cannot do: pass "
                                          "tgt_is_causal= (is_causal=, src_is_causal=) with the mask"}


def _trace_error(e: BaseException) -> TraceError:
    cause = next((TORCH_CAUSES[f.name] for f in traceback.extract_tb(e.__traceback__) if f.name in TORCH_CAUSES), None)
    if cause:  # REMEDIES spoke of control flow and the batch size: no help
        return TraceError(f"torch.export could not capture the model{_user_frame(e)}: {cause}")
    if isinstance(e, DynamicOutputShapeException):  # REMEDIES spoke of control flow and the batch size: no help
        return TraceError(f"torch.export could not capture the model: {first_line(e)} returns a shape that depends "
                          f"on its inputs' values, which a captured graph cannot hold ({_user_frame(e).lstrip()}); "
                          "compute it outside the compiled model")
    return TraceError(f"torch.export could not capture the model: {first_line(e)}{_user_frame(e)}. "
                      f"Remedies: {REMEDIES}")
