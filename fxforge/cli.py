"""The ``fxforge`` console script (also ``python -m fxforge``): compile, tune, run and bench models.

    fxforge passes
    fxforge targets
    fxforge compile torchvision.models:resnet18 --input-shape 1,3,224,224 --passes fuse --backend onnx --out out/
    fxforge tune torchvision.models:resnet18 --input-shape 1,3,224,224 --target x86 --trials 64 --db tuning-db/
    fxforge rpc tracker --port 9190
    fxforge rpc server --tracker HOST:9190 --key rpi5
    fxforge tune mymodel:Net --input-shape 1,3,224,224 --target arm64 --rpc-tracker HOST:9190 --rpc-key rpi5
    fxforge compile torchvision.models:resnet18 --input-shape 1,3,224,224 --passes fuse --backend tvm \\
        --tuning-db tuning-db/ --out out/    # --passes fuse, as tune ran: the database's records match that graph
    fxforge run out/ --input x.npy
    fxforge bench torchvision.models:resnet18 --input-shape 1,3,224,224

Every failure the user can cause prints one line (``fxforge: error: ...``) and exits with status 2; anything
else prints one line too (exit status 1), with the traceback only when FXFORGE_TRACEBACK=1. A warning is one
line as well (``fxforge: warning: ...``), without Python's file, line number and source line.
"""
from __future__ import annotations

import argparse
import ast
import contextlib
import errno
import importlib
import json
import os
import re
import select
import sys
import warnings
from pathlib import Path
from typing import Any, Callable, NoReturn, Sequence

import fxforge
from fxforge.backends.base import check_replaceable, check_writable
from fxforge.compiler.errors import CalibrationError, FxforgeError, InputError, first_line
from fxforge.compiler.pass_manager import VERIFY_MODES
from fxforge.compiler.quality import reiterable
from fxforge.compiler.verify import ModelRuns

EXIT_USAGE = 2
EXIT_INTERNAL = 1
EXIT_BROKEN_PIPE = 141  # 128 + SIGPIPE: what a shell reports for a writer whose reader left


def main(argv: Sequence[str] | None = None) -> int:
    parser = _parser()
    args = parser.parse_args(_attached_sizes(sys.argv[1:] if argv is None else list(argv)))
    try:
        with warnings.catch_warnings():  # restores the default display when main returns (tests call main)
            warnings.showwarning = _warning_line
            status = args.run(args)
            sys.stdout.flush()  # a closed or full stdout is met here, not in the interpreter's flush at exit
            return status
    except FxforgeError as e:
        return _error_line(str(e))
    except KeyboardInterrupt:
        print("fxforge: interrupted", file=sys.stderr)
        return 130
    except Exception as e:  # a bug of fxforge or of a library under it: one line, the traceback on request
        if isinstance(e, BrokenPipeError) and _stdout_closed():  # `fxforge run ... | head -1`: normal shell use
            _stdout_to_devnull()
            return EXIT_BROKEN_PIPE
        if isinstance(e, OSError) and e.errno in (errno.ENOSPC, errno.EDQUOT):  # the environment, not a bug
            return _error_line(f"cannot write {e.filename or 'the output'}: {e.strerror}")
        if os.environ.get("FXFORGE_TRACEBACK") == "1":
            raise
        print(f"fxforge: internal error: {type(e).__name__}: {first_line(e)} "
              "(set FXFORGE_TRACEBACK=1 for the traceback)", file=sys.stderr)
        return EXIT_INTERNAL


def _attached_sizes(argv: list[str]) -> list[str]:
    """``--input-shape -1,3`` as ``--input-shape=-1,3``: argparse takes a value starting with ``-`` that is no number
    for an option and said "expected one argument", where the value is there and its size is what is wrong (which
    ``_example_inputs`` then says)."""
    out = []
    for i, token in enumerate(argv):
        if i and argv[i - 1] == "--input-shape" and re.fullmatch(r"-\d[\d,\s-]*", token):
            out[-1] = f"--input-shape={token}"
        else:
            out.append(token)
    return out


def _error_line(message: str) -> int:
    """Report a failure the user or the environment caused: ``fxforge: error:`` and its cause on one line."""
    print(f"fxforge: error: {message}", file=sys.stderr)
    return EXIT_USAGE


