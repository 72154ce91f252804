r"""Run directories that are safe to share, resume and hand around.

A run directory is written by one process at a time and read by anyone; this module holds the
mechanisms that make that safe, independent of what is trained:

* :class:`RunLock` — an exclusive lock on a directory (``fcntl.flock`` on ``DIR/.lock``, which
  holds the writer's pid).  A second writer is refused at once with one line naming the
  argument (``--out``) and the pid; a lock left by a killed process is released by the
  operating system, so it never goes stale.  The lock is re-entrant within a process.
* :func:`atomic_save`, :func:`write_json`, :func:`write_bytes` — write to a temporary file
  ``.NAME.*.tmp`` in the same directory, ``fsync``, then ``os.replace``: a reader sees the old
  file or the new one, never half of one; the temporary file is removed if the write fails,
  and :func:`clean_temp_files` removes those a killed writer left behind.
* :func:`load_checkpoint` — ``torch.load(..., weights_only=True)`` (tensors and plain values
  only: nothing in the file is executed), with every failure (missing, empty, a directory,
  truncated, corrupt, another format renamed, the wrong contents, missing keys, sparse or meta
  tensors, non-finite weights) turned into one :class:`RunFileError` naming the file.
* :func:`fingerprint` / :func:`check_fingerprint` — shape, dtype and SHA-256 of the data a run
  was trained on, stored with the run and checked when it is resumed or evaluated.
* :func:`read_json` / :func:`read_config` — JSON that is malformed, not an object or not a
  valid configuration is one line naming the file.
* :func:`check_out`, :func:`check_run_dir`, :func:`check_device`, :func:`check_seed`,
  :func:`check_sample_count` — command-line values checked before anything is written.

Every error raised here is a :class:`RunError` (a ``ValueError``) whose message is one line
starting with the argument it is about.
"""

from __future__ import annotations

import errno
import hashlib
import json
import math
import os
import tempfile
import threading
import warnings
import zipfile
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any

import torch

try:  # POSIX; elsewhere the lock is an O_EXCL pid file
    import fcntl
except ImportError:  # pragma: no cover - not POSIX
    fcntl = None

__all__ = [
    "RunError",
    "RunLockedError",
    "RunFileError",
    "DataChangedError",
    "RunLock",
    "LOCK",
    "one_line",
    "atomic_save",
    "write_json",
    "write_bytes",
    "clean_temp_files",
    "temp_files",
    "load_checkpoint",
    "load_module_state",
    "check_module_state",
    "read_json",
    "read_config",
    "fingerprint",
    "dataset_fingerprint",
    "check_fingerprint",
    "invalidate_test_metrics",
    "check_out",
    "check_run_dir",
    "check_device",
    "check_seed",
    "check_sample_count",
    "check_finite",
    "check_plain_tensors",
    "torch_load",
    "CHECKPOINT_KEYS",
    "TEST_METRICS_PREFIX",
]

LOCK = ".lock"
TEMP_SUFFIX = ".tmp"
TEST_METRICS_PREFIX = "test_"
_MESSAGE_LIMIT = 300


# ---------------------------------------------------------------------------- errors
class RunError(ValueError):
    """A bad run directory, file or command-line value; the message is one line naming the
    argument or file."""

    def __init__(self, message: str) -> None:
        super().__init__(one_line(message, limit=None))


class RunLockedError(RunError):
    """Another process is writing the run directory."""


class RunFileError(RunError):
    """A file of a run (checkpoint, JSON, data) cannot be read or written as expected."""


class DataChangedError(RunError):
    """The data a run was trained on changed since the run was written."""


def one_line(text: Any, limit: int | None = _MESSAGE_LIMIT) -> str:
    """``text`` on one line (whitespace runs collapsed), cut to ``limit`` characters."""
    text = " ".join(str(text).split())
    if limit is not None and len(text) > limit:
        text = text[: limit - 1] + "…"
    return text


def _reason(error: BaseException) -> str:
    """The first sentence-ish part of an exception's message, for a one-line error."""
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    text = lines[0] if lines else type(error).__name__
    return one_line(text, limit=160)


def _os_reason(error: OSError) -> str:
    return error.strerror or _reason(error)


# ---------------------------------------------------------------------------- the lock
_held: dict[str, list] = {}  # resolved lock path -> [fd, count]
_held_guard = threading.Lock()


def _pid_alive(pid: int) -> bool:
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    except OSError:
        return False
    return True


