"""Flatten a state object into tensors plus a type-tagged JSON tree, and back.

Every non-JSON-native value becomes a one-key object ``{"$tag": payload}``; plain
dicts are tagged too (``$dict``, as a list of ``[key, value]`` pairs), so any JSON
object in the tree is a tag and no user string can be mistaken for one. The
encoding is exact: ints stay ints (also as dict keys), tuples stay tuples, floats
keep nan/inf, bytes and numpy scalars keep every bit.
"""

from __future__ import annotations

import base64
import math
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from .errors import CorruptCheckpointError, UnsupportedTypeError

# Strings used in manifests for torch dtypes; also the dtype vocabulary of the format.
_DTYPES: dict[str, torch.dtype] = {
    name: getattr(torch, name)
    for name in (
        "float64", "float32", "float16", "bfloat16", "float8_e4m3fn", "float8_e5m2",
        "int64", "int32", "int16", "int8", "uint8", "uint16", "uint32", "uint64",
        "bool", "complex64", "complex128",
    )
    if isinstance(getattr(torch, name, None), torch.dtype)
}
_DTYPE_NAMES = {dt: name for name, dt in _DTYPES.items()}


def dtype_name(dtype: torch.dtype, path: str | None = None) -> str:
    """The format's name of a torch dtype (``torch.float32`` -> ``"float32"``); the
    error for one it has none for names the key ``path`` where one is given."""
    try:
        return _DTYPE_NAMES[dtype]
    except KeyError:
        where = "" if path is None else f" at {path or '<root>'!r}"
        raise UnsupportedTypeError(f"dtype {dtype}{where} cannot be stored") from None


def dtype_from_name(name: str) -> torch.dtype:
    """Inverse of :func:`dtype_name`; an unknown name is a corrupt manifest."""
    try:
        return _DTYPES[name]
    except (KeyError, TypeError):
        raise CorruptCheckpointError(f"unknown dtype {name!r} in manifest") from None


@dataclass
class Flat:
    """A flattened state: the JSON tree and the tensors it refers to by index."""

    tree: Any
    tensors: list[torch.Tensor] = field(default_factory=list)
    paths: list[str] = field(default_factory=list)


def key_path(parent: str, key: Any) -> str:
    """The key path of ``key`` under ``parent`` (``"model"`` + ``"fc.weight"`` ->
    ``"model/fc.weight"``), as recorded in manifest references."""
    return f"{parent}/{key}" if parent else str(key)


# Containers nested deeper than this are refused at save time: each level costs the
# JSON tree three levels and the loader stack frames, and a state that saves must load.
MAX_DEPTH = 100


class _Flattener:
    def __init__(self) -> None:
        self.flat = Flat(tree=None)
        self.depth = 0

    def tensor(self, t: torch.Tensor, path: str, tag: str) -> dict:
        self.flat.tensors.append(t)
        self.flat.paths.append(path)
        return {tag: len(self.flat.tensors) - 1}

    def key(self, k: Any, path: str) -> Any:
        if isinstance(k, (str, int, float, bool, type(None), tuple)):
            return self.value(k, path)
        raise UnsupportedTypeError(f"dict key {k!r} of type {type(k).__name__} at {path!r}")

    def value(self, v: Any, path: str) -> Any:  # noqa: C901 - one branch per type is clearest
        if v is None or isinstance(v, (bool, str)):
            return v
        if isinstance(v, np.generic):  # before float: np.float64 subclasses float
            return {"$npscalar": [v.dtype.str, _b64(v.tobytes())]}
        if isinstance(v, int):
            # Beyond 64 bits JSON parsers disagree (many turn them into floats): tag them.
            return int(v) if -(2**63) <= v < 2**63 else {"$int": str(int(v))}
        if isinstance(v, float):
            return v if math.isfinite(v) else {"$float": repr(v)}
        if isinstance(v, torch.Tensor):
            return self.tensor(resolve_lazy(v.detach()), path, "$tensor")
        if isinstance(v, np.ndarray):
            return self.tensor(_ndarray_to_tensor(v, path), path, "$ndarray")
        if isinstance(v, torch.Size):
            return {"$size": list(v)}
        if isinstance(v, (dict, tuple, list)):
            return self.container(v, path)
        if isinstance(v, (bytes, bytearray)):
            return {"$bytes": _b64(bytes(v))}
        if isinstance(v, torch.dtype):
            return {"$dtype": dtype_name(v, path)}
        if isinstance(v, torch.device):
            return {"$device": str(v)}
        raise UnsupportedTypeError(
            f"cannot checkpoint value of type {type(v).__qualname__} at {path or '<root>'!r}"
            " (fastckpt stores tensors and plain data only, never pickle)"
        )


    def container(self, v: dict | tuple | list, path: str) -> Any:
        if self.depth == MAX_DEPTH:
            raise UnsupportedTypeError(
                f"containers nested more than {MAX_DEPTH} deep at {path or '<root>'!r}")
        self.depth += 1
        try:
            if isinstance(v, dict):
                tag = "$odict" if isinstance(v, OrderedDict) else "$dict"
                return {tag: [[self.key(k, path), self.value(x, key_path(path, k))]
                              for k, x in v.items()]}
            items = [self.value(x, key_path(path, i)) for i, x in enumerate(v)]
            return {"$tuple": items} if isinstance(v, tuple) else items
        finally:
            self.depth -= 1