def _stdout_closed() -> bool:
    """Whether nobody reads stdout any more (a pipe whose reader exited, as ``head -1`` does), which tells the
    broken pipe of stdout from one of a socket or a child process (those are errors)."""
    try:
        poll = select.poll()
        poll.register(sys.stdout.fileno(), select.POLLOUT)
        return any(events & select.POLLERR for _, events in poll.poll(0))
    except (AttributeError, OSError, ValueError):  # no poll (Windows), no file descriptor (a test's capture)
        return False


def _stdout_to_devnull() -> None:
    """Point stdout at the null device, so that the interpreter's flush at exit has nowhere to fail (Python's
    documented handling of SIGPIPE); a stdout without a file descriptor (a test's capture) is left as it is."""
    with contextlib.suppress(AttributeError, OSError, ValueError):
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())


def _warning_line(message: Warning | str, category: type[Warning], filename: str, lineno: int, file: Any = None,
                  line: str | None = None) -> None:
    """``warnings.showwarning`` for the console: the message's first line, after ``fxforge: warning:``."""
    text = first_line(message if isinstance(message, Warning) else category(str(message)))
    print(f"fxforge: warning: {text}", file=sys.stderr)


class _Once(argparse._StoreAction):
    """An option given twice is refused: argparse kept the last, and ``--passes 'low_rank{energy=0.5}' --passes fuse``
    compiled ``fuse`` alone, without a word (``--input-shape`` and ``--input`` repeat, ``append``: not this)."""

    def __call__(self, parser: argparse.ArgumentParser, namespace: argparse.Namespace, values: Any,
                 option_string: str | None = None) -> None:
        given = namespace.__dict__.setdefault("_given", set())  # (a value equal to the default is no evidence)
        if option_string is not None and self.dest in given:
            parser.error(f"{'/'.join(self.option_strings)} given twice: give it once")
        given.add(self.dest)
        super().__call__(parser, namespace, values, option_string)