def _read_pid(path: Path) -> int | None:
    try:
        text = path.read_text().split()
        return int(text[0]) if text else None
    except (OSError, ValueError, IndexError):
        return None


class RunLock:
    """An exclusive, re-entrant (within one process) lock on the run directory ``directory``.

    ``with RunLock(out, argument="--out"):`` creates the directory if needed and holds
    ``out/.lock`` while the block runs (directories it created and that stay empty are removed
    again when it is released).  If another live process holds it, raises
    :class:`RunLockedError` at once: ``--out: runs/x is in use by another pyro-diffusion
    process (pid 123); wait for it to finish or choose another directory``.  A lock whose
    holder died (``kill -9``) is free: ``flock`` locks end with their process.  Temporary
    files a killed writer left are removed once the lock is taken (``clean=True``).
    """

    def __init__(self, directory: str | Path, *, argument: str = "--out", clean: bool = True) -> None:
        self.directory = Path(directory)
        self.argument = argument
        self.clean = clean
        self._key: str | None = None

    @property
    def path(self) -> Path:
        return self.directory / LOCK

    def _refuse(self, pid: int | None) -> RunLockedError:
        holder = f" (pid {pid})" if pid else ""
        return RunLockedError(
            f"{self.argument}: {self.directory} is in use by another pyro-diffusion process{holder}; "
            "wait for it to finish or choose another directory"
        )

    def acquire(self) -> RunLock:
        created = None  # the topmost directory this lock creates: removed again if left empty
        for folder in (self.directory, *self.directory.parents):
            if folder.exists():
                break
            created = folder
        try:
            self.directory.mkdir(parents=True, exist_ok=True)
        except FileExistsError:
            raise RunError(f"{self.argument}: {self.directory} exists and is not a directory") from None
        except OSError as error:
            raise RunFileError(
                f"{self.argument}: cannot create the directory {self.directory}: {_os_reason(error)}"
            ) from None
        if not self.directory.is_dir():
            raise RunError(f"{self.argument}: {self.directory} exists and is not a directory")
        key = str(self.path.resolve())
        with _held_guard:
            if key in _held:
                _held[key][1] += 1
                self._key = key
                return self
            fd = self._take()
            _held[key] = [fd, 1, created]
            self._key = key
        if self.clean:
            clean_temp_files(self.directory)
        return self

    def _take(self) -> int:
        for _ in range(20):  # retried only when the lock file was replaced under us
            try:
                if fcntl is None:  # pragma: no cover - not POSIX
                    return self._take_exclusive()
                fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            except OSError as error:
                raise RunFileError(
                    f"{self.argument}: cannot create the lock file {self.path}: {_os_reason(error)}"
                ) from None
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError as error:
                os.close(fd)
                if error.errno in (errno.EAGAIN, errno.EACCES, errno.EWOULDBLOCK):
                    raise self._refuse(_read_pid(self.path)) from None
                raise RunFileError(f"{self.argument}: cannot lock {self.path}: {_os_reason(error)}") from None
            try:  # the file we locked must still be the one at the path
                same = os.stat(self.path).st_ino == os.fstat(fd).st_ino
            except FileNotFoundError:
                same = False
            if not same:
                os.close(fd)
                continue
            os.ftruncate(fd, 0)
            os.write(fd, f"{os.getpid()}\n".encode())
            return fd
        raise self._refuse(_read_pid(self.path))  # pragma: no cover - pathological churn

    def _take_exclusive(self) -> int:  # pragma: no cover - not POSIX
        for _ in range(2):
            try:
                fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o644)
            except FileExistsError:
                pid = _read_pid(self.path)
                if pid is not None and _pid_alive(pid):
                    raise self._refuse(pid) from None
                self.path.unlink(missing_ok=True)  # stale: its writer is gone
                continue
            os.write(fd, f"{os.getpid()}\n".encode())
            return fd
        raise self._refuse(_read_pid(self.path))

    def release(self) -> None:
        key, self._key = self._key, None
        if key is None:
            return
        with _held_guard:
            entry = _held.get(key)
            if entry is None:
                return
            entry[1] -= 1
            if entry[1] > 0:
                return
            del _held[key]
            fd, created = entry[0], entry[2]
            try:  # unlink while still holding it, so no one locks a file about to vanish
                self.path.unlink(missing_ok=True)
            except OSError:
                pass
            os.close(fd)
            if created is not None:  # a refused or failed first write leaves no empty directories
                folder = self.directory
                while True:
                    try:
                        folder.rmdir()  # only if empty
                    except OSError:
                        break
                    if folder == created or folder.parent == folder:
                        break
                    folder = folder.parent

    @staticmethod
    def held(directory: str | Path) -> bool:
        """Whether this process holds the lock on ``directory``."""
        return str((Path(directory) / LOCK).resolve()) in _held

    def __enter__(self) -> RunLock:
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()


