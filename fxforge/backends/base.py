"""The Backend protocol, its registry, and Artifact: a compiled model that runs, saves and loads.

A backend lowers an optimized fx.GraphModule (flat tensors in, a tuple of tensors out) for a Target into an
Artifact. Artifacts take the user's call arguments, check them against the Signature, run, and rebuild the
output structure. ``save`` writes ``fxforge.json`` with the format version and a SHA-256 of every file, replaces
only an earlier artifact (never a directory holding anything else), and swaps atomically; ``load`` checks the
version and the hashes before handing the files to the backend.
"""
from __future__ import annotations

import contextlib
import ctypes
import errno
import hashlib
import json
import os
import shutil
import sys
import tempfile
import time
import warnings
from abc import ABC, abstractmethod
from pathlib import Path
from typing import Any, Callable, ClassVar, Iterator, Mapping, Sequence

import torch
import torch.fx as fx

from fxforge.compiler.dynamic_quant import DYNAMIC_LINEAR
from fxforge.compiler.errors import ArtifactError, BackendError, FxforgeError, InputError, TargetError, first_line
from fxforge.compiler.ops import INTERPOLATING_RESIZE, QUANTIZE, is_op, q_params
from fxforge.compiler.target import Target, loaded_target
from fxforge.compiler.trace import Signature, call_bound, interval, without_autocast

# Format 2: what a format-1 reader would get wrong (it ignores fields it does not know): outputs that are no tensor
# (Signature.constant_outputs), inputs the model writes into (Signature.written_inputs), a smallest batch
# (Signature.min_batch), numbers computed from the batch size (Signature.scalar_outputs: a format-1 reader returns
# them as 0-d tensors), the zero-divisor counts a TVM library returns after the model's outputs
# (``Artifact.format``). Format 3: the extremes of computed indices an ONNX or TVM artifact returns after the model's
# outputs (``INDEX_GUARDS``). An artifact without any is written as format 1.
FORMAT_VERSION = 3
READABLE_FORMATS = (1, 2, 3)
# info key: (node, low, high, what) for each index the graph computes from its inputs and returns the [min, max] of
# after the model's outputs (``trace.index_guards``), in output order
INDEX_GUARDS = "index_guards"
META_FILE = "fxforge.json"