class _Parser(argparse.ArgumentParser):
    """argparse with one-line errors: its own print the whole usage block first (11 lines for ``compile``); an
    option given twice is an error (:class:`_Once`)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.register("action", None, _Once)
        self.register("action", "store", _Once)

    def error(self, message: str) -> NoReturn:
        self.exit(EXIT_USAGE, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def _parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="fxforge", description="Graph optimization toolchain for PyTorch models.")
    parser.add_argument("--version", action="version", version=f"fxforge {fxforge.__version__}")
    sub = parser.add_subparsers(required=True, metavar="command")

    passes = sub.add_parser("passes", help="list passes and presets; with a name or --verbose, their options")
    passes.add_argument("name", nargs="?", help="a pass or preset to describe")
    passes.add_argument("--verbose", "-v", action="store_true", help="list every pass's options too")
    passes.set_defaults(run=_passes)
    sub.add_parser("targets", help="list hardware targets and backends").set_defaults(run=_targets)

    comp = sub.add_parser("compile", help="compile a model and write the artifact")
    _model_arguments(comp)
    comp.add_argument("--passes", default="", help="comma-separated passes or presets (default: none, as in "
                      "fxforge.compile; e.g. fuse or fuse,int8)")
    comp.add_argument("--backend", default="eager", help="eager, torchscript, onnx or tvm (default: eager)")
    comp.add_argument("--target", default="x86", help="x86, arm64 or cuda (default: x86)")
    comp.add_argument("--calibration", metavar="MODULE:FN",
                      help="a function returning an iterable of input tuples (needed by int8)")
    comp.add_argument("--input-key", metavar="KEY[,KEY]", type=_input_key,
                      help="where each --calibration, --validation and --train batch holds the model's inputs: an "
                           "index or dict key, e.g. 0 for (input, label) pairs, '\"0\"' for a dict key that reads as a "
                           "number, or several in order (input_key of fxforge.compile)")
    comp.add_argument("--train", metavar="MODULE:FN", help="a function returning unlabeled input tuples for passes "
                      "that train (distill)")
    comp.add_argument("--validation", metavar="MODULE:FN", help="a function returning held-out input tuples: the "
                      "report's error columns (cosine, top-1 agreement) come from them")
    comp.add_argument("--verify", default="numerics", choices=VERIFY_MODES,
                      help="check passes and the backend against the model; numerics samples, full runs every "
                           "changed stage (default: numerics)")
    comp.add_argument("--static-batch", action="store_true", help="compile for the example batch size only")
    comp.add_argument("--max-drop", type=float, metavar="X", help="accuracy budget: end within X of the fp32 model "
                      "on --validation (or held-out calibration batches); int8/int8_dynamic/all default to 0.01")
    comp.add_argument("--strict", action="store_true", help="fail instead of changing the quantization (dynamic "
                      "activations, layers kept float) when the budget is missed, and instead of warning when the "
                      "backend falls back from --target (a portable artifact checked on this host is no fallback)")
    comp.add_argument("--backend-option", action="append", default=[], metavar="KEY=VALUE",
                      help="an option of the backend (repeatable), e.g. --backend-option tune={'trials':16}")
    comp.add_argument("--tuning-db", metavar="DIR", help="tvm backend: apply this MetaSchedule database (from "
                      "`fxforge tune`) without tuning")
    comp.add_argument("--latency", action=argparse.BooleanOptionalAction, default=False,
                      help="also time each stage's graph in PyTorch eager and the compiled artifact (slower compile; "
                           "the numeric checks run either way; default: --no-latency, as in fxforge.compile)")
    comp.add_argument("--out", help="directory to write the artifact to")
    comp.set_defaults(run=_compile)

    run = sub.add_parser("run", help="load a saved artifact, run it on .npy inputs, print outputs and timing")
    run.add_argument("artifact", metavar="DIR", help="an artifact directory written by `fxforge compile --out`")
    run.add_argument("--input", action="append", required=True, metavar="FILE.npy",
                     help="one input as a NumPy .npy file (repeat for several inputs)")
    run.add_argument("--save", metavar="FILE.npz", help="also write the outputs to this .npz file")
    run.set_defaults(run=_run)

    bench = sub.add_parser("bench", help="time fxforge pipelines against eager, torch.compile, ONNX Runtime, TVM")
    _model_arguments(bench, required=False)
    bench.add_argument("--systems", help="semicolon-separated system names, '->' or '→' (default: all; see --list)")
    bench.add_argument("--rounds", type=_positive_int, default=5)
    bench.add_argument("--calibration", metavar="MODULE:FN", help="input tuples for the systems whose passes "
                       "read calibration data (int8, int8_dynamic, compress; ORT's quantize_static): without it "
                       "they are skipped")
    bench.add_argument("--tuning-db", metavar="DIR", help="add 'fxforge fuse → tvm (tuned)' compiled against this "
                       "MetaSchedule database (written by `fxforge tune`; nothing is tuned while benchmarking)")
    bench.add_argument("--list", action="store_true", help="list the systems and exit (no model needed)")
    bench.add_argument("--out", type=Path, metavar="DIR", help="also write results.json, results.md, "
                       "latency_vs_error.png and speedup.png here")
    bench.set_defaults(run=_bench)

    tune = sub.add_parser("tune", help="tune the model's TVM kernels with MetaSchedule into a per-target database")
    _model_arguments(tune)
    tune.add_argument("--passes", default="fuse", help="comma-separated passes or presets (default: fuse)")
    tune.add_argument("--target", default="x86", help="x86, arm64 or cuda (kernels run here, or on the RPC devices)")
    tune.add_argument("--trials", type=int, default=64,
                      help="total trial budget of this run (default: 64; 0: apply the database, tune nothing)")
    tune.add_argument("--trials-per-task", type=int, help="trials per task (default: the budget shared by measured time)")
    tune.add_argument("--db", help="database directory (default: per target under ~/.cache/fxforge/tuning)")
    tune.add_argument("--rpc-tracker", metavar="HOST:PORT", help="measure on the devices registered with this TVM "
                      "RPC tracker (kernels are built here); needs --rpc-key")
    tune.add_argument("--rpc-key", metavar="KEY", help="the device key the RPC servers registered with (e.g. rpi5)")
    tune.set_defaults(run=_tune)

    rpc = sub.add_parser("rpc", help="run a TVM RPC tracker or server for tuning on devices (TVM's own)")
    rpc_sub = rpc.add_subparsers(required=True, metavar="role")
    tracker = rpc_sub.add_parser("tracker", help="python -m tvm.exec.rpc_tracker: devices register, tuners ask")
    tracker.add_argument("--host", default="0.0.0.0", help="address to listen on (default: all)")
    tracker.add_argument("--port", type=int, default=9190, help="port (or the next free one; default 9190)")
    tracker.set_defaults(run=_rpc_tracker)
    server = rpc_sub.add_parser("server", help="python -m tvm.exec.rpc_server: measures kernels on this device")
    server.add_argument("--tracker", required=True, metavar="HOST:PORT", help="the tracker to register with")
    server.add_argument("--key", required=True, help="device key, the same for every device of a kind (e.g. rpi5)")
    server.add_argument("--host", default="0.0.0.0", help="address to listen on (default: all)")
    server.add_argument("--port", type=int, default=9090, help="port (or the next free one; default 9090)")
    server.add_argument("--threads", type=int, help="threads a measured kernel may use (TVM_NUM_THREADS; "
                        "default: TVM's, the physical cores)")
    server.add_argument("--qemu-root", type=Path, metavar="DIR", help="run an emulated AArch64 server with "
                        "qemu-aarch64 from DIR (an arm64 python and TVM; made by tools/arm64-qemu-root.sh)")
    server.set_defaults(run=_rpc_server)
    return parser


def _positive_int(text: str) -> int:
    """An argparse type: an integer ≥ 1 (argparse then reports a bad one as a usage error, exit status 2)."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def _model_arguments(p: argparse.ArgumentParser, required: bool = True) -> None:
    p.add_argument("model", metavar="MODULE:FACTORY", nargs=None if required else "?",
                   help="an nn.Module class or a function returning one, e.g. torchvision.models:resnet18 "
                        "(modules in the current directory are found too)")
    p.add_argument("--model-kwargs", default="{}", metavar="JSON",
                   help='keyword arguments of the factory as JSON, e.g. \'{"num_classes": 10}\'')
    p.add_argument("--input-shape", action="append", required=required, metavar="N,C,H,W",
                   help="shape of one input (repeat for several inputs)")
    p.add_argument("--dtype", default="float32", help="input dtype (float32, int64, ...)")