# ---------------------------------------------------------------------------- atomic writes
def _atomic_write(path: str | Path, write: Callable[[Any], None], mode: str, argument: str) -> Path:
    path = Path(path)
    try:
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=TEMP_SUFFIX)
    except OSError as error:
        raise RunFileError(f"{argument}: cannot write {path}: {_os_reason(error)}") from None
    try:
        with os.fdopen(fd, mode) as handle:
            write(handle)
            handle.flush()
            os.fsync(handle.fileno())
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException as error:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        if isinstance(error, OSError):
            raise RunFileError(f"{argument}: cannot write {path}: {_os_reason(error)}") from None
        if isinstance(error, RuntimeError) and "write" in str(error).lower():  # torch's file writer
            raise RunFileError(f"{argument}: cannot write {path}: {_reason(error)}") from None
        raise
    return path


def atomic_save(obj: Any, path: str | Path, *, argument: str = "--out") -> Path:
    """``torch.save(obj)`` to ``path`` atomically (temporary file, ``fsync``, ``os.replace``);
    a failed write (full or read-only disk) leaves the old file and no temporary file, and
    raises :class:`RunFileError` naming ``argument`` and the file."""
    return _atomic_write(path, lambda handle: torch.save(obj, handle), "wb", argument)


def write_json(obj: Any, path: str | Path, *, argument: str = "--out") -> Path:
    """``obj`` as indented JSON (sorted keys) to ``path`` atomically (see :func:`atomic_save`)."""
    text = json.dumps(obj, indent=2, sort_keys=True) + "\n"
    return _atomic_write(path, lambda handle: handle.write(text), "w", argument)


def write_bytes(data: bytes, path: str | Path, *, argument: str = "--out") -> Path:
    """``data`` to ``path`` atomically (see :func:`atomic_save`)."""
    return _atomic_write(path, lambda handle: handle.write(data), "wb", argument)


def temp_files(directory: str | Path) -> list[Path]:
    """The temporary files of interrupted atomic writes in ``directory`` (``.NAME.*.tmp``)."""
    directory = Path(directory)
    if not directory.is_dir():
        return []
    return sorted(p for p in directory.glob(f".*{TEMP_SUFFIX}") if p.is_file())


def clean_temp_files(directory: str | Path) -> list[Path]:
    """Remove the temporary files a killed writer left in ``directory``; returns them.  Call
    it only while holding the directory's :class:`RunLock` (no other writer is then active)."""
    removed = []
    for path in temp_files(directory):
        try:
            path.unlink()
            removed.append(path)
        except OSError:
            pass
    return removed


# ---------------------------------------------------------------------------- reading
def _check_readable_file(path: Path, argument: str) -> int:
    if not path.exists():
        raise RunFileError(f"{argument}: no such file {path}")
    if path.is_dir():
        raise RunFileError(f"{argument}: {path} is a directory, expected a file")
    try:
        size = path.stat().st_size
    except OSError as error:
        raise RunFileError(f"{argument}: cannot read {path}: {_os_reason(error)}") from None
    if size == 0:
        raise RunFileError(f"{argument}: {path} is empty (0 bytes)")
    return size


def _file_kind(path: Path) -> str:
    with open(path, "rb") as handle:
        head = handle.read(8)
    if head.startswith(b"PK"):
        return "zip"
    if head.startswith(b"\x93NUMPY"):
        return "npy"
    if head[:1] == b"\x80":
        return "pickle"
    return "other"


def _tensors(obj: Any, where: str = "") -> Iterable[tuple[str, torch.Tensor]]:
    if isinstance(obj, torch.Tensor):
        yield where, obj
    elif isinstance(obj, Mapping):
        for key, value in obj.items():
            yield from _tensors(value, f"{where}.{key}" if where else str(key))
    elif isinstance(obj, (list, tuple)):
        for i, value in enumerate(obj):
            yield from _tensors(value, f"{where}[{i}]")