class Artifact(ABC):
    """A compiled model. Subclasses implement ``run`` (flat tensors → flat outputs), ``write`` and ``read``."""

    backend: ClassVar[str]
    # Whether ``run``'s outputs are new memory that nothing else holds (ONNX Runtime's). Otherwise ``__call__`` copies
    # them: a graph may return one of its constants (a buffer, a folded ``zeros``), an input, or one buffer twice, and
    # a caller editing that result in place would change what later calls return, or its own input.
    owns_outputs: ClassVar[bool] = False
    # The files ``read`` reads, always / where present: ``load`` refuses a manifest that does not list one of them
    # (its hash would go unchecked). A backend names its own; one registered without them is checked as listed.
    files: ClassVar[tuple[str, ...]] = ()
    optional_files: ClassVar[tuple[str, ...]] = ()
    # What the artifact does otherwise than its target asked (a missing execution provider, a fusion that failed),
    # one line each, which compile turns into a FallbackWarning or, under strict, a TargetError. A backend that
    # warned itself made strict a process-wide warnings filter around lowering, which another thread's filters
    # (an export's "ignore") swallowed: strict compiles returned fallbacks.
    fallbacks: tuple[str, ...] = ()
    # Whether it runs wherever its runtime does (PyTorch, ONNX Runtime): the target chose its code paths, not an
    # instruction set, so an artifact for arm64 or cuda runs on this machine too, and compile checks it here
    portable: ClassVar[bool] = False

    def __init__(self, signature: Signature, target: Target, info: dict[str, Any] | None = None) -> None:
        self.signature = signature
        self.target = target
        self.info: dict[str, Any] = dict(info or {})  # backend facts worth reporting (fused kernels, files)
        # the documents saved beside it (name → text: the report), which load keeps so that a save writes them again
        self.documents: dict[str, str] = {}
        self._warned_no_grad = False

    def unrunnable(self) -> str:
        """Why this machine cannot run the artifact ("" where it can): machine code for a target it is not."""
        if self.portable:
            return ""
        lacks = self.target.lacks()
        return f"this machine lacks {', '.join(lacks)}" if lacks else "" if self.target.runs_on_host else \
            "its target does not run on this machine"

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        if kwargs:
            raise InputError(f"a compiled model takes its inputs by position, as it was compiled; got keyword "
                             f"argument(s) {', '.join(sorted(kwargs))}")
        flat = self.signature.flatten(args)
        if not self._warned_no_grad and torch.is_grad_enabled() and any(t.requires_grad for t in flat):
            self._warned_no_grad = True
            warnings.warn(f"an input requires grad, but the {self.backend} artifact computes for inference only: its "
                          "outputs carry no autograd history (backward() through them fails); train the PyTorch "
                          "model itself", UserWarning, stacklevel=2)
        return self.signature.unflatten(self.run_checked(flat))

    def run_checked(self, flat: Sequence[torch.Tensor]) -> list[Any]:
        """The graph's outputs on ``flat`` (inputs the signature has checked), as a call gives them: with autocast
        off, a runtime failure a one-line BackendError, and tensors of their own."""
        try:
            with without_autocast():  # what was compiled and checked, under a caller's autocast too
                outputs = self.run(flat)
        except FxforgeError:
            raise
        except Exception as e:  # values the signature cannot see (a token id past the vocabulary), or a runtime fault
            if first_line(e).startswith("KeyboardInterrupt"):  # TorchScript's Ctrl-C in a Python op it called
                raise KeyboardInterrupt from None
            raise BackendError(f"the {self.backend} artifact failed on inputs that match its signature: "
                               f"{self.describe_failure(e)}") from None
        if not self.owns_outputs:  # outside inference mode: ordinary tensors, as the model returns
            outputs = [o.clone() if isinstance(o, torch.Tensor) else o for o in outputs]
        return list(outputs)

    def format(self) -> int:
        """The artifact format this artifact needs: the oldest whose readers read it right (a backend adds its own
        reasons)."""
        sig = self.signature
        if self.info.get(INDEX_GUARDS):
            return 3
        return 2 if sig.constant_outputs or sig.written_inputs or sig.min_batch > 1 or sig.scalar_outputs else 1

    def checked_indices(self, inputs: Sequence[torch.Tensor], outputs: Sequence[Any]) -> Sequence[Any]:
        """The model's outputs of a run of a graph with :data:`INDEX_GUARDS`, whose extra outputs (the [min, max] of
        each index the model computes from its inputs) are checked here: an ``InputError`` where one is outside what
        eager accepts, as eager raises there (the artifact's Gather wrapped −1 around, or read past a table). Raised
        by ``run``, not ``__call__``: ``fxforge run`` and compile's checks call ``run`` itself."""
        guards = self.info.get(INDEX_GUARDS, ())
        if not guards:
            return outputs
        batch = self.signature.call_batch(inputs)
        for (node, low, high, what), extremes in zip(guards, outputs[-len(guards):]):
            low, high = call_bound(low, high, batch)
            least, most = (int(v) for v in extremes)
            if least < low or most >= high:
                raise InputError(f"node {node!r} reads indices the model computes from its inputs, from {least} to "
                                 f"{most}, but it indexes {what}: each must be in {interval(low, high)} (eager PyTorch "
                                 f"raises there, and the {self.backend} artifact would read other values)")
        return outputs[:-len(guards)]

    def describe_failure(self, e: Exception) -> str:
        """One line saying why ``run`` raised ``e``; a backend whose runtime buries the cause in a longer message
        overrides it."""
        return f"{type(e).__name__}: {first_line(e)}"

    def stored_bytes(self) -> int | None:
        """The bytes of the files ``write`` writes, where the backend knows them without writing a directory (the
        report's backend row states them: an int8 ONNX model stores zero points narrower than the graph, and a TVM
        library holds its kernels and the weights as it computes with them); None where writing is the only way
        to know (the row then states the graph's constant bytes)."""
        return None

    @abstractmethod
    def run(self, inputs: Sequence[torch.Tensor]) -> Sequence[torch.Tensor]:
        """Run on flat, already checked inputs; return the flat outputs."""

    @abstractmethod
    def write(self, directory: Path) -> None:
        """Write the backend's files into ``directory`` (which exists and is empty)."""

    @classmethod
    @abstractmethod
    def read(cls, directory: Path, signature: Signature, target: Target, info: dict[str, Any]) -> Artifact:
        """Rebuild the artifact from files ``write`` produced."""

    def __reduce__(self) -> tuple[Callable[[dict[str, bytes]], Artifact], tuple[dict[str, bytes]]]:
        """Pickled (``multiprocessing``'s spawn and forkserver, ``copy.deepcopy``) as the files ``save`` writes, and
        unpickled by ``load`` with its checks: an ONNX Runtime session, a TorchScript module or a TVM library cannot
        be pickled, and raised their runtime's own errors."""
        with tempfile.TemporaryDirectory(prefix="fxforge-pickle-") as tmp:
            directory = self.save(Path(tmp) / "artifact")
            files = {str(f.relative_to(directory)): f.read_bytes() for f in directory.rglob("*") if f.is_file()}
        return _unpickled, (files,)

    def save(self, directory: str | os.PathLike[str], extra_files: Mapping[str, str] | None = None) -> Path:
        """Write the artifact, plus ``extra_files`` (name → text, e.g. the report) and the ``documents`` it was
        loaded with (a loaded model saved again lost its report), to ``directory``.

        An existing ``directory`` is replaced only when it is wholly an fxforge artifact (its manifest lists every
        file in it); a directory holding anything else is the user's and is never touched (ArtifactError), nor is the
        working directory. The new artifact is written beside it and swapped in (``_swap_in``: one atomic exchange
        where the system has it), and only then the old one deleted, so one of the two stands whole at every moment.
        A ``directory`` that is a symbolic link is saved through: the artifact it points to is replaced, the link stays.
        The manifest holds every file's hash and its own checksum.
        """
        path = path_argument(directory, "save")
        try:
            final = Path(os.path.abspath(path))  # "." and "" name the working directory, which has a name
        except OSError as e:  # a relative path, and the working directory deleted meanwhile
            raise InputError(f"save: cannot save to the relative path {path!r}: the working directory is gone "
                             f"({e.strerror or e}); give an absolute path") from None
        check_replaceable(final)  # through a link as at its target; a link loop refused here
        final = final.resolve() if final.is_symlink() else final
        tmp = None
        try:
            final.parent.mkdir(parents=True, exist_ok=True)
            tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.", dir=final.parent))
            _as_if_made_by_mkdir(tmp)
            self.write(tmp)
            extra_files = {**self.documents, **(extra_files or {})}
            for name, text in extra_files.items():
                if name == META_FILE or (tmp / name).exists():
                    raise ArtifactError(f"extra file {name!r} would overwrite a file of the artifact")
                (tmp / name).write_text(text)
            meta = {"format": self.format(), "fxforge": _version(), "versions": _library_versions(),
                    "backend": self.backend,
                    "target": self.target.to_dict(), "signature": self.signature.to_dict(), "info": self.info,
                    "files": {p.name: _sha256(p) for p in sorted(tmp.iterdir()) if p.is_file()},
                    "optional": sorted(extra_files or ())}  # the report: loading does not need it
            meta = json.loads(json.dumps(meta, default=str))  # as load will read it
            (tmp / META_FILE).write_text(json.dumps({**meta, "checksum": _checksum(meta)}, indent=2))
            _swap_in(tmp, final)
        except OSError as e:  # a full disk, a permission taken away meanwhile
            raise ArtifactError(f"cannot write an artifact to {final}: {e.strerror or e}") from None
        finally:
            if tmp is not None:  # the new artifact if it was not swapped in, else the old one
                shutil.rmtree(tmp, ignore_errors=True)
        return final