def resolve_lazy(t: torch.Tensor) -> torch.Tensor:
    """``t`` with a lazy conjugate or negation applied: such a view shares its
    storage with a tensor whose bytes differ from its own values."""
    if t.is_conj() or t.is_neg():
        return t.resolve_conj().resolve_neg()
    return t


def _ndarray_to_tensor(a: np.ndarray, path: str) -> torch.Tensor:
    if a.dtype.hasobject or a.dtype.byteorder == ">":
        raise UnsupportedTypeError(f"numpy array of dtype {a.dtype} at {path!r}")
    try:
        # ascontiguousarray would turn a 0-d array into a 1-d one.
        return torch.from_numpy(a if a.flags.c_contiguous else np.ascontiguousarray(a))
    except TypeError as e:
        raise UnsupportedTypeError(f"numpy array of dtype {a.dtype} at {path!r}") from e


def _b64(b: bytes) -> str:
    return base64.b64encode(b).decode("ascii")


def flatten(obj: Any) -> Flat:
    """Split ``obj`` into a JSON-able tree and its tensors (in order of appearance).

    Raises :class:`UnsupportedTypeError` (a ``TypeError``) naming the key path of the
    first value that cannot be stored without pickle.
    """
    f = _Flattener()
    f.flat.tree = f.value(obj, "")
    return f.flat


def unflatten(tree: Any, tensor: Callable[[int, str], Any]) -> Any:
    """Rebuild the object; ``tensor(index, tag)`` supplies the tensor for each reference."""
    try:
        return _unflatten(tree, tensor)
    except RecursionError:
        # Reported here, once the stack has unwound, not at the depth where it struck.
        raise CorruptCheckpointError("tree nested too deeply") from None


def _unflatten(tree: Any, tensor: Callable[[int, str], Any]) -> Any:
    if isinstance(tree, list):
        return [_unflatten(x, tensor) for x in tree]
    if not isinstance(tree, dict):
        return tree
    if len(tree) != 1:
        raise CorruptCheckpointError(f"malformed tree node with keys {sorted(tree)[:5]}")
    (tag, payload), = tree.items()
    try:
        return _DECODERS[tag](payload, tensor)
    except KeyError:
        raise CorruptCheckpointError(f"unknown tree tag {tag!r}") from None
    except RecursionError:
        raise
    # RuntimeError: torch.device("bogus"); OverflowError: $size [inf]; IndexError:
    # an empty $npscalar.
    except (TypeError, ValueError, OverflowError, IndexError, RuntimeError) as e:
        raise CorruptCheckpointError(f"malformed {tag} node: {e}") from e


def _pairs(payload: list, tensor: Callable) -> list:
    return [(_hashable(_unflatten(k, tensor)), _unflatten(v, tensor)) for k, v in payload]


def _hashable(k: Any) -> Any:
    if isinstance(k, list):
        raise TypeError("a dict key cannot be a list")
    return k


def _npscalar(payload: list, tensor: Callable) -> np.generic:
    dt, data = payload
    dtype = np.dtype(dt)
    if dtype.hasobject:
        raise ValueError("object scalars are not allowed")
    return np.frombuffer(base64.b64decode(data, validate=True), dtype=dtype)[0]


_DECODERS: dict[str, Callable[[Any, Callable], Any]] = {
    "$dict": lambda p, t: dict(_pairs(p, t)),
    "$odict": lambda p, t: OrderedDict(_pairs(p, t)),
    "$tuple": lambda p, t: tuple(_unflatten(x, t) for x in p),
    "$float": lambda p, t: float(p) if p in ("nan", "inf", "-inf") else _bad_float(p),
    "$int": lambda p, t: int(p) if isinstance(p, str) and len(p) <= 4000 else _bad_int(p),
    "$size": lambda p, t: torch.Size([int(x) for x in p]),
    "$bytes": lambda p, t: base64.b64decode(p, validate=True),
    "$dtype": lambda p, t: dtype_from_name(p),
    "$device": lambda p, t: torch.device(p),
    "$npscalar": _npscalar,
    "$tensor": lambda p, t: t(_index(p), "$tensor"),
    "$ndarray": lambda p, t: t(_index(p), "$ndarray"),
}


def _bad_float(p: Any) -> float:
    raise ValueError(f"non-finite float expected, got {p!r}")


def _bad_int(p: Any) -> int:
    raise ValueError(f"big integer expected as a decimal string, got {p!r:.40}")


def _index(p: Any) -> int:
    if type(p) is not int or p < 0:
        raise ValueError(f"tensor reference {p!r} is not an index")
    return p