def check_plain_tensors(obj: Any, path: str | Path, argument: str, *, finite: bool = False) -> None:
    """Refuse sparse, meta or quantized tensors (and with ``finite`` NaN/inf entries)
    anywhere in ``obj``, naming the entry."""
    for where, tensor in _tensors(obj):
        label = where or "the tensor"
        if tensor.layout != torch.strided:
            raise RunFileError(
                f"{argument}: {path}: {label} is a {tensor.layout} tensor; expected a dense one"
            )
        if tensor.is_meta:
            raise RunFileError(f"{argument}: {path}: {label} is a meta tensor (it holds no values)")
        if tensor.is_quantized:
            raise RunFileError(f"{argument}: {path}: {label} is a quantized tensor; expected a plain one")
        if finite and (tensor.is_floating_point() or tensor.is_complex()):
            if not torch.isfinite(tensor).all():
                raise RunFileError(f"{argument}: {path}: {label} holds NaN or infinite values")


def torch_load(path: str | Path, *, argument: str, what: str = "torch file") -> Any:
    """``torch.load(path, map_location="cpu", weights_only=True)``: only tensors and plain
    Python values are unpickled, nothing in the file runs; any failure is one
    :class:`RunFileError` naming ``argument`` and the file."""
    path = Path(path)
    _check_readable_file(path, argument)
    try:
        kind = _file_kind(path)
    except OSError as error:
        raise RunFileError(f"{argument}: cannot read {path}: {_os_reason(error)}") from None
    if kind == "npy":
        raise RunFileError(f"{argument}: {path} is a NumPy .npy file, expected a {what} (torch.save)")
    if kind == "zip":
        try:
            with zipfile.ZipFile(path) as archive:
                names = archive.namelist()
                damaged = archive.testzip()  # every member's CRC: a flipped byte is not loaded
        except (zipfile.BadZipFile, OSError, ValueError, EOFError) as error:
            raise RunFileError(
                f"{argument}: {path} is truncated or damaged, not a readable zip archive ({_reason(error)})"
            ) from None
        if damaged is not None:
            raise RunFileError(
                f"{argument}: {path} is damaged: the checksum of its entry {damaged!r} does not match"
            )
        if not any(name.endswith("data.pkl") for name in names):
            raise RunFileError(
                f"{argument}: {path} is a zip archive but not a {what} (an .npz or other archive renamed?)"
            )
    elif kind == "other":
        raise RunFileError(f"{argument}: {path} is not a readable {what} (unrecognized contents)")
    try:
        with warnings.catch_warnings():  # e.g. "pickle protocol 4": the refusal below says it all
            warnings.simplefilter("ignore")
            return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # UnpicklingError, RuntimeError, EOFError, ... all mean "not loadable"
        if "weights_only" in str(error) or "Unsupported global" in str(error):
            raise RunFileError(
                f"{argument}: {path} holds objects other than tensors and plain values, which are never "
                f"unpickled; not a readable {what}"
            ) from None
        raise RunFileError(f"{argument}: {path} is not a readable {what} ({_reason(error)})") from None


#: what :func:`load_checkpoint` requires of a training checkpoint, with the expected types
CHECKPOINT_KEYS: dict[str, type | tuple[type, ...]] = {"config": dict, "model": dict, "step": int}