def resolved(t: torch.Tensor) -> torch.Tensor:
    """``t`` detached, its values in its memory: a lazily negated or conjugated tensor (``torch._neg_view``, the
    ``.imag`` of a conjugated complex tensor) materialized, any other returned as it is. A runtime handed the memory
    (DLPack, numpy) ignores the bit: TVM computed on −x, ``numpy()`` refused it."""
    return t.detach().resolve_neg().resolve_conj()


def check_replaceable(final: Path) -> None:
    """Refuse a path that is a file, the working directory, or a non-empty directory that is not wholly an fxforge
    artifact, or a symbolic link loop (``save`` checks it, and the CLI before compiling, so that a bad ``--out``
    costs no compile time)."""
    try:
        os.stat(final)
    except OSError as e:  # Path.resolve raised a raw RuntimeError on a loop
        if e.errno == errno.ELOOP:
            raise ArtifactError(f"cannot write an artifact to {final}: it is, or is under, a symbolic link loop "
                                f"({e.strerror})") from None
        if e.errno not in (errno.ENOENT, errno.ENOTDIR):  # not there yet, or under a file: the save says which
            raise ArtifactError(f"cannot write an artifact to {final}: {e.strerror or e}") from None
    if not final.exists():
        return
    if not final.is_dir():
        raise ArtifactError(f"{final} is a file, not a directory; refusing to overwrite it with an artifact")
    with contextlib.suppress(OSError):  # a working directory deleted meanwhile is no other path
        if final.samefile(os.getcwd()):
            raise ArtifactError(f"{final} is the working directory: save into a directory inside it (replacing it "
                                "would leave this process, and a shell there, in a deleted directory)")
    for _ in range(LOAD_ATTEMPTS):  # another process's save swapped a directory in meanwhile: look again
        with _pinned(final) as (where, replaced):
            problem = _not_wholly_an_artifact(final, where)
            if problem is None or not replaced():
                break
    if problem is not None:
        raise ArtifactError(f"{problem}; refusing to overwrite")


