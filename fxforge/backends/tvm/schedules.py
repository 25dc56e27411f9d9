"""Default schedules for the TVM backend's PrimFuncs: dlight's GPU rules, and a register-tiled CPU rule.

Untuned Relax code is naive single-threaded loop nests; these rules are what an untuned build runs, and what
MetaSchedule tuning (``tuning.py``) measures as the baseline every searched candidate must beat.
"""
from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any, Callable

if TYPE_CHECKING:
    import tvm

VECTOR = 8  # float32 lanes of AVX2 (and two NEON registers)
ACCUMULATORS = 12  # vector registers an output tile may hold (AVX2 has 16)
AVX512_VECTOR = 16  # float32 lanes of a zmm register
AVX512_ACCUMULATORS = 24  # of AVX-512's 32 registers (the rest hold the broadcast input and the loaded weights)
L2_BYTES = 1024 * 1024  # per core (Skylake-SP, Zen 4: 1 MB; Sapphire/Emerald Rapids: 2 MB)
L1_BYTES = 32 * 1024  # data cache per core (32-48 KB)
MIN_TILE_ROWS = 2  # a one-row tile reloads the weights for every output row: the plain vectorized loop is faster


def is_gpu(tvm_target: tvm.target.Target) -> bool:
    return tvm_target.kind.name in ("cuda", "rocm", "vulkan", "metal", "opencl")


def schedule(mod: tvm.IRModule, tvm_target: tvm.target.Target) -> tvm.IRModule:
    """Default schedules for PrimFuncs that have none (functions a tuning database scheduled are kept).

    GPU: dlight's default GPU rules. CPU: :func:`cpu_rule` (untuned Relax code is naive single-threaded loop
    nests; dlight's CPU GEMV/Reduction rules measured slower still). On CPUs the PrimFuncs first learn which
    parameters the caller binds to constants (``AttachAttrLayoutFreeBuffers``): the rule packs such a weight
    into a blocked layout inside the function, and ``SplitLayoutRewritePreproc`` + ``FoldConstant`` then move
    that packing out of it and run it once, at build time, and ``DeadCodeElimination`` drops the packing
    functions, so the built module holds the packed weight only. Where those passes fail on a function they do
    not expect (scatter's), the rule runs without them: the same schedules, weights used as they are stored.
    """
    import tvm
    from tvm import relax
    from tvm.s_tir import dlight as dl
    if is_gpu(tvm_target):
        with tvm_target:
            return dl.ApplyDefaultSchedule(*_default_rules(tvm_target))(mod)
    with tvm_target:
        try:
            return tvm.transform.Sequential([relax.transform.AttachAttrLayoutFreeBuffers(),
                                             dl.ApplyDefaultSchedule(*_default_rules(tvm_target)),
                                             relax.transform.SplitLayoutRewritePreproc(),
                                             relax.transform.FoldConstant(),
                                             relax.transform.DeadCodeElimination()])(mod)
        except Exception:  # seen: SplitLayoutRewritePreproc on scatter's PrimFunc ("There should be a compute block
            # if there is only one subtree under the root"): the same rule without packing weights at build time
            return dl.ApplyDefaultSchedule(*_default_rules(tvm_target))(mod)


def default_schedule(func: tvm.tirx.PrimFunc, tvm_target: tvm.target.Target) -> Any:
    """The traced schedule :func:`schedule` gives one PrimFunc, or None when no rule fits it.

    Tuning measures it and stores it beside the searched candidates, so a tuned kernel is never one
    measured slower than this default."""
    for rule in _default_rules(tvm_target):
        with tvm_target:
            sch = rule.apply(func, tvm_target, False)
        if sch is not None:
            return sch[0] if isinstance(sch, list) else sch
    return None


def _default_rules(tvm_target: tvm.target.Target) -> tuple[Any, ...]:
    from tvm.s_tir import dlight as dl
    if is_gpu(tvm_target):
        return dl.gpu.Matmul(), dl.gpu.GEMV(), dl.gpu.Reduction(), dl.gpu.GeneralReduction(), dl.gpu.Fallback()
    return (cpu_rule(*cpu_registers(tvm_target)),)


