"""The ``fxforge`` console script: list passes and targets, compile a model from the command line.

    fxforge passes
    fxforge targets
    fxforge compile torchvision.models:resnet18 --input-shape 1,3,224,224 --passes fuse --backend onnx --out out/
    fxforge bench torchvision.models:resnet18 --input-shape 1,3,224,224
    fxforge tune torchvision.models:resnet18 --input-shape 1,3,224,224 --target x86 --trials 64 --db tuning-db/

Every failure the user can cause prints one line (``fxforge: error: ...``) and exits with status 2.
"""
from __future__ import annotations

import argparse
import importlib
import sys
from pathlib import Path
from typing import Any, Callable, Sequence

from fxforge.compiler.errors import FxforgeError, InputError

EXIT_USAGE = 2


def main(argv: Sequence[str] | None = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    try:
        return args.run(args)
    except FxforgeError as e:
        print(f"fxforge: error: {e}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        print("fxforge: interrupted", file=sys.stderr)
        return 130


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="fxforge", description="Graph optimization toolchain for PyTorch models.")
    sub = parser.add_subparsers(required=True, metavar="command")

    sub.add_parser("passes", help="list passes and presets").set_defaults(run=_passes)
    sub.add_parser("targets", help="list hardware targets and backends").set_defaults(run=_targets)

    comp = sub.add_parser("compile", help="compile a model and write the artifact")
    _model_arguments(comp)
    comp.add_argument("--passes", default="fuse", help="comma-separated passes or presets (default: fuse)")
    comp.add_argument("--backend", default="torchscript", help="eager, torchscript, onnx or tvm")
    comp.add_argument("--target", default="x86", help="x86, arm64 or cuda")
    comp.add_argument("--calibration", metavar="MODULE:FN",
                      help="a function returning an iterable of input tuples (needed by int8)")
    comp.add_argument("--verify", default="numerics", choices=("off", "lint", "numerics"))
    comp.add_argument("--out", help="directory to write the artifact to")
    comp.set_defaults(run=_compile)

    bench = sub.add_parser("bench", help="time fxforge pipelines against eager, torch.compile, ONNX Runtime, TVM")
    _model_arguments(bench)
    bench.add_argument("--systems", help="semicolon-separated system names (default: all; see --list)")
    bench.add_argument("--rounds", type=int, default=5)
    bench.add_argument("--calibration", metavar="MODULE:FN", help="input tuples for the int8 systems")
    bench.add_argument("--tuning-db", metavar="DIR", help="add 'fxforge fuse → tvm (tuned)' compiled against this "
                       "MetaSchedule database (written by `fxforge tune`; nothing is tuned while benchmarking)")
    bench.add_argument("--list", action="store_true", help="list the systems and exit")
    bench.set_defaults(run=_bench)

    tune = sub.add_parser("tune", help="tune the model's TVM kernels with MetaSchedule into a per-target database")
    _model_arguments(tune)
    tune.add_argument("--passes", default="fuse", help="comma-separated passes or presets (default: fuse)")
    tune.add_argument("--target", default="x86", help="x86, arm64 or cuda (tuning runs kernels here)")
    tune.add_argument("--trials", type=int, default=64,
                      help="total trial budget of this run (default: 64; 0: apply the database, tune nothing)")
    tune.add_argument("--trials-per-task", type=int, help="trials per task (default: the budget shared by measured time)")
    tune.add_argument("--db", help="database directory (default: per target under ~/.cache/fxforge/tuning)")
    tune.set_defaults(run=_tune)
    return parser


def _model_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("model", metavar="MODULE:FACTORY",
                   help="an nn.Module class or a function returning one, e.g. torchvision.models:resnet18")
    p.add_argument("--input-shape", action="append", required=True, metavar="N,C,H,W",
                   help="shape of one input (repeat for several inputs)")
    p.add_argument("--dtype", default="float32", help="input dtype (float32, int64, ...)")


def _passes(args: argparse.Namespace) -> int:
    from fxforge.compiler.pass_manager import available_passes
    for name, doc in available_passes().items():
        print(f"{name:24} {doc}")
    return 0


def _targets(args: argparse.Namespace) -> int:
    from fxforge.backends.base import available_backends
    from fxforge.compiler.target import available_targets, get_target
    for name in available_targets():
        print(f"{name:10} {get_target(name).description}")
    print(f"\nbackends: {', '.join(available_backends())}")
    return 0


def _compile(args: argparse.Namespace) -> int:
    import fxforge
    from fxforge.compiler.pass_manager import split_passes
    model = _build_model(args.model)
    example = _example_inputs(args.input_shape, args.dtype)
    calibration = _call(args.calibration)() if args.calibration else None
    cm = fxforge.compile(model, example, passes=split_passes(args.passes), backend=args.backend,
                         target=args.target, calibration=calibration, verify=args.verify)
    print(cm.report)
    if args.out:
        print(f"artifact: {cm.save(args.out)}")
    return 0


def _bench(args: argparse.Namespace) -> int:
    from fxforge.bench import PEERS, bench_model, fxforge_systems, markdown
    systems = PEERS + fxforge_systems(tuning_db=Path(args.tuning_db) if args.tuning_db else None)
    if args.list:
        print("\n".join(s.name for s in systems))
        return 0
    if args.systems:
        wanted = args.systems.split(";")
        unknown = [w for w in wanted if w not in {s.name for s in systems}]
        if unknown:
            raise InputError(f"unknown system(s) {unknown}; see `fxforge bench --list`")
        systems = [s for s in systems if s.name in wanted]
    model = _build_model(args.model)
    example = _example_inputs(args.input_shape, args.dtype)
    calibration = list(_call(args.calibration)()) if args.calibration else []
    if not calibration:
        systems = [s for s in systems if "int8" not in s.name]  # never calibrate on made-up data
    print(markdown(bench_model(args.model, model, example, calibration, systems, rounds=args.rounds)))
    return 0


def _tune(args: argparse.Namespace) -> int:
    import fxforge
    from fxforge.compiler.pass_manager import split_passes
    model = _build_model(args.model)
    example = _example_inputs(args.input_shape, args.dtype)
    tune = {"trials": args.trials, **({"trials_per_task": args.trials_per_task} if args.trials_per_task else {}),
            **({"db": args.db} if args.db else {})}
    cm = fxforge.compile(model, example, passes=split_passes(args.passes), backend="tvm",
                         target=args.target, tune=tune)
    print(tuning_summary(cm.report.meta["tuning"]))
    return 0


def tuning_summary(stats: dict[str, Any]) -> str:
    """The per-task table of a tuning run (default vs best kernel time) and a one-line total."""
    def us(value: float | None) -> str:
        return f"{value:.1f}" if value is not None else "-"

    lines = [f"{'task':44} {'status':8} {'trials':>6} {'default (us)':>12} {'best (us)':>10} {'gain':>6}"]
    for t in stats["per_task"]:
        gain = f"{t['default_us'] / t['best_us']:.2f}x" if t["default_us"] and t["best_us"] else "-"
        lines.append(f"{t['name']:44} {t['status']:8} {t['trials']:>6} {us(t['default_us']):>12} "
                     f"{us(t['best_us']):>10} {gain:>6}")
    lines.append(f"{stats['tasks']} tasks: {stats['tuned_tasks']} tuned now ({stats['searched_tasks']} searched, "
                 f"{stats['trials']} trials), "
                 f"{stats['reused_tasks']} from the database, {stats['untuned_tasks']} untuned; database: {stats['db']}")
    return "\n".join(lines)


def _call(spec: str) -> Callable[..., Any]:
    """Import ``package.module:attribute``."""
    module_name, _, attr = spec.partition(":")
    if not module_name or not attr:
        raise InputError(f"expected MODULE:NAME, got {spec!r}")
    try:
        module = importlib.import_module(module_name)
    except ImportError as e:
        raise InputError(f"cannot import {module_name!r}: {e}") from None
    try:
        return getattr(module, attr)
    except AttributeError:
        raise InputError(f"module {module_name!r} has no attribute {attr!r}") from None


def _build_model(spec: str) -> Any:
    import torch
    obj = _call(spec)
    try:
        model = obj if isinstance(obj, torch.nn.Module) else obj()
    except Exception as e:
        raise InputError(f"{spec}() failed: {type(e).__name__}: {e}") from None
    if not isinstance(model, torch.nn.Module):
        raise InputError(f"{spec} gave a {type(model).__name__}, not a torch.nn.Module")
    return model.eval()


def _example_inputs(shapes: list[str], dtype: str) -> tuple[Any, ...]:
    import torch
    kind = getattr(torch, dtype, None)
    if not isinstance(kind, torch.dtype):
        raise InputError(f"unknown dtype {dtype!r}")
    try:
        dims = [tuple(int(d) for d in s.split(",")) for s in shapes]
    except ValueError:
        raise InputError(f"--input-shape takes comma-separated integers, got {shapes}") from None
    if kind.is_floating_point:
        return tuple(torch.randn(d, dtype=kind) for d in dims)
    return tuple(torch.randint(0, 2, d, dtype=kind) for d in dims)


if __name__ == "__main__":
    sys.exit(main())