def _not_wholly_an_artifact(final: Path, where: Path) -> str | None:
    """Why the directory ``final`` (read through ``where``, one directory whatever is renamed onto ``final``) is not
    empty and not wholly an fxforge artifact, or None. Read by path, a listing and a manifest could come from two
    directories that a concurrent save exchanged in between, and a save was refused for files it had written."""
    present = {p.name for p in where.iterdir()}
    if not present:
        return None
    try:
        listed = set(json.loads((where / META_FILE).read_text())["files"])
    except (OSError, ValueError, KeyError, TypeError):
        return f"{final} exists and is not an fxforge artifact (no readable {META_FILE})"
    foreign = sorted(present - listed - {META_FILE})
    if foreign:
        return (f"{final} holds files that are not part of the artifact there "
                f"({', '.join(foreign[:3])}{', …' if len(foreign) > 3 else ''})")
    return None


def check_writable(path: Path, what: str, directory: bool = True) -> None:
    """Refuse, before any work, a ``path`` written at the end of it: a directory (made with its parents) or a file
    (in a directory that exists), where a file stands in the way or the nearest existing directory cannot be
    written. Found only at the end, the work was done and its result lost to a raw error (autotune's record,
    ``fxforge bench --out``, ``fxforge run --save``)."""
    blocked = next((p for p in ((path,) if directory else ()) + tuple(path.parents) if p.exists() and not p.is_dir()),
                   None)
    if blocked is not None:
        raise InputError(f"{what} {path}: {blocked} is a file, not a directory")
    existing = next(p for p in (path, *path.parents) if p.is_dir() or p == p.parent)
    if not directory and existing != path.parent:
        raise InputError(f"{what} {path}: no directory {path.parent}")
    try:  # a probe, not os.access: root passes that, and a file system such as /proc still refuses
        tempfile.TemporaryDirectory(dir=existing).cleanup()
    except OSError as e:
        raise InputError(f"{what} {path} cannot be written: {existing}: {e.strerror or e}") from None


def _swap_in(new: Path, final: Path) -> None:
    """Put the directory ``new`` at ``final``. An artifact already at ``final`` is exchanged with ``new`` in one
    atomic step where the system can (Linux ``renameat2(RENAME_EXCHANGE)``), so that no interrupt finds ``final``
    missing, and ``new`` then holds the old artifact for the caller to delete. Elsewhere the old one is renamed
    aside, the new one renamed in, and the old one put back if that fails."""
    if not final.exists():
        os.replace(new, final)
        return
    if _exchange(new, final):
        return
    aside = final.with_name(f".{final.name}.old-{os.getpid()}-{time.monotonic_ns()}")
    os.replace(final, aside)
    try:
        os.replace(new, final)
    except BaseException:
        os.replace(aside, final)
        raise
    os.replace(aside, new)


def _exchange(a: Path, b: Path) -> bool:
    """Swap two existing paths atomically (Linux ≥ 3.15, glibc ≥ 2.28); False where the system cannot."""
    renameat2 = getattr(ctypes.CDLL(None, use_errno=True), "renameat2", None) if sys.platform == "linux" else None
    if renameat2 is None:
        return False
    at_cwd, rename_exchange = -100, 2
    if renameat2(at_cwd, os.fsencode(a), at_cwd, os.fsencode(b), rename_exchange) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP):  # a file system without exchange
        return False
    raise OSError(err, os.strerror(err), str(b))