def cpu_registers(tvm_target: tvm.target.Target) -> tuple[int, int]:
    """(float32 lanes per vector, vector registers an output tile may hold) for a CPU target: AVX-512's 16
    lanes and 32 registers where LLVM says the target has ``avx512f``, else AVX2's 8 and 16 (NEON: two
    registers per vector). Measured on an Emerald Rapids core (1 thread), MiniLM's 128×384×384 linear took
    0.57–0.62 ms with the AVX2 tile and 0.27–0.28 ms with the AVX-512 one (eager 0.26–0.35 ms)."""
    from tvm.target import codegen
    if tvm_target.kind.name == "llvm" and codegen.target_has_features("avx512f", tvm_target):
        return AVX512_VECTOR, AVX512_ACCUMULATORS
    return VECTOR, ACCUMULATORS


def cpu_rule(vector: int = VECTOR, accumulators: int = ACCUMULATORS) -> Any:
    """A dlight rule for CPUs: inline elementwise blocks into their consumers; in each remaining block move the
    innermost spatial loop inside the reduction loops when an input is contiguous along it (conv in NHWC/HWIO:
    the output channel; matmul: the output column), vectorize it by ``vector`` lanes where it divides, tile
    reductions over at most ``accumulators`` vector registers (a matmul with a constant weight also packed and
    cache-blocked: :func:`_block_matmul`), compute elementwise consumers of a tile as it is written back, and
    run the fused outer spatial loops in parallel."""
    from tvm import s_tir, tirx
    from tvm.s_tir import dlight as dl
    from tvm.s_tir.dlight.analysis import normalize_prim_func
    from tvm.tirx.analysis import undefined_vars

    class CpuDefault(dl.ScheduleRule):
        def apply(self, func: Any, target: Any, _: bool) -> Any:
            if not isinstance(func, tirx.PrimFunc):
                return None
            for pack in (True, False):  # a weight whose packing a primitive refuses is used as it is
                sch = s_tir.Schedule(func)
                infos = normalize_prim_func(sch)
                if infos is None:
                    return None
                remaining = []
                for info in infos:  # padding stays a block of its own: inlined, it puts a branch in the inner loop
                    if info.is_reduction() or info.is_data_pad(sch) or not _try(sch.compute_inline, info.block_rv):
                        remaining.append(info)
                inlined: set[str] = set()
                try:
                    for info in remaining:
                        if info.name not in inlined:
                            inlined.update(_schedule_block(sch, info, undefined_vars, vector, accumulators, pack))
                except Exception:  # a primitive refused this function's shape: unscheduled (correct, slow)
                    continue
                return sch
            return None

    return CpuDefault()


def _schedule_block(sch: Any, info: Any, undefined_vars: Callable, vector: int, accumulators: int,
                    pack: bool) -> list[str]:
    from tvm import tirx
    block, loops, kinds = info.block_rv, sch.get_loops(info.block_rv), info.dom_kind()
    if len(loops) != len(kinds) or "O" in kinds or "S" not in kinds:
        return []
    spatial = [loop for loop, k in zip(loops, kinds) if k == "S"]
    reduce = [loop for loop, k in zip(loops, kinds) if k == "R"]
    var = [it.var for it, k in zip(info.iters, kinds) if k == "S"][-1]
    rvars = [it.var for it, k in zip(info.iters, kinds) if k == "R"]
    reads = [region.region for region in sch.get(block).reads if len(region.region)]

    def uses(exprs: list, names: list) -> bool:
        return any(n.same_as(v) for e in exprs for v in undefined_vars(e) for n in names)

    # inputs streamed along the output's last axis (a per-row value such as softmax's max is not)
    along = [i for i, region in enumerate(sch.get(block).reads) if len(region.region)
             and uses([region.region[-1].min], [var]) and (not rvars or uses([r.min for r in region.region], rvars))]
    contiguous = bool(along)
    extents = [sch.get(loop).extent for loop in [*spatial[-2:], *reduce]]
    lanes = _lanes(extents[1] if len(spatial) >= 2 else extents[0], vector)
    if reduce and contiguous and len(spatial) >= 2 and all(isinstance(e, tirx.IntImm) for e in extents) \
            and lanes and _tile(extents[0].value, extents[1].value, lanes, accumulators)[0] >= MIN_TILE_ROWS:
        return _register_tile(sch, block, spatial, reduce, [e.value for e in extents], lanes, accumulators,
                              along[0] if pack else None)
    if reduce and not contiguous and len(reduce) == 1 and any(uses([r[-1].min], rvars) for r in reads) \
            and (lanes := _lanes(sch.get(reduce[0]).extent, vector)):
        _lane_reduction(sch, block, len(spatial), reduce[0], lanes)
        return []
    outer, inner = (spatial, None) if reduce and not contiguous else (spatial[:-1], spatial[-1])
    if reduce and inner is not None:
        sch.reorder(*outer, *reduce, inner)
    if outer:
        sch.parallel(sch.fuse(*outer) if len(outer) > 1 else outer[0])
    if inner is not None and (lanes := _lanes(sch.get(inner).extent, vector)):
        sch.vectorize(sch.split(inner, [None, lanes])[1])
    if reduce:
        sch.decompose_reduction(block, reduce[0])
    return []


