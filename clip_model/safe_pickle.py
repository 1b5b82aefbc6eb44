"""Reading pickles someone else made without running them: a restricted unpickler that resolves only the
names it is told to (everything else is an error naming the global), used for OpenAI's TorchScript
releases (tensors read from the archive's `data.pkl` + `data/`, no TorchScript executed) and for the
metadata of torch.distributed.checkpoint folders (which torch itself reads with plain `pickle.load`)."""

from __future__ import annotations

import builtins
import importlib
import io
import pathlib
import pickle
import re
import warnings
import zipfile
from collections import OrderedDict
from collections.abc import Callable, Mapping

import torch


class UnsafePickleError(ValueError):
    """The pickle refers to a global outside the allow-list: loading it could run code."""


class ScriptObject:
    """Stands in for a TorchScript class (`__torch__.…`) while unpickling: keeps the state it is given and
    runs nothing (a TorchScript `__setstate__` would run code in `torch.jit.load`)."""

    def __init__(self, *args):
        self.args, self.state = args, None

    def __setstate__(self, state):
        self.state = state


class RestrictedUnpickler(pickle.Unpickler):
    """`pickle.Unpickler` whose globals come only from `allowed` ((module, name) -> object) or, with
    `script_objects`, from TorchScript's `__torch__` namespace as inert `ScriptObject`s."""

    def __init__(self, data: bytes, allowed: Mapping[tuple[str, str], object], script_objects: bool = False,
                 persistent_load: Callable | None = None):  # fmt: skip
        super().__init__(io.BytesIO(data))
        self.allowed, self.script_objects = allowed, script_objects
        self._persistent = persistent_load

    def find_class(self, module: str, name: str):
        if (module, name) in self.allowed:
            return self.allowed[(module, name)]
        if self.script_objects and module.startswith("__torch__"):
            return type(name, (ScriptObject,), {})
        raise UnsafePickleError(f"refers to {module}.{name}, which is not a tensor or plain data")

    def persistent_load(self, pid):
        if self._persistent is None:
            raise UnsafePickleError("refers to external storage")
        return self._persistent(pid)


def _tensor_globals() -> dict[tuple[str, str], object]:
    allowed: dict[tuple[str, str], object] = {
        ("torch._utils", "_rebuild_tensor_v2"): torch._utils._rebuild_tensor_v2,
        ("torch._utils", "_rebuild_parameter"): torch._utils._rebuild_parameter,
        ("collections", "OrderedDict"): OrderedDict,
    }
    for name in dir(torch):  # the legacy typed storages (torch.FloatStorage, torch.HalfStorage, ...)
        if name.endswith("Storage") and isinstance(getattr(torch, name), type):
            allowed[("torch", name)] = getattr(torch, name)
    return allowed


def _storage_reader(archive: zipfile.ZipFile, prefix: str) -> Callable:
    def load(pid):
        kind, storage_type, key, _location, _numel = pid
        if kind != "storage":
            raise UnsafePickleError(f"unknown persistent id {kind!r}")
        data = bytearray(archive.read(f"{prefix}data/{key}"))
        untyped = (
            torch.frombuffer(data, dtype=torch.uint8).untyped_storage() if data else torch.UntypedStorage(0)
        )
        with warnings.catch_warnings():  # the legacy storage classes warn on every use; torch.load does this
            warnings.simplefilter("ignore", UserWarning)
            return torch.storage.TypedStorage(wrap_storage=untyped, dtype=storage_type.dtype, _internal=True)

    return load


def _flatten(obj, prefix: str, out: dict[str, torch.Tensor]) -> None:
    """The tensors of a tree of ScriptObjects, named by their attribute path (as `state_dict()` names)."""
    state = obj.state if isinstance(obj, ScriptObject) else obj
    if not isinstance(state, Mapping):
        return
    for key, value in state.items():
        if isinstance(value, torch.Tensor):
            out[prefix + str(key)] = value
        elif isinstance(value, ScriptObject):
            _flatten(value, f"{prefix}{key}.", out)


def torchscript_tensors(source) -> dict[str, torch.Tensor]:
    """The named tensors (parameters and buffers) of a TorchScript archive, read from its `data.pkl` and
    `data/` files without executing any of its code."""
    with zipfile.ZipFile(source) as archive:
        (pkl,) = [n for n in archive.namelist() if n.count("/") == 1 and n.endswith("/data.pkl")] or [None]
        if pkl is None:
            raise UnsafePickleError("has no data.pkl (not a TorchScript archive)")
        prefix = pkl[: -len("data.pkl")]
        unpickler = RestrictedUnpickler(archive.read(pkl), _tensor_globals(), script_objects=True,
                                        persistent_load=_storage_reader(archive, prefix))  # fmt: skip
        root = unpickler.load()
    out: dict[str, torch.Tensor] = {}
    _flatten(root, "", out)
    return out


def load_restricted(data: bytes, allowed_modules: tuple[str, ...]) -> object:
    """Unpickle `data` allowing only the classes defined in `allowed_modules` (exact module names), dtypes,
    sizes, layouts and builtins' plain containers; anything else is an `UnsafePickleError`."""

    class _Unpickler(RestrictedUnpickler):
        def find_class(self, module: str, name: str):
            if module in allowed_modules:  # only the classes the module defines (data classes, enums)
                obj = getattr(importlib.import_module(module), name, None)
                if isinstance(obj, type) and obj.__module__ == module:
                    return obj
            return super().find_class(module, name)

    plain = {("builtins", n): getattr(builtins, n) for n in ("set", "frozenset", "slice", "complex")}
    dtypes = {
        ("torch", n): getattr(torch, n) for n in dir(torch) if isinstance(getattr(torch, n), torch.dtype)
    }
    layout = {("torch.serialization", "_get_layout"): torch.serialization._get_layout}  # name -> torch.layout
    paths = {
        ("pathlib", n): getattr(pathlib, n) for n in ("Path", "PosixPath", "PurePosixPath", "WindowsPath")
    }
    allowed = {**plain, **dtypes, **layout, **paths, **_tensor_globals(), ("torch", "Size"): torch.Size}
    return _Unpickler(data, allowed).load()


def refusal_reason(error: BaseException) -> str:
    """What a refused `torch.load(weights_only=True)` refused, in a few words on one line (torch's own
    message is a page of advice whose first line is that the file "can still be loaded")."""
    text = re.sub(r"\x1b\[[0-9;]*m", "", str(error))
    if found := re.search(r"Unsupported global: GLOBAL (\S+)", text):
        return f"it names the Python callable {found.group(1)}"
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    return lines[-1] if lines else type(error).__name__