def _passes(args: argparse.Namespace) -> int:
    from fxforge.compiler.pass_manager import PassError, available_passes, pass_class
    listing = available_passes()
    if args.name and args.name not in listing:
        raise PassError(f"unknown pass or preset {args.name!r}; see `fxforge passes`")
    for name, doc in listing.items():
        if args.name in (None, name):
            print(f"{name:24} {doc}")
            # a pass's options; a preset is listed with its steps, not resolved (a user's preset that contains
            # itself made the whole listing fail)
            if (args.name or args.verbose) and (cls := pass_class(name)) is not None:
                print("".join(f"    {line}\n" for line in _option_lines(cls)), end="")
    return 0


def _option_lines(cls: type) -> list[str]:
    """``name: type = default`` for each option of a pass class (its dataclass fields)."""
    import dataclasses
    import typing
    if not dataclasses.is_dataclass(cls) or not dataclasses.fields(cls):
        return ["(no options)"]
    hints = typing.get_type_hints(cls)
    lines = []
    for f in dataclasses.fields(cls):
        kind = hints.get(f.name, f.type)
        kind = kind.__name__ if isinstance(kind, type) else str(kind).replace("typing.", "")
        default = f.default if f.default is not dataclasses.MISSING else (
            f.default_factory() if f.default_factory is not dataclasses.MISSING else "required")
        lines.append(f"{f.name}: {kind} = {default!r}")
    return lines


def _targets(args: argparse.Namespace) -> int:
    from fxforge.backends.base import available_backends
    from fxforge.compiler.target import available_targets, get_target
    for name in available_targets():
        print(f"{name:10} {get_target(name).description}")
    print(f"\nbackends: {', '.join(available_backends())}")
    return 0