def _lane_reduction(sch: Any, block: Any, spatial: int, k: Any, lanes: int) -> None:
    """A reduction along its input's contiguous last axis (layer norm's sums, softmax's max and sum of exps):
    ``lanes`` partial results per output row (``rfactor``), accumulated as one vector across the row, then summed
    once; rows in parallel. As a scalar loop each row was one dependent chain of K adds that LLVM may not
    reorder (float addition is not associative), so it ran at one add per add latency and never vectorized."""
    partial = sch.rfactor(sch.split(k, [None, lanes])[1], factor_axis=spatial)
    *outer, ko, ki = sch.get_loops(partial)  # the original loops now run the final sum over the lanes
    rows = sch.fuse(*outer) if len(outer) > 1 else outer[0]
    sch.parallel(rows)
    sch.vectorize(ki)
    sch.decompose_reduction(partial, ko)
    sch.reverse_compute_at(block, rows)
    sch.decompose_reduction(block, sch.get_loops(block)[-1])


def _lanes(extent: Any, vector: int) -> int | None:
    """The vector width for a loop of ``extent``: ``vector`` lanes, or AVX2's 8 where 16 do not divide it (24
    channels); None for an extent neither divides or that is not a constant."""
    from tvm import tirx
    if not isinstance(extent, tirx.IntImm):
        return None
    return next((lanes for lanes in dict.fromkeys((vector, VECTOR)) if extent.value % lanes == 0), None)


def _register_tile(sch: Any, block: Any, spatial: list, reduce: list, extents: list[int], vector: int,
                   accumulators: int, weight: int | None) -> list[str]:
    """A reduction whose two innermost output loops are (x, f), f contiguous in input ``weight`` (NHWC/HWIO conv:
    pixel and output channel; matmul: row and column): accumulate an x_t × f_t tile in registers (a local
    cache, unrolled, f vectorized) across the reduction, and compute elementwise consumers (bias) as the tile
    is written back. A matmul whose input ``weight`` (None: never pack) is a constant is blocked
    (:func:`_block_matmul`); otherwise, when the weights outgrow the L2 cache, each f_t slice of them is
    streamed once over every pixel instead of once per pixel. Returns the names of the consumer blocks computed
    in the write-back."""
    x_ext, f_ext, reduction = extents[0], extents[1], math.prod(extents[2:])
    x_t, f_t = _tile(x_ext, f_ext, vector, accumulators)
    xo, xi = sch.split(spatial[-2], [None, x_t])
    fo, fi = sch.split(spatial[-1], [None, f_t])
    if weight is not None and len(reduce) == 1 and _constant(sch, block, weight):
        depth = _block_matmul(sch, block, spatial[:-2], (xo, xi, x_t), (fo, fi, f_t), reduce[0], x_ext,
                              reduction, weight)
    else:
        if reduction * f_ext * 4 > L2_BYTES:
            sch.reorder(fo, *spatial[:-2], xo, *reduce, xi, fi)
            sch.parallel(sch.fuse(fo, *spatial[:-2], xo))
        else:
            sch.reorder(*spatial[:-2], xo, fo, *reduce, xi, fi)
            sch.parallel(sch.fuse(*spatial[:-2], xo))
        depth = len(sch.get_loops(block)) - len(reduce) - 2
    write = sch.cache_write(block, 0, "local")
    sch.reverse_compute_at(write, sch.get_loops(block)[depth - 1])
    fv_o, fv = sch.split(fi, [None, vector])
    sch.unroll(xi)
    sch.unroll(fv_o)
    sch.vectorize(fv)
    sch.decompose_reduction(block, sch.get_loops(block)[depth])
    consumers = sch.get_consumers(write)
    names = [sch.get(c).name_hint for c in consumers]
    inlined = [name for name, c in zip(names, consumers) if _try(sch.reverse_compute_inline, c)]
    sch.vectorize(sch.split(sch.get_loops(write)[-1], [None, vector])[1])
    return inlined