def _as_if_made_by_mkdir(path: Path) -> None:
    """Give a directory from ``mkdtemp`` (private, 0o700) the permissions ``os.mkdir`` gives under the user's
    umask, read off a probe directory made inside it: setting the umask to read it would change it for the whole
    process meanwhile, and a file another thread created then would be world-writable."""
    probe = path / ".mode"
    probe.mkdir()
    mode = probe.stat().st_mode & 0o777
    probe.rmdir()
    os.chmod(path, mode)


def load(directory: str | os.PathLike[str]) -> Artifact:
    """Load a saved artifact, checking its format version and file hashes. Every file is read through one open
    descriptor of the directory: a save into it meanwhile swaps in another directory (``_swap_in``), and read by path,
    a load saw one artifact's model under the other's manifest (129 of 12,100 loads beside a saving process)."""
    path = Path(path_argument(directory, "load"))
    if path.is_file():
        raise ArtifactError(f"{path} is a file; an fxforge artifact is the directory that holds {META_FILE}")
    for attempt in range(LOAD_ATTEMPTS):
        with _pinned(path) as (where, replaced):
            try:
                return _load(path, where)
            except (ArtifactError, OSError) as e:
                # the saver deletes the old directory's files once its new one is in: read from the new one
                if attempt + 1 < LOAD_ATTEMPTS and replaced():
                    continue
                if isinstance(e, ArtifactError):
                    raise
                raise ArtifactError(f"cannot read the artifact in {path}: {e.strerror or e}") from None
    raise AssertionError("unreachable")


def _unpickled(files: dict[str, bytes]) -> Artifact:
    """The artifact whose saved ``files`` (relative path → bytes) ``Artifact.__reduce__`` pickled."""
    with tempfile.TemporaryDirectory(prefix="fxforge-pickle-") as tmp:
        for name, data in files.items():
            (Path(tmp) / name).parent.mkdir(parents=True, exist_ok=True)
            (Path(tmp) / name).write_bytes(data)
        return load(tmp)


def path_argument(directory: Any, function: str) -> str:
    """``directory`` as a ``str`` path, or an InputError naming the argument: ``Path(None)`` and ``Path(b"x")``
    raised raw TypeErrors from pathlib."""
    try:
        path = os.fspath(directory)
    except TypeError:
        path = None
    if not isinstance(path, str):
        raise InputError(f"{function}: the directory must be a str or os.PathLike path, got "
                         f"{type(directory).__name__}")
    return path


LOAD_ATTEMPTS = 3  # loads started anew when a save replaced the directory while it was read


@contextlib.contextmanager
def _pinned(path: Path) -> Iterator[tuple[Path, Callable[[], bool]]]:
    """``path`` as a name of the directory it is now, whatever is renamed onto it later (/proc/self/fd/N of a
    descriptor held open meanwhile, on Linux; elsewhere, or where it cannot be opened, ``path`` itself), and a test
    of whether another directory has been renamed onto ``path`` since."""
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    except OSError:
        yield path, lambda: False
        return
    try:
        pinned, held = Path(f"/proc/self/fd/{fd}"), os.fstat(fd)

        def replaced() -> bool:
            try:
                now = os.stat(path)
            except OSError:
                return False
            return (now.st_dev, now.st_ino) != (held.st_dev, held.st_ino)
        yield (pinned if (pinned / ".").is_dir() else path), replaced
    finally:
        os.close(fd)