def _compile(args: argparse.Namespace) -> int:
    from fxforge.compiler.pass_manager import split_passes
    options = _backend_options(args.backend_option)
    if args.tuning_db:
        if args.backend != "tvm":
            raise InputError(f"--tuning-db applies to the tvm backend, not {args.backend!r}")
        if not isinstance(options.get("tune", {}), dict):
            raise InputError(f"--backend-option tune= must be a dict like {{'trials_per_task': 4}}, got "
                             f"{options['tune']!r}")
        options["tune"] = {**options.get("tune", {}), "trials": 0, "db": args.tuning_db}
    if args.out is not None:
        _check_out(args.out)
    model = _build_model(args.model, args.model_kwargs)
    example = _example_inputs(args.input_shape, args.dtype)
    calibration = _calibration(args.calibration) if args.calibration else None
    validation = _calibration(args.validation, "validation") if args.validation else None
    train = _calibration(args.train, "train") if args.train else None
    cm = fxforge.compile(model, example, passes=split_passes(args.passes), backend=args.backend,
                         target=args.target, calibration=calibration, input_key=args.input_key,
                         validation=validation, train=train, verify=args.verify,
                         measure_latency=args.latency, static_batch=args.static_batch, max_drop=args.max_drop,
                         strict=args.strict, **options)
    print(cm.report)
    if args.out is not None:
        print(f"artifact: {cm.save(args.out)}")
    return 0


def _check_out(text: str) -> None:
    """Refuse an ``--out`` the artifact cannot be written to before compiling, not after: empty (an unset shell
    variable; it wrote nothing), unreachable (a symbolic link loop), a user's file or directory, or under a file or
    in a file system that makes no directories (/proc)."""
    if not text:
        raise InputError("--out is empty: name the directory to write the artifact to")
    check_replaceable(Path(text))
    check_writable(Path(text), "--out")


def _check_save(save: Path) -> None:
    """Refuse a ``run --save`` file that exists and is no earlier run's outputs (an .npz of arrays named arr_0,
    arr_1, ... alone): a user's data.npz was replaced without a word."""
    import numpy as np
    if not save.exists():
        return
    try:
        with np.load(save, allow_pickle=False) as earlier:
            ours = all(name.startswith("arr_") and name[4:].isdigit() for name in earlier.files)
    except (OSError, ValueError, EOFError):
        ours = False
    if not ours:
        raise InputError(f"--save {save} exists and holds no earlier `fxforge run` outputs; refusing to overwrite: "
                         "choose another file")


def _run(args: argparse.Namespace) -> int:
    import numpy as np
    import torch

    from fxforge.compiler.timing import measure_latency
    save = None
    if args.save:  # numpy adds the suffix itself: say the file it writes, and check where before running anything
        save = Path(args.save if args.save.endswith(".npz") else f"{args.save}.npz")
        check_writable(save, "--save", directory=False)  # numpy makes no folders
        _check_save(save)
    artifact = fxforge.load(args.artifact)
    inputs = []
    for file in args.input:
        try:
            array = np.load(file, allow_pickle=False)
            # torch takes native byte order only: a valid big-endian .npy was refused
            inputs.append(torch.from_numpy(array.astype(array.dtype.newbyteorder("="), copy=False)))
        except (OSError, ValueError, TypeError, EOFError) as e:  # TypeError: a dtype torch has not; EOFError: empty
            raise InputError(f"cannot read input {file}: {first_line(e)}") from None
    args = artifact.signature.arguments(inputs)  # the files fill the model's arguments, dicts and tuples included
    flat = artifact.signature.flatten(args)
    # what the model returns (numbers, strings and the batch size too), numbered as the Python API's outputs flatten:
    # the graph's own outputs left those out and renumbered the rest; not nested again, which needs the output classes
    outputs = [o if o is None or isinstance(o, str) else torch.as_tensor(o)
               for o in artifact.signature.leaves(artifact.run_checked(flat))]
    for i, out in enumerate(outputs):
        if out is None or isinstance(out, str):
            print(f"output {i}: {out!r}")
            continue
        values = ", ".join(f"{v:.6g}" for v in out.flatten()[:6].tolist())
        print(f"output {i}: {str(out.dtype).removeprefix('torch.')} {list(out.shape)}  [{values}"
              f"{', …' if out.numel() > 6 else ''}]")
    if artifact.target.runs_on_host:
        print(f"latency: {measure_latency(lambda *x: artifact.run(x), flat):.3f} ms (median, {artifact.backend})")
    if save:
        try:
            np.savez(save, **{f"arr_{i}": np.asarray(o) if isinstance(o, str) else
                              (o.float() if o.dtype == torch.bfloat16 else o).numpy()
                              for i, o in enumerate(outputs) if o is not None})  # a None output has no array
        except OSError as e:
            raise InputError(f"cannot write --save {save}: {e.strerror or e}") from None
        print(f"outputs: {save}")
    return 0


