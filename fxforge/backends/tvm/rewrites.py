"""Relax rewrites that give a matmul the shapes the CPU schedule rule makes fast (run by ``lower.prepare``).

Two rules, both exact (they only move data-layout ops; every value computed is the same):

1. **An unbroadcast weight**: ``matmul(a, broadcast_to(w, [*lead, K, N]))`` with a 2-D ``w`` and ``a`` of shape
   ``[*lead, M, K]`` → ``matmul(a, w)`` (Relax broadcasts a 2-D right operand itself). torch's ``matmul``
   decomposition expands a linear's weight over the batch when the input is not contiguous (BERT's attention
   output projection), and constant folding then materializes one weight copy per batch element, which the
   schedule rule cannot recognise as a constant weight: each batch element streamed its own copy.
2. **Reshapes sink below elementwise ops**: ``f(reshape(y, s))`` → ``reshape(f(y), s)`` for a unary
   elementwise ``f`` (GELU), and ``g(reshape(y, s), z)`` → ``reshape(g(y, reshape(z, y.shape)), s)`` for a
   binary one whose other operand ``z`` has shape ``s`` or is a scalar (a residual add); a reshape of a reshape
   is one reshape, and a reshape to its input's own shape is its input. A linear's ``[B·T, N]`` output is
   reshaped to ``[B, T, N]`` before its GELU or residual add, and the reshape (an injective op) ends the
   matmul's fused function: the elementwise op ran as a second pass over the output instead of in the tile's
   write-back. After the rule, reshapes are views (``vm.builtin.reshape``).
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import tvm

UNARY = ("relax.nn.gelu", "relax.nn.gelu_tanh", "relax.nn.relu", "relax.nn.silu", "relax.sigmoid", "relax.tanh",
         "relax.erf", "relax.exp")
BINARY = ("relax.add", "relax.subtract", "relax.multiply", "relax.divide")


def matmul_layout() -> tvm.transform.Pass:
    """The module pass applying both rules to every Relax function (unused bindings then removed)."""
    import tvm
    from tvm import relax

    @relax.expr_functor.mutator
    class Rewriter(relax.PyExprMutator):
        def bound(self, expr: relax.Expr, op: str) -> relax.Call | None:
            """The call of ``op`` that ``expr`` (a variable) is bound to, else None."""
            value = self.lookup_binding(expr) if isinstance(expr, relax.Var) else None
            return value if isinstance(value, relax.Call) and getattr(value.op, "name", None) == op else None

        def visit_call_(self, call: relax.Call) -> relax.Expr:
            new = super().visit_call_(call)
            name = getattr(new.op, "name", None)
            if name == "relax.matmul":
                return _unbroadcast(self, new)
            if name == "relax.reshape":
                return _collapse(self, new, _shape(call))
            if name in UNARY or name in BINARY:
                return _sink(self, new, name in UNARY)
            return new

    @tvm.transform.module_pass(opt_level=0, name="FxforgeMatmulLayout")
    def rewrite(mod: tvm.IRModule, _ctx: Any) -> tvm.IRModule:
        out = mutate_functions(Rewriter(mod), mod)
        for gv, func in out.functions_items():
            if isinstance(func, relax.Function):
                out[gv] = relax.analysis.remove_all_unused(func)
        return out

    return rewrite


def mutate_functions(mutator: Any, mod: tvm.IRModule) -> tvm.IRModule:
    """``mod`` with every Relax function visited by ``mutator`` (a ``PyExprMutator`` built on ``mod``)."""
    from tvm import relax
    for gv, func in mod.functions_items():
        if isinstance(func, relax.Function):
            mutator.builder_.update_func(gv, mutator.visit_expr(func))
    return mutator.builder_.get()


def _shape(expr: Any) -> list | None:
    shape = getattr(expr.ty, "shape", None)
    return list(shape.values) if shape is not None and hasattr(shape, "values") else None


def _operand(call: Any) -> Any:
    """The first operand of a relax call (relax IR, not an ATen node: compiler/ops.py does not apply)."""
    return call.args[0]


def _same(a: list | None, b: list | None) -> bool:
    return a is not None and b is not None and len(a) == len(b) and all(
        x.same_as(y) or (hasattr(x, "value") and hasattr(y, "value") and x.value == y.value) for x, y in zip(a, b))


def _unbroadcast(rw: Any, call: Any) -> Any:
    """Rule 1: ``matmul(a, broadcast_to(w))`` with a 2-D ``w`` of the broadcast's last two sizes reads ``w`` itself
    (``a``'s own broadcast to its shape, a no-op, dropped too)."""
    from tvm import relax
    lhs, rhs = call.args
    broadcast = rw.bound(rhs, "relax.broadcast_to")
    weight = _operand(broadcast) if broadcast is not None else None
    if weight is None or len(_shape(weight) or ()) != 2 or not _same(_shape(weight), (_shape(rhs) or [])[-2:]):
        return call  # not a 2-D weight, or one broadcast along K or N too ([K, 1] → [.., K, N])
    lhs_broadcast = rw.bound(lhs, "relax.broadcast_to")
    if lhs_broadcast is not None and _same(_shape(_operand(lhs_broadcast)), _shape(lhs)):
        lhs = _operand(lhs_broadcast)
    if not _same((_shape(lhs) or [])[:-2], _shape(rhs)[:-2]):  # the rows of a must not be a broadcast either
        return call
    return relax.op.matmul(lhs, weight, out_dtype=call.attrs.out_dtype)


def _collapse(rw: Any, call: Any, shape: list | None) -> Any:
    """``reshape(reshape(y, s1), s2)`` → ``reshape(y, s2)``; a reshape to ``y``'s own shape → ``y``."""
    from tvm import relax
    source = call.args[0]
    inner = rw.bound(source, "relax.reshape")
    if inner is not None:
        source = _operand(inner)
    if _same(_shape(source), shape):
        return source
    return relax.op.reshape(source, call.args[1]) if inner is not None else call


def _sink(rw: Any, call: Any, unary: bool) -> Any:
    """Rule 2: an elementwise op applied to a reshape is applied before it."""
    from tvm import relax
    first, *rest = call.args
    reshape = rw.bound(first, "relax.reshape")
    swapped = False
    if reshape is None and not unary:  # add(z, reshape(y)): the reshape on the right
        reshape, swapped = rw.bound(rest[0], "relax.reshape"), True
        first, rest = rest[0], [call.args[0]]
    if reshape is None or _shape(_operand(reshape)) is None:
        return call
    source, target = _operand(reshape), _shape(first)
    if unary:
        return relax.op.reshape(rw.builder_.emit(relax.Call(call.op, [source], call.attrs)), target)
    other = rest[0]
    if _shape(other) == []:
        moved = other
    elif _same(_shape(other), target):
        moved = rw.builder_.emit(relax.op.reshape(other, _shape(source)))
    else:
        return call
    args = [moved, source] if swapped else [source, moved]
    return relax.op.reshape(rw.builder_.emit(relax.Call(call.op, args, call.attrs)), target)