def _block_matmul(sch: Any, block: Any, batch: list, x: tuple, f: tuple, k: Any, x_ext: int,
                  reduction: int, weight: int) -> int:
    """GotoBLAS-style blocking of a matmul whose weight is a constant: the weight is packed at build time into
    panels [..., N / f_t, K, f_t] (each tile then streams one contiguous panel instead of f_t-wide pieces of
    rows a whole matrix row apart, which fall into a few L1 sets), rows are blocked so that one row block's
    inputs stay in L2 while every weight panel streams past them, and K is blocked so that a panel's K block
    stays in L1 while every row tile of the block uses it. The outer loop over (row block, column panel) runs
    in parallel. Returns the depth of the loop the accumulators are written back under."""
    (xo, xi, x_t), (fo, fi, f_t) = x, f
    rows = x_t * _divisor(x_ext // x_t, max(1, L2_BYTES // (reduction * 4 * x_t)))
    xoo, xoi = sch.split(xo, [None, rows // x_t])
    ko, ki = sch.split(k, [None, _divisor(reduction, L1_BYTES // (f_t * 4))])
    sch.reorder(*batch, xoo, fo, ko, xoi, ki, xi, fi)
    sch.parallel(sch.fuse(*batch, xoo, fo))
    packed = sch.cache_read(block, weight, "global")
    sch.transform_layout(packed, ("write", 0), lambda *i: (*i[:-2], i[-1] // f_t, i[-2], i[-1] % f_t))
    sch.annotate(packed, "meta_schedule.layout_rewrite_preproc", True)
    return len(sch.get_loops(block)) - 5


def _constant(sch: Any, block: Any, read: int) -> bool:
    """Whether read ``read`` of ``block`` is a parameter the Relax caller binds to a constant (listed in the
    PrimFunc's ``layout_free_buffers``): its layout may then change once, at build time."""
    func = sch.mod["main"]
    free = func.attrs.get("layout_free_buffers", []) if func.attrs else []
    source = sch.get(block).reads[read].source
    return any(func.params[int(i)].same_as(source) for i in free)


def _tile(x_ext: int, f_ext: int, vector: int, accumulators: int) -> tuple[int, int]:
    """The register tile (rows, columns) for an (x, f) output: f_t of three vectors (where 8 rows still fit:
    AVX-512), two or one, and the most rows dividing x_ext that fit the accumulators; the one holding the most
    outputs, the widest on a tie. Measured on MiniLM's 512-row linears (1 thread, loaded machine): 8 × 48 was
    4–7 % faster than 8 × 32 alone and 5 % in the whole model."""
    widths = [f for f in (3 * vector, 2 * vector, vector) if f < 3 * vector or accumulators * vector // f >= 8]
    tiles = [(_divisor(x_ext, accumulators * vector // f) * f, f) for f in widths if f_ext % f == 0]
    f_t = max(tiles)[1]
    return _divisor(x_ext, accumulators * vector // f_t), f_t


def _divisor(n: int, limit: int) -> int:
    """The largest divisor of ``n`` that is at most ``limit``."""
    return max(d for d in range(1, max(limit, 1) + 1) if n % d == 0)


def _try(primitive: Callable, *args: Any) -> bool:
    try:
        primitive(*args)
    except Exception:  # a schedule primitive refuses by raising: the block stays as it is
        return False
    return True