def load_checkpoint(
    path: str | Path,
    *,
    argument: str = "checkpoint",
    required: Mapping[str, type | tuple[type, ...]] | None = None,
) -> dict:
    """A checkpoint loaded on the CPU with ``weights_only=True``, checked.

    Refused with one :class:`RunFileError` naming ``argument`` and ``path``: a missing, empty,
    directory, truncated or corrupt file; a ``.npy``/``.npz``/other zip renamed; a pickle
    with anything but tensors and plain values (it is never executed); contents that are not a
    dict; a missing key of ``required`` (default :data:`CHECKPOINT_KEYS`) or one of the wrong
    type; a ``model`` entry that is not a dict of names to tensors; sparse, meta, quantized or
    non-finite weights."""
    path = Path(path)
    checkpoint = torch_load(path, argument=argument, what="pyro-diffusion checkpoint")
    if not isinstance(checkpoint, dict):
        raise RunFileError(
            f"{argument}: {path} holds a {type(checkpoint).__name__}, expected a pyro-diffusion checkpoint (a dict)"
        )
    required = CHECKPOINT_KEYS if required is None else required
    missing = [key for key in required if key not in checkpoint]
    if missing:
        raise RunFileError(
            f"{argument}: {path} is not a pyro-diffusion checkpoint: missing {', '.join(map(repr, missing))}"
        )
    for key, kind in required.items():
        value = checkpoint[key]
        if isinstance(value, bool) or not isinstance(value, kind):
            names = kind.__name__ if isinstance(kind, type) else " or ".join(k.__name__ for k in kind)
            raise RunFileError(f"{argument}: {path}: {key!r} is a {type(value).__name__}, expected {names}")
    if "step" in checkpoint and isinstance(checkpoint["step"], int) and checkpoint["step"] < 0:
        raise RunFileError(f"{argument}: {path}: 'step' is {checkpoint['step']}, expected >= 0")
    if "model" in checkpoint:
        model = checkpoint["model"]
        bad = [k for k, v in model.items() if not isinstance(k, str) or not isinstance(v, torch.Tensor)]
        if bad:
            raise RunFileError(f"{argument}: {path}: 'model' must map names to tensors; {bad[0]!r} does not")
        check_plain_tensors(model, path, argument, finite=True)
    check_plain_tensors({k: v for k, v in checkpoint.items() if k != "model"}, path, argument)
    return checkpoint


def check_module_state(
    module: torch.nn.Module,
    state: Any,
    *,
    path: str | Path,
    argument: str = "checkpoint",
) -> None:
    """Refuse ``state`` for ``module`` (one :class:`RunFileError` naming the file) unless it is
    a dict of tensors with exactly the module's keys and shapes, all finite."""
    if not isinstance(state, Mapping) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise RunFileError(f"{argument}: {path} holds no weights (a dict of tensors) where weights belong")
    own = module.state_dict()
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    if missing or unexpected:
        parts = []
        if missing:
            parts.append(f"missing {len(missing)} weights (e.g. {missing[0]!r})")
        if unexpected:
            parts.append(f"{len(unexpected)} unexpected (e.g. {unexpected[0]!r})")
        raise RunFileError(f"{argument}: {path} holds weights of another model: {'; '.join(parts)}")
    for name, tensor in own.items():
        if tuple(state[name].shape) != tuple(tensor.shape):
            raise RunFileError(
                f"{argument}: {path} holds weights of another shape: {name!r} is "
                f"{tuple(state[name].shape)}, the model needs {tuple(tensor.shape)}"
            )
    check_plain_tensors(dict(state), path, argument, finite=True)


def load_module_state(
    module: torch.nn.Module,
    state: Any,
    *,
    path: str | Path,
    argument: str = "checkpoint",
) -> None:
    """``module.load_state_dict(state)`` (strict) after :func:`check_module_state`: missing,
    unexpected, differently shaped or non-finite weights are one :class:`RunFileError`
    naming the file, and the module is left as it was."""
    check_module_state(module, state, path=path, argument=argument)
    try:
        module.load_state_dict(state)
    except (RuntimeError, TypeError, ValueError) as error:
        raise RunFileError(
            f"{argument}: {path}: the weights do not fit the model ({_reason(error)})"
        ) from None


def read_json(
    path: str | Path, *, argument: str | None = None, missing_ok: bool = True, default: dict | None = None
) -> dict:
    """The JSON object in ``path`` (``{}``, or ``default``, when it does not exist and
    ``missing_ok``).  Malformed JSON, a non-object, or a file that cannot be read is one
    :class:`RunFileError` naming ``argument`` (default: the file's name) and the file."""
    path = Path(path)
    argument = argument or path.name
    if not path.exists():
        if missing_ok:
            return dict(default or {})
        raise RunFileError(f"{argument}: no such file {path}")
    if path.is_dir():
        raise RunFileError(f"{argument}: {path} is a directory, expected a JSON file")
    try:
        text = path.read_bytes().decode("utf-8")
    except OSError as error:
        raise RunFileError(f"{argument}: cannot read {path}: {_os_reason(error)}") from None
    except UnicodeDecodeError:
        raise RunFileError(f"{argument}: {path} is not UTF-8 text, expected JSON") from None
    try:
        value = json.loads(text)
    except json.JSONDecodeError as error:
        raise RunFileError(
            f"{argument}: {path} is not valid JSON ({error.msg} at line {error.lineno} column {error.colno})"
        ) from None
    except RecursionError:
        raise RunFileError(f"{argument}: {path} is nested too deeply to be a run file") from None
    if not isinstance(value, dict):
        raise RunFileError(f"{argument}: {path} holds a JSON {type(value).__name__}, expected an object")
    return value