def _backend_options(pairs: list[str]) -> dict[str, Any]:
    """``key=value`` strings as a dict; values are Python literals where they parse, strings otherwise."""
    options: dict[str, Any] = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key.strip():
            raise InputError(f"--backend-option takes KEY=VALUE, got {pair!r}")
        if key.strip() in options:  # the last one was kept, silently
            raise InputError(f"--backend-option {key.strip()} given twice: give it once")
        try:
            options[key.strip()] = ast.literal_eval(value)
        except (ValueError, SyntaxError):
            options[key.strip()] = value
    return options


def _input_key(text: str) -> int | str | tuple[int | str, ...]:
    """``--input-key``: integers are indices, anything else a dict key, and a key in quotes a dict key as written
    (``'"0"'``: the key "0", which read as an integer would be index 0); a comma gives several keys in order."""
    keys: list[int | str] = []
    for key in (k.strip() for k in text.split(",")):
        if not key:
            raise argparse.ArgumentTypeError(f"{text!r} holds an empty key")
        quoted = len(key) > 1 and key[0] == key[-1] and key[0] in "'\""
        if quoted and len(key) == 2:
            raise argparse.ArgumentTypeError(f"{text!r} holds an empty key")
        keys.append(key[1:-1] if quoted else int(key) if key.lstrip("-").isdigit() else key)
    return tuple(keys) if len(keys) > 1 else keys[0]


def _calibration(spec: str, what: str = "calibration") -> list[Any]:
    """The batches ``MODULE:FN`` returns. What went wrong is said as it is: NAME is no function, the function
    raised (its own message), or it returned something that holds no batches (None: a forgotten ``return``)."""
    fn = _call(spec)
    if not callable(fn):
        raise CalibrationError(f"{what} {spec} is a {type(fn).__name__}, not a function: MODULE:FN names a function "
                               "returning the batches")
    try:
        batches = fn()
    except Exception as e:
        raise CalibrationError(f"{what} function {spec} raised {type(e).__name__}: {first_line(e)}") from None
    try:
        iterator = iter(batches)
    except TypeError:
        shown = "None" if batches is None else f"a {type(batches).__name__}"
        raise CalibrationError(f"{what} function {spec} returned {shown}, not an iterable of input tuples") from None
    try:  # a generator runs its body here; an endless one stops at compile's limit (quality.READ_LIMIT), not at
        return reiterable(iterator, what)  # the machine's memory
    except FxforgeError:
        raise
    except Exception as e:
        raise CalibrationError(f"{what} function {spec} raised {type(e).__name__}: {first_line(e)}") from None