def _load(path: Path, where: Path) -> Artifact:
    """:func:`load` of the artifact at ``path`` (named in errors), its files read from ``where``."""
    try:
        meta = json.loads((where / META_FILE).read_text())
    except FileNotFoundError:
        raise ArtifactError(f"{path} is not an fxforge artifact (no {META_FILE})") from None
    except (json.JSONDecodeError, UnicodeDecodeError, RecursionError) as e:
        raise ArtifactError(f"{path / META_FILE} is corrupt: {first_line(e)}") from None
    if not isinstance(meta, dict) or meta.get("format") not in READABLE_FORMATS:
        raise ArtifactError(f"{path} has artifact format {meta.get('format') if isinstance(meta, dict) else '?'}, "
                            f"this fxforge reads formats {', '.join(map(str, READABLE_FORMATS))}")
    missing = [key for key in ("backend", "target", "signature", "files") if key not in meta]
    if missing:
        raise ArtifactError(f"{path / META_FILE} lacks {', '.join(map(repr, missing))}; "
                            "it was not written by fxforge")
    kinds = {"backend": str, "target": dict, "signature": dict, "files": dict, "info": dict, "optional": list}
    wrong = [key for key, kind in kinds.items() if key in meta and not isinstance(meta[key], kind)]
    if wrong or not all(isinstance(k, str) and isinstance(v, str) for k, v in meta["files"].items()):
        field = wrong[0] if wrong else "files"
        raise ArtifactError(f"{path / META_FILE} is corrupt: field {field!r} has the wrong type "
                            f"({type(meta[field]).__name__})")
    try:
        cls = get_backend(meta["backend"]).artifact
    except BackendError as e:
        raise ArtifactError(f"{path} was saved by backend {meta['backend']!r}, which this fxforge lacks: "
                            f"{e}") from None
    if "checksum" not in meta:  # every save writes one: without it, any edit (an emptied "files") loaded
        raise ArtifactError(f"{path / META_FILE} has no checksum: it was edited, or saved by an fxforge older than "
                            "checksums (save the model again)")
    if meta["checksum"] != _checksum({k: v for k, v in meta.items() if k != "checksum"}):
        raise ArtifactError(f"{path / META_FILE} was modified after saving (its checksum does not match)")
    unlisted = [name for name in (*cls.files, *cls.optional_files) if name not in meta["files"] and
                (name in cls.files or (where / name).exists())]
    if unlisted:
        raise ArtifactError(f"{path / META_FILE} does not list {unlisted[0]}, which the {meta['backend']} artifact "
                            "loads: it was not written by fxforge")
    for name, digest in meta["files"].items():
        if name in meta.get("optional", ()) and not (where / name).exists():
            continue  # a document beside the artifact (its report), which running it does not need
        if not (where / name).is_file() or _sha256(where / name) != digest:
            raise ArtifactError(f"{path / name} is missing or was modified after saving (hash mismatch)")
    try:
        target = loaded_target(meta["target"])
        artifact = cls.read(where, Signature.from_dict(meta["signature"]), target, meta.get("info", {}))
        artifact.documents = {name: (where / name).read_text() for name in meta.get("optional", ())
                              if (where / name).is_file()}
        return artifact
    except ArtifactError:
        raise
    except Exception as e:
        raise ArtifactError(f"cannot load the {meta['backend']} artifact in {path}: {type(e).__name__}: {e}") from e


def _checksum(meta: dict[str, Any]) -> str:
    """The manifest's own hash (its other files are hashed in it): an edited signature or info (a constant output,
    an index bound) would otherwise load as if compiled so."""
    return hashlib.sha256(json.dumps(meta, sort_keys=True).encode()).hexdigest()


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _version(package: str = "fxforge") -> str | None:
    from importlib.metadata import PackageNotFoundError, version
    try:
        return version(package)
    except PackageNotFoundError:
        return None if package != "fxforge" else "0+unknown"


def _library_versions() -> dict[str, str]:
    """The versions of the libraries an artifact's files depend on (for reproducing or debugging a load)."""
    found = {name: _version(name) for name in ("torch", "onnx", "onnxruntime", "apache-tvm")}
    return {name: v for name, v in found.items() if v is not None}