def read_config(path: str | Path, factory: Callable[[dict], Any], *, argument: str | None = None) -> Any:
    """``factory(read_json(path))`` (e.g. ``TrainConfig.from_dict``), with a missing or
    malformed file, unknown fields or values of the wrong type reported as one
    :class:`RunFileError` naming the file."""
    path = Path(path)
    argument = argument or path.name
    values = read_json(path, argument=argument, missing_ok=False)
    try:
        return factory(values)
    except (TypeError, ValueError, KeyError, AttributeError, OverflowError) as error:
        raise RunFileError(f"{argument}: {path} is not a valid configuration ({_reason(error)})") from None


# ---------------------------------------------------------------------------- data fingerprints
def fingerprint(tensor: torch.Tensor) -> dict:
    """``{"shape", "dtype", "sha256"}`` of a tensor's values (contiguous CPU bytes)."""
    if not isinstance(tensor, torch.Tensor):
        raise TypeError(f"tensor: expected a torch.Tensor, got {type(tensor).__name__}")
    flat = tensor.detach().cpu().contiguous()
    digest = hashlib.sha256()
    if flat.numel():
        digest.update(flat.reshape(-1).view(torch.uint8).numpy().tobytes())
    return {
        "shape": list(flat.shape),
        "dtype": str(flat.dtype).replace("torch.", ""),
        "sha256": digest.hexdigest(),
    }


def dataset_fingerprint(dataset: Any) -> dict:
    """Fingerprints of a data set's ``train`` and ``test`` tensors."""
    return {"train": fingerprint(dataset.train), "test": fingerprint(dataset.test)}


def _describe(print_: Mapping) -> str:
    shape = "×".join(str(n) for n in print_.get("shape", [])) or "scalar"
    return f"{shape} {print_.get('dtype')} sha256 {str(print_.get('sha256'))[:12]}"


def check_fingerprint(
    saved: Mapping | None, current: Mapping, *, where: str | Path, argument: str = "--data"
) -> None:
    """Raise :class:`DataChangedError` when the data fingerprint ``saved`` with a run (at
    ``where``) differs from ``current`` (or is missing)."""
    if not isinstance(saved, Mapping):
        raise DataChangedError(
            f"{argument}: {where} records no fingerprint of its data (written by an earlier version?); "
            "start a new run"
        )
    for split in ("train", "test"):
        a, b = saved.get(split), current.get(split)
        if a != b:
            a_text = _describe(a) if isinstance(a, Mapping) else "nothing"
            raise DataChangedError(
                f"{argument}: the {split} data changed since the run in {where} was written "
                f"(run: {a_text}; now: {_describe(b)}); restore the data or start a new run"
            )


def invalidate_test_metrics(metrics: dict) -> dict:
    """Drop the test results (``test_*``, ``quality``, ``checkpoint_step``) of an earlier
    evaluation from ``metrics``: they describe weights that a resumed run no longer has."""
    for key in [
        k for k in metrics if k.startswith(TEST_METRICS_PREFIX) or k in ("quality", "checkpoint_step")
    ]:
        del metrics[key]
    return metrics


# ---------------------------------------------------------------------------- command-line values
def check_out(out: Any, *, argument: str = "--out") -> Path:
    """A usable output directory: a non-empty path that is not an existing file."""
    if out is None or not isinstance(out, (str, os.PathLike)):
        raise RunError(f"{argument}: expected a directory path, got {out!r}")
    text = os.fspath(out)
    if isinstance(text, bytes):
        text = os.fsdecode(text)
    if not text.strip():
        raise RunError(f"{argument}: expected a directory path, got an empty string")
    if "\x00" in text:
        raise RunError(f"{argument}: the path contains a NUL character")
    path = Path(text)
    if path.exists() and not path.is_dir():
        raise RunError(f"{argument}: {path} exists and is not a directory")
    return path