def _bench(args: argparse.Namespace) -> int:
    from fxforge.bench import (PEERS, as_dicts, bench_model, caption, fxforge_systems, markdown,
                               needing_calibration, plot, run_facts)
    systems = PEERS + fxforge_systems(tuning_db=Path(args.tuning_db) if args.tuning_db else None)
    if args.list:
        print("\n".join(s.name for s in systems))
        return 0
    if not args.model or not args.input_shape:
        raise InputError("fxforge bench needs MODULE:FACTORY and --input-shape (or --list to see the systems)")
    if args.out:  # found before any timing, not after
        _check_bench_out(args.out)
    if args.systems:
        wanted = [w.strip().replace("->", "→") for w in args.systems.split(";")]
        unknown = [w for w in wanted if w not in {s.name for s in systems}]
        if unknown:
            raise InputError(f"unknown system(s) {unknown}; see `fxforge bench --list`")
        systems = [s for s in systems if s.name in wanted]
    readers = needing_calibration(systems)  # asked of each pipeline's passes, not guessed from the names
    calibrated = list(readers)
    if calibrated and not args.calibration:  # never calibrate on made-up data
        if args.systems:
            raise InputError(f"system(s) {calibrated} need calibration data: give --calibration MODULE:FN")
        print(f"note: skipping {len(calibrated)} system(s) that read calibration data, without --calibration: "
              + "; ".join(f"{name} ({', '.join(why)})" for name, why in readers.items()), file=sys.stderr)
        systems = [s for s in systems if s.name not in calibrated]
    model = _build_model(args.model, args.model_kwargs)
    example = _example_inputs(args.input_shape, args.dtype)
    try:  # before any system is built: each would record the same failure as its row
        ModelRuns(model).run(example)
    except Exception as e:
        raise InputError(f"the model does not run on the example inputs (--input-shape "
                         f"{' '.join(args.input_shape)}, --dtype {args.dtype}): {first_line(e)}") from None
    calibration = _calibration(args.calibration) if args.calibration else []
    rows = bench_model(args.model, model, example, calibration, systems, rounds=args.rounds)
    table = markdown(rows)
    print(table)
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
        facts = run_facts()
        (args.out / "results.md").write_text(f"# {args.model} on {caption(facts)}\n\n{table}\n")
        (args.out / "results.json").write_text(json.dumps({**facts, "rows": as_dicts(rows)}, indent=2))
        plot(rows, args.out, caption(facts))
        print(f"wrote {args.out}/results.md, results.json, latency_vs_error.png, speedup.png")
    return 0


BENCH_FILES = ("results.md", "results.json", "latency_vs_error.png", "speedup.png")


def _check_bench_out(out: Path) -> None:
    """Refuse a ``bench --out`` where it would replace a user's files: one of :data:`BENCH_FILES` there, unless the
    directory holds an earlier bench's results (its results.json: the run's facts and rows). The user's
    results.md and results.json were overwritten without a word, where ``compile --out`` refuses."""
    check_writable(out, "--out")
    taken = [name for name in BENCH_FILES if (out / name).exists()]
    if taken and not _earlier_bench(out / "results.json"):
        raise InputError(f"--out {out} holds {', '.join(taken)}, not written by fxforge bench; refusing to "
                         "overwrite: choose another directory")


def _earlier_bench(results: Path) -> bool:
    try:
        written = json.loads(results.read_text())
    except (OSError, ValueError):
        return False
    return isinstance(written, dict) and isinstance(written.get("rows"), list) and "machine" in written


def _tune(args: argparse.Namespace) -> int:
    from fxforge.compiler.pass_manager import split_passes
    if bool(args.rpc_tracker) != bool(args.rpc_key):
        raise InputError("--rpc-tracker and --rpc-key go together: the tracker and the key its devices registered "
                         "with")
    tune = {"trials": args.trials,  # trials_per_task=0 was dropped, where tune_options refuses it
            **({"trials_per_task": args.trials_per_task} if args.trials_per_task is not None else {}),
            **({"db": args.db} if args.db else {}),
            **({"rpc": {"tracker": args.rpc_tracker, "key": args.rpc_key}} if args.rpc_key else {})}
    from fxforge.backends.tvm.tuning import tune_options
    tune_options(tune)  # a bad option or address before the model is built
    model = _build_model(args.model, args.model_kwargs)
    example = _example_inputs(args.input_shape, args.dtype)
    cm = fxforge.compile(model, example, passes=split_passes(args.passes), backend="tvm",
                         target=args.target, tune=tune)
    print(tuning_summary(cm.report.meta["tuning"]))
    return 0


def _rpc_tracker(args: argparse.Namespace) -> int:
    from fxforge.backends.tvm.rpc import exec_tvm, tracker_argv
    exec_tvm(tracker_argv(args.host, args.port))
    return 0  # not reached: the process is TVM's tracker now