class Backend(ABC):
    """Lowers an optimized graph for a target. Registered by ``name`` with :func:`register_backend`."""

    name: ClassVar[str]
    artifact: ClassVar[type[Artifact]]
    cpu_only: ClassVar[bool] = False  # True: a program for PyTorch on a CPU (x86 or arm64), never moved to a GPU
    dynamic_int8: ClassVar[bool] = True  # lowers fxforge::dynamic_linear (the accuracy budget asks before it picks one)
    folded_biases: ClassVar[bool] = False  # lowers int8 graphs only after fold_qdq (biases int32 constants)
    pytorch_kernels: ClassVar[bool] = False  # runs PyTorch's own kernels (their integer resizes included)

    def check_graph(self, gm: fx.GraphModule) -> None:
        """Raise BackendError, naming the pass that helps, for a quantized graph this backend cannot lower, or the op
        it cannot compute as PyTorch does; compile calls it before ``lower``. Without it ONNX's checker refused an
        int32 zero point and TVM's importer "Unsupported output datatype ... 'int32", cut mid-string, naming no
        remedy; TVM had "no converter" for a dynamic linear; a uint8 bilinear resize failed verification unnamed."""
        unfolded = next((n for n in gm.graph.nodes if is_op(n, *QUANTIZE) and q_params(n).dtype == torch.int32),
                        None) if self.folded_biases else None
        if unfolded is not None:
            raise BackendError(f"the {self.name} backend lowers quantized graphs after fold_qdq, which stores biases "
                               f"as int32; node {unfolded.name!r} still quantizes one to int32 at run time: add "
                               "fold_qdq after calibrate (the int8 preset does)")
        dynamic = next(iter(gm.graph.find_nodes(op="call_function", target=DYNAMIC_LINEAR)), None)
        if dynamic is not None and not self.dynamic_int8:
            raise BackendError(f"the {self.name} backend has no dynamic int8 linears (node {dynamic.name!r}, from "
                               "insert_qdq{activations='dynamic'} or int8_dynamic): quantize statically (int8), or "
                               "use the onnx backend")
        resize = next((n for n in gm.graph.nodes if is_op(n, *INTERPOLATING_RESIZE) and isinstance(
            n.meta.get("val"), torch.Tensor) and not n.meta["val"].is_floating_point()), None)
        if resize is not None and not self.pytorch_kernels:  # the artifact differed, unnamed (silently: verify="off")
            raise BackendError(f"node {resize.name!r} resizes a {str(resize.meta['val'].dtype).removeprefix('torch.')} "
                               f"image by interpolation, which PyTorch computes in fixed point and the {self.name} "
                               "backend in float, one level apart on about a quarter of the pixels: convert the image "
                               "to float before resizing (torchvision's v2: ToDtype before Resize), or use the "
                               "torchscript backend")

    def check_target(self, target: Target) -> None:
        """Raise TargetError for a target this backend cannot build for. A CPU-only backend refuses a GPU target,
        which would otherwise get a CPU artifact while the report names the GPU; others serve every target."""
        if self.cpu_only and target.torch_device != "cpu":
            raise TargetError(f"backend {self.name!r} builds CPU programs; target {target.name!r} runs on "
                              f"{target.torch_device} (use backend 'tvm' or 'onnx' for it)")

    def check_options(self, options: Mapping[str, Any]) -> None:
        """Raise BackendError (or TuningError) for options this backend does not take. ``compile`` calls it
        before tracing, so a typo costs no compile time; ``lower`` calls it too. Default: no options."""
        if options:
            raise BackendError(f"the {self.name} backend takes no options, got {', '.join(sorted(options))}")

    @abstractmethod
    def lower(self, gm: fx.GraphModule, example_inputs: Sequence[torch.Tensor], signature: Signature,
              target: Target, **options: Any) -> Artifact:
        """Compile ``gm`` (flat inputs, tuple output) into an Artifact. Never mutates ``gm``."""


_BACKENDS: dict[str, type[Backend]] = {}
_LAZY = {"eager": "fxforge.backends.eager", "torchscript": "fxforge.backends.torchscript",
         "onnx": "fxforge.backends.onnx", "tvm": "fxforge.backends.tvm"}


def register_backend(cls: type[Backend]) -> type[Backend]:
    """Class decorator: make a Backend available by its ``name`` (``fxforge.compile(..., backend=name)``)."""
    _BACKENDS[cls.name] = cls
    return cls


def available_backends() -> list[str]:
    """The names of every backend: those registered and the built-in ones imported on first use (TVM's is slow)."""
    return sorted(set(_BACKENDS) | set(_LAZY))


def get_backend(name: str) -> Backend:
    """The backend called ``name``; its module is imported on first use (TVM's import is slow)."""
    if name not in _BACKENDS and name in _LAZY:
        import importlib
        try:
            importlib.import_module(_LAZY[name])
        except ModuleNotFoundError as e:
            if e.name and e.name.startswith("fxforge"):
                raise BackendError(f"backend {name!r} is not built yet") from None
            raise
    if name not in _BACKENDS:
        raise BackendError(f"unknown backend {name!r}; valid backends: {', '.join(available_backends())}")
    return _BACKENDS[name]()