def check_run_dir(run: Any, *, argument: str = "--run", needs: Iterable[str] = ()) -> Path:
    """An existing run directory holding the files ``needs``."""
    if run is None or not isinstance(run, (str, os.PathLike)) or not os.fspath(run).strip():
        raise RunError(f"{argument}: expected a run directory, got {run!r}")
    path = Path(run)
    if "\x00" in str(path):
        raise RunError(f"{argument}: the path contains a NUL character")
    if not path.exists():
        raise RunError(f"{argument}: {path} is not a run directory (it does not exist)")
    if not path.is_dir():
        raise RunError(f"{argument}: {path} is not a run directory (it is a file)")
    absent = [name for name in needs if not (path / name).is_file()]
    if absent:
        raise RunError(f"{argument}: {path} is not a run directory (needs {' and '.join(absent)})")
    return path


def check_device(device: Any, *, argument: str = "--device") -> str:
    """A device this machine has, as a string (``cpu``, ``cuda``, ``cuda:1``, ``mps``…).
    Refused with one line: an empty or unparseable name, ``meta`` (no values), a device type
    that is not available here, a CUDA index beyond the devices present."""
    if isinstance(device, torch.device):
        device = str(device)
    if not isinstance(device, str) or not device.strip():
        raise RunError(f"{argument}: expected a device such as 'cpu' or 'cuda', got {device!r}")
    try:
        parsed = torch.device(device.strip())
    except (RuntimeError, ValueError, TypeError):
        raise RunError(
            f"{argument}: expected a device such as 'cpu', 'cuda' or 'cuda:0', got {device!r}"
        ) from None
    kind = parsed.type
    if kind == "cpu":
        return str(parsed)
    if kind == "meta":
        raise RunError(
            f"{argument}: 'meta' tensors hold no values; expected a device such as 'cpu' or 'cuda'"
        )
    if kind == "cuda":
        if not torch.cuda.is_available():
            raise RunError(
                f"{argument}: {device!r} asked for, but no CUDA device is available here; use --device cpu"
            )
        if parsed.index is not None and parsed.index >= torch.cuda.device_count():
            raise RunError(
                f"{argument}: {device!r} asked for, but only {torch.cuda.device_count()} CUDA device(s) are present"
            )
        return str(parsed)
    if kind == "mps":
        backend = getattr(torch.backends, "mps", None)
        if backend is None or not backend.is_available():
            raise RunError(
                f"{argument}: {device!r} asked for, but no MPS device is available here; use --device cpu"
            )
        return str(parsed)
    module = getattr(torch, kind, None)
    available = getattr(module, "is_available", None)
    if callable(available) and available():
        return str(parsed)
    raise RunError(
        f"{argument}: no {kind!r} device is available here; expected 'cpu'"
        + (" or 'cuda'" if torch.cuda.is_available() else "")
    )


SEED_LIMIT = 2**32  # numpy's seeds, which pyro.set_rng_seed also sets


def check_seed(seed: Any, *, argument: str = "--seed") -> int:
    """An integer seed in [0, 2**32) (the range every RNG that is seeded accepts)."""
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise RunError(f"{argument}: expected an integer in [0, 2**32), got {seed!r}")
    if not 0 <= seed < SEED_LIMIT:
        raise RunError(f"{argument}: expected an integer in [0, 2**32), got {seed}")
    return seed


SAMPLE_BYTES_LIMIT = 8 * 2**30


def check_sample_count(
    num: Any, event_size: int, *, argument: str = "--num", bytes_limit: int = SAMPLE_BYTES_LIMIT
) -> int:
    """A positive sample count whose float32 samples fit in ``bytes_limit`` bytes."""
    if isinstance(num, bool) or not isinstance(num, int) or num < 1:
        raise RunError(f"{argument}: expected a positive integer, got {num!r}")
    needed = num * max(1, int(event_size)) * 4
    if needed > bytes_limit:
        most = max(1, bytes_limit // (4 * max(1, int(event_size))))
        raise RunError(
            f"{argument}: {num} samples of {event_size} values need {needed / 2**30:.3g} GiB; "
            f"expected at most {most} at a time"
        )
    return num


def check_finite(value: Any, *, argument: str, low: float | None = None, high: float | None = None) -> float:
    """A finite real number, optionally in ``[low, high]``."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise RunError(f"{argument}: expected a number, got {value!r}")
    value = float(value)
    if not math.isfinite(value):
        raise RunError(f"{argument}: expected a finite number, got {value}")
    if (low is not None and value < low) or (high is not None and value > high):
        raise RunError(f"{argument}: expected a number in [{low}, {high}], got {value:g}")
    return value