def _rpc_server(args: argparse.Namespace) -> int:
    from fxforge.backends.tvm.rpc import exec_tvm, qemu_server_argv, server_argv
    if args.threads is not None and args.threads < 1:
        raise InputError(f"--threads must be at least 1, got {args.threads}")
    if args.qemu_root:
        argv, env = qemu_server_argv(args.tracker, args.key, args.host, args.port, args.qemu_root)
    else:
        argv, env = server_argv(args.tracker, args.key, args.host, args.port), {}
    exec_tvm(argv, threads=args.threads, env=env)
    return 0  # not reached: the process is TVM's RPC server now


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
    if stats.get("below_min_gain"):
        lines.append(f"kept the default schedule where the best searched kernel was less than {stats['min_gain']}x "
                     f"faster alone: {', '.join(stats['below_min_gain'])}")
    if stats.get("rpc"):
        lines.append(f"measured on {stats['rpc']['servers']} RPC server(s) under key {stats['rpc']['key']!r} at "
                     f"{stats['rpc']['tracker']}")
    return "\n".join(lines)


def _call(spec: str) -> Callable[..., Any]:
    """Import ``package.module:attribute``. The module is the user's: whatever its import raises (a syntax error, its
    own exception, ``sys.exit``) is their error, one line naming the module, not a failure of fxforge."""
    module_name, _, attr = spec.partition(":")
    if not module_name or not attr:
        raise InputError(f"expected MODULE:NAME, got {spec!r}")
    if module_name.startswith(".") or "/" in module_name or os.sep in module_name:
        raise InputError(f"cannot import {module_name!r}: MODULE is a module name as `import` takes it, not a path "
                         "(e.g. mymodel:Net for ./mymodel.py)")
    if os.getcwd() not in sys.path:  # `fxforge compile mymodel:Net` finds mymodel.py here, as `python -m` would
        sys.path.insert(0, os.getcwd())
    try:
        module = importlib.import_module(module_name)
    except SystemExit as e:  # a script's argparse or sys.exit at import: fxforge would exit with its status, silently
        raise InputError(f"cannot import {module_name!r}: it called sys.exit({e.code!r}) on import") from None
    except Exception as e:
        raise InputError(f"cannot import {module_name!r}: {type(e).__name__}: {first_line(e)}") from None
    try:
        return getattr(module, attr)
    except AttributeError:
        raise InputError(f"module {module_name!r} has no attribute {attr!r}") from None


def _build_model(spec: str, kwargs_json: str = "{}") -> Any:
    import torch
    try:
        kwargs = json.loads(kwargs_json)
    except json.JSONDecodeError as e:
        raise InputError(f"--model-kwargs is not valid JSON: {e}") from None
    if not isinstance(kwargs, dict):
        raise InputError(f"--model-kwargs must be a JSON object, got {kwargs_json!r}")
    obj = _call(spec)
    if isinstance(obj, torch.nn.Module) and kwargs:
        raise InputError(f"{spec} is a module instance; --model-kwargs needs a class or factory")
    try:
        model = obj if isinstance(obj, torch.nn.Module) else obj(**kwargs)
    except Exception as e:
        raise InputError(f"{spec}() failed: {type(e).__name__}: {first_line(e)}") from None
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
    bad = [s for s, d in zip(shapes, dims) if any(n <= 0 for n in d)]
    if bad:
        dynamic = " (-1 is no size: give the example's batch; compile keeps it dynamic unless --static-batch)" \
            if any(-1 in d for d in dims) else ""
        raise InputError(f"--input-shape takes positive sizes, got {bad[0]}{dynamic}")

    def example(shape: tuple[int, ...]) -> Any:
        if kind.is_floating_point:
            return torch.randn(shape, generator=g, dtype=kind)
        return torch.randint(0, 2, shape, generator=g, dtype=kind)

    g = torch.Generator().manual_seed(0)  # the same example every run: int8's first activation ranges come from it
    try:
        with warnings.catch_warnings():  # torch's deprecation of quantized dtypes, before it refuses them
            warnings.simplefilter("ignore")
            example((1,))
    except (RuntimeError, NotImplementedError):  # complex, quantized, float8: torch draws no random values of them
        raise InputError(f"--dtype {dtype}: fxforge makes example inputs of float, integer and bool dtypes only "
                         "(float32, float16, bfloat16, int64, ...)") from None
    g.manual_seed(0)
    try:
        return tuple(example(d) for d in dims)
    except (RuntimeError, MemoryError) as e:
        raise InputError(f"cannot allocate inputs of shape {shapes}: {first_line(e)}") from None


if __name__ == "__main__":
    sys.exit(main())
