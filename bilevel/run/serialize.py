"""Pickle-free storage of nested state: tensors in safetensors, everything else in JSON.

Loading never executes code: the JSON skeleton names only a closed set of node kinds, and the only classes
it can rebuild are those on an explicit allowlist (:data:`BUILTIN_CLASSES` and :func:`register_class`),
looked up by name in that allowlist; a name from the file is never imported.

Format (version 1). :func:`save_tree` writes two files into a folder:

* ``tensors.safetensors``: every tensor leaf, saved as a contiguous CPU clone under the key ``t<i>``
  (``i`` counts leaves in traversal order). Two leaves that shared memory are saved (and loaded) as two
  independent tensors. numpy arrays are stored here too, as their raw bytes in a flat ``uint8`` tensor;
  their dtype (with byte order) and shape are recorded in the JSON, so every numeric dtype round-trips
  exactly, whatever its size.
* ``state.json``: ``{"format": "bilevel-tree", "version": 1, "tensors": <count>, "root": <node>}``, where a
  node is one of

  - ``null``, ``true``/``false``, a JSON integer, a finite JSON float (Python's ``repr`` round-trips
    exactly) or a JSON string: the Python value itself;
  - ``{"$": "float", "bits": "<16 hex digits>"}``: a NaN or ±Inf float, as its IEEE-754 bit pattern
    (big-endian), which plain JSON cannot hold;
  - ``{"$": "list" | "tuple", "items": [node, ...]}``;
  - ``{"$": "dict", "items": [[key, node], ...], "ordered": bool}``: keys are JSON strings or integers
    (``str`` / ``int`` keys; the JSON type records which), in insertion order; ``ordered`` rebuilds a
    ``collections.OrderedDict``;
  - ``{"$": "tensor", "key": "t<i>", "dtype": "float32", "shape": [...]}``: dtype and shape are checked
    against the safetensors file on load;
  - ``{"$": "ndarray", "key": "t<i>", "dtype": "<u4", "shape": [...]}`` and
    ``{"$": "npscalar", "dtype": "<f8", "hex": "<raw bytes>"}``: numpy arrays / scalars of a numeric or
    bool dtype;
  - ``{"$": "dtype", "name": "float32"}``, ``{"$": "size", "items": [...]}``, ``{"$": "device", "name":
    "cpu"}``: ``torch.dtype``, ``torch.Size``, ``torch.device``;
  - ``{"$": "object", "class": "module.QualName", "fields": {name: node, ...}}``: a NamedTuple or dataclass
    of an allowlisted class, rebuilt as ``cls(**fields)`` (a dataclass stores its ``init`` fields only:
    ``init=False`` fields are caches and are recomputed).

Not stored: a tensor's device (loaded on the CPU), ``requires_grad``, autograd history, tensor subclasses
(an ``nn.Parameter`` comes back as a plain tensor), and memory sharing between leaves. Any other Python
type is refused at save time with a :class:`TypeError` naming where it sits in the tree.
"""
from __future__ import annotations

import collections
import dataclasses
import importlib
import json
import math
import os
import re
import struct
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from ..errors import BilevelError

FORMAT = "bilevel-tree"
VERSION = 1
TENSORS_FILE = "tensors.safetensors"
STATE_FILE = "state.json"

# The classes a tree may hold besides plain containers, by "module.QualName" -> (module, qualname). The module
# strings are ours, never the file's: loading resolves a name only through this table (imports are lazy so
# that this module does not pull in torchopt or the solvers).
BUILTIN_CLASSES: dict[str, tuple[str, str]] = {
    f"{module}.{name}": (module, name) for module, name in [
        ("torchopt.base", "EmptyState"),
        ("torchopt.base", "UninitializedState"),
        ("torchopt.transform.trace", "TraceState"),
        ("torchopt.transform.scale_by_adam", "ScaleByAdamState"),
        ("torchopt.transform.scale_by_rms", "ScaleByRmsState"),
        ("torchopt.transform.scale_by_stddev", "ScaleByRStdDevState"),
        ("torchopt.transform.scale_by_rss", "ScaleByRssState"),
        ("torchopt.transform.scale_by_schedule", "ScaleByScheduleState"),
        ("torchopt.transform.scale_by_adadelta", "ScaleByAdadeltaState"),
        ("torchopt.transform.scale_by_adamax", "ScaleByAdamaxState"),
        ("torchopt.transform.scale_by_radam", "ScaleByRAdamState"),
        ("torchopt.transform.add_decayed_weights", "MaskedState"),
        ("bilevel.solvers.cmaes", "CMAESState"),
    ]
}
_registered: dict[str, type] = {}  # classes added at run time by register_class
_NUMPY_DTYPE = re.compile(r"^[<>|=]?[biufc]\d{1,2}$")  # numeric / bool numpy dtypes only, e.g. "<u4", "|b1"
_TORCH_DTYPE = re.compile(r"^[a-z][a-z0-9_]*$")
_TENSOR_KEY = re.compile(r"^t\d+$")


class TreeFormatError(BilevelError, ValueError):
    """A stored tree is truncated, corrupt, of another format, or names a class that is not allowlisted."""


class UnknownClassError(TreeFormatError):
    """A stored tree names a class outside the allowlist (a crafted or foreign file); nothing was built."""


# ---------------------------------------------------------------------------------------------- allowlist
def class_name(cls: type) -> str:
    """The allowlist key of ``cls``: ``"module.QualName"``."""
    return f"{cls.__module__}.{cls.__qualname__}"


def register_class(cls: type) -> type:
    """Allow instances of the NamedTuple or dataclass ``cls`` in stored trees (usable as a decorator).

    Loading a tree that holds such an instance needs the same registration in the loading process.
    """
    if not (_is_namedtuple_class(cls) or (isinstance(cls, type) and dataclasses.is_dataclass(cls))):
        raise TypeError(f"register_class({cls!r}): only NamedTuple and dataclass types can be stored")
    _registered[class_name(cls)] = cls
    return cls


def allowed_class(name: str) -> type:
    """The allowlisted class called ``name``; an :class:`UnknownClassError` (nothing imported) otherwise."""
    if name in _registered:
        return _registered[name]
    if name not in BUILTIN_CLASSES:
        raise UnknownClassError(f"class {name!r} is not on the allowlist of storable classes; refusing to build "
                                "it (a stored tree may only name the classes in bilevel.run.serialize."
                                "BUILTIN_CLASSES or ones added with register_class)")
    module, qualname = BUILTIN_CLASSES[name]
    try:
        cls: Any = importlib.import_module(module)  # a module named in our table, never one from a file
        for part in qualname.split("."):
            cls = getattr(cls, part)
    except (ImportError, AttributeError) as err:
        raise TreeFormatError(f"allowlisted class {name!r} is not available here ({err}); install the package "
                              "that provides it") from err
    return cls


def _is_namedtuple_class(cls: Any) -> bool:
    return isinstance(cls, type) and issubclass(cls, tuple) and hasattr(cls, "_fields")


def _stored_fields(cls: type) -> list[str]:
    if _is_namedtuple_class(cls):
        return list(cls._fields)
    return [f.name for f in dataclasses.fields(cls) if f.init]


def _allowed_type(obj: Any) -> bool:
    """``type(obj)`` is allowlisted: same name and the very same class object (a look-alike is refused)."""
    name = class_name(type(obj))
    if name not in _registered and name not in BUILTIN_CLASSES:
        return False
    try:
        return allowed_class(name) is type(obj)
    except TreeFormatError:
        return False


# ---------------------------------------------------------------------------------------------- encoding
def encode_tree(tree: Any) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """Split ``tree`` into its JSON document (see the module docstring) and its tensors by key.

    Raises:
        TypeError: a leaf or container of a type that cannot be stored, naming its path in the tree.
    """
    tensors: dict[str, torch.Tensor] = {}
    root = _Encoder(tensors).encode(tree, "tree", set())
    return {"format": FORMAT, "version": VERSION, "tensors": len(tensors), "root": root}, tensors


class _Encoder:
    def __init__(self, tensors: dict[str, torch.Tensor]) -> None:
        self.tensors = tensors

    def add(self, tensor: torch.Tensor) -> str:
        key = f"t{len(self.tensors)}"
        # A contiguous CPU clone: safetensors needs dense, contiguous, unshared storage (views and
        # non-contiguous tensors are saved as their values).
        self.tensors[key] = tensor.detach().resolve_conj().resolve_neg().to("cpu").clone(
            memory_format=torch.contiguous_format)
        return key

    def encode(self, x: Any, path: str, open_containers: set[int]) -> Any:
        kind = type(x)
        if x is None or kind in (bool, int, str):
            return x
        if kind is float:
            return x if math.isfinite(x) else {"$": "float", "bits": struct.pack(">d", x).hex()}
        if isinstance(x, torch.Tensor):
            return self.tensor(x, path)
        if isinstance(x, np.ndarray) and kind is np.ndarray:
            return self.ndarray(x, path)
        if isinstance(x, np.generic):
            dtype = _numpy_dtype_str(x.dtype, path)
            return {"$": "npscalar", "dtype": dtype, "hex": x.tobytes().hex()}
        if kind is torch.dtype:
            return {"$": "dtype", "name": str(x).removeprefix("torch.")}
        if kind is torch.Size:
            return {"$": "size", "items": [int(d) for d in x]}
        if kind is torch.device:
            return {"$": "device", "name": str(x)}
        if id(x) in open_containers:
            raise TypeError(f"cannot store {path}: the tree contains a reference cycle")
        open_containers = open_containers | {id(x)}
        if kind in (list, tuple):
            items = [self.encode(v, f"{path}[{i}]", open_containers) for i, v in enumerate(x)]
            return {"$": kind.__name__, "items": items}
        if kind in (dict, collections.OrderedDict):
            return self.mapping(x, path, open_containers)
        if _allowed_type(x):
            fields = {name: self.encode(getattr(x, name), f"{path}.{name}", open_containers)
                      for name in _stored_fields(kind)}
            return {"$": "object", "class": class_name(kind), "fields": fields}
        raise TypeError(f"cannot store {path}: type {class_name(kind)} is not storable. Storable: None, bool, int, "
                        "float, str, list, tuple, dict (str/int keys), torch.Tensor, torch.dtype/Size/device, "
                        "numeric numpy arrays and scalars, and the NamedTuple/dataclass types allowlisted in "
                        "bilevel.run.serialize.BUILTIN_CLASSES or added with register_class")

    def tensor(self, x: torch.Tensor, path: str) -> dict[str, Any]:
        if x.layout != torch.strided or x.is_quantized or x.device.type == "meta":
            raise TypeError(f"cannot store {path}: only dense tensors with data are storable (got layout "
                            f"{x.layout}, device {x.device}); convert it with .to_dense() first")
        key = self.add(x)
        return {"$": "tensor", "key": key, "dtype": str(x.dtype).removeprefix("torch."), "shape": list(x.shape)}

    def ndarray(self, x: np.ndarray, path: str) -> dict[str, Any]:
        dtype = _numpy_dtype_str(x.dtype, path)
        raw = np.frombuffer(np.ascontiguousarray(x).tobytes(), dtype=np.uint8).copy()
        key = self.add(torch.from_numpy(raw))
        return {"$": "ndarray", "key": key, "dtype": dtype, "shape": list(x.shape)}

    def mapping(self, x: dict, path: str, open_containers: set[int]) -> dict[str, Any]:
        items = []
        for k, v in x.items():
            if type(k) not in (str, int):
                raise TypeError(f"cannot store {path}: dict key {k!r} is a {type(k).__name__}; only str and int "
                                "keys are storable")
            items.append([k, self.encode(v, f"{path}[{k!r}]", open_containers)])
        return {"$": "dict", "items": items, "ordered": type(x) is collections.OrderedDict}


def _numpy_dtype_str(dtype: np.dtype, path: str) -> str:
    if dtype.kind not in "biufc" or not _NUMPY_DTYPE.match(dtype.str):
        raise TypeError(f"cannot store {path}: numpy dtype {dtype} is not storable (numeric and bool dtypes only)")
    return dtype.str


# ---------------------------------------------------------------------------------------------- decoding
def decode_tree(document: Any, tensors: dict[str, torch.Tensor]) -> Any:
    """Rebuild the tree from :func:`encode_tree`'s output.

    Raises:
        TreeFormatError: the document is not a version-1 tree, is malformed, names a class outside the
            allowlist, or does not match ``tensors``; the message names the path inside the tree.
    """
    if not isinstance(document, dict) or document.get("format") != FORMAT:
        raise TreeFormatError(f"not a {FORMAT!r} document")
    if document.get("version") != VERSION:
        raise TreeFormatError(f"{FORMAT} version {document.get('version')!r} is not supported (this code reads "
                              f"version {VERSION}); use the bilevel version that wrote it")
    if document.get("tensors") != len(tensors):
        raise TreeFormatError(f"the document lists {document.get('tensors')!r} tensors, the tensor file holds "
                              f"{len(tensors)}")
    return _Decoder(tensors).decode(document.get("root"), "tree")


class _Decoder:
    def __init__(self, tensors: dict[str, torch.Tensor]) -> None:
        self.tensors = tensors
        self.kinds: dict[str, Callable[[dict, str], Any]] = {
            "float": self.float_, "list": self.sequence, "tuple": self.sequence, "dict": self.mapping,
            "tensor": self.tensor, "ndarray": self.ndarray, "npscalar": self.npscalar, "dtype": self.dtype,
            "size": self.size, "device": self.device, "object": self.object_}

    def decode(self, node: Any, path: str) -> Any:
        if node is None or type(node) in (bool, int, str):
            return node
        if type(node) is float:
            if not math.isfinite(node):  # written as {"$": "float"}; a bare NaN/Infinity token is malformed
                raise TreeFormatError(f"{path}: bare non-finite float")
            return node
        if not isinstance(node, dict) or node.get("$") not in self.kinds:
            raise TreeFormatError(f"{path}: unknown node {_short(node)}")
        try:
            return self.kinds[node["$"]](node, path)
        except TreeFormatError:
            raise
        except (KeyError, TypeError, ValueError, AttributeError, RuntimeError, struct.error) as err:
            raise TreeFormatError(f"{path}: malformed {node['$']!r} node ({type(err).__name__}: {err})") from err

    def float_(self, node: dict, path: str) -> float:
        return struct.unpack(">d", bytes.fromhex(node["bits"]))[0]

    def sequence(self, node: dict, path: str) -> list | tuple:
        items = [self.decode(v, f"{path}[{i}]") for i, v in enumerate(_list(node["items"], path))]
        return tuple(items) if node["$"] == "tuple" else items

    def mapping(self, node: dict, path: str) -> dict:
        out: dict = collections.OrderedDict() if node.get("ordered") is True else {}
        for pair in _list(node["items"], path):
            if not isinstance(pair, list) or len(pair) != 2 or type(pair[0]) not in (str, int):
                raise TreeFormatError(f"{path}: a dict item must be [str-or-int key, node], got {_short(pair)}")
            if pair[0] in out:
                raise TreeFormatError(f"{path}: duplicate dict key {pair[0]!r}")
            out[pair[0]] = self.decode(pair[1], f"{path}[{pair[0]!r}]")
        return out

    def stored(self, node: dict, path: str) -> torch.Tensor:
        key = node["key"]
        if not isinstance(key, str) or not _TENSOR_KEY.match(key):
            raise TreeFormatError(f"{path}: bad tensor key {_short(key)}")
        if key not in self.tensors:
            raise TreeFormatError(f"{path}: tensor {key!r} is missing from the tensor file")
        return self.tensors[key]

    def tensor(self, node: dict, path: str) -> torch.Tensor:
        value = self.stored(node, path)
        if str(value.dtype).removeprefix("torch.") != node["dtype"] or list(value.shape) != node["shape"]:
            raise TreeFormatError(f"{path}: tensor {node['key']!r} is {value.dtype} {list(value.shape)} in the "
                                  f"tensor file but {node['dtype']} {node['shape']} in the document")
        return value

    def ndarray(self, node: dict, path: str) -> np.ndarray:
        dtype, shape = _numpy_dtype(node["dtype"], path), [int(d) for d in _list(node["shape"], path)]
        raw = self.stored(node, path)
        if raw.dtype != torch.uint8 or raw.dim() != 1 or raw.numel() != dtype.itemsize * math.prod(shape):
            raise TreeFormatError(f"{path}: array bytes {node['key']!r} do not fit dtype {dtype} shape {shape}")
        return np.frombuffer(raw.numpy().tobytes(), dtype=dtype).reshape(shape).copy()

    def npscalar(self, node: dict, path: str) -> np.generic:
        dtype, raw = _numpy_dtype(node["dtype"], path), bytes.fromhex(node["hex"])
        if len(raw) != dtype.itemsize:
            raise TreeFormatError(f"{path}: {len(raw)} bytes for a numpy {dtype} scalar")
        return np.frombuffer(raw, dtype=dtype)[0]

    def dtype(self, node: dict, path: str) -> torch.dtype:
        name = node["name"]
        value = getattr(torch, name, None) if isinstance(name, str) and _TORCH_DTYPE.match(name) else None
        if not isinstance(value, torch.dtype):
            raise TreeFormatError(f"{path}: {_short(name)} is not a torch dtype")
        return value

    def size(self, node: dict, path: str) -> torch.Size:
        items = _list(node["items"], path)
        if not all(type(d) is int and d >= 0 for d in items):
            raise TreeFormatError(f"{path}: torch.Size entries must be non-negative ints")
        return torch.Size(items)

    def device(self, node: dict, path: str) -> torch.device:
        if not isinstance(node["name"], str):
            raise TreeFormatError(f"{path}: device name must be a string")
        return torch.device(node["name"])

    def object_(self, node: dict, path: str) -> Any:
        name, fields = node["class"], node["fields"]
        if not isinstance(name, str) or not isinstance(fields, dict):
            raise TreeFormatError(f"{path}: an object node needs a class name and a fields object")
        try:
            cls = allowed_class(name)  # refuses before anything of the node is built
        except TreeFormatError as err:
            raise type(err)(f"{path}: {err}") from err
        expected = _stored_fields(cls)
        if sorted(fields) != sorted(expected):
            raise TreeFormatError(f"{path}: {name} has fields {expected}, the document gives {sorted(fields)}")
        values = {k: self.decode(fields[k], f"{path}.{k}") for k in expected}
        try:
            return cls(**values)
        except (TypeError, ValueError) as err:  # the class's own validation (e.g. CMAESState.__post_init__)
            raise TreeFormatError(f"{path}: invalid {name} ({err})") from err


def _list(value: Any, path: str) -> list:
    if not isinstance(value, list):
        raise TreeFormatError(f"{path}: expected a JSON array, got {_short(value)}")
    return value


def _numpy_dtype(text: Any, path: str) -> np.dtype:
    if not isinstance(text, str) or not _NUMPY_DTYPE.match(text):
        raise TreeFormatError(f"{path}: {_short(text)} is not a numeric numpy dtype")
    return np.dtype(text)


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


# ---------------------------------------------------------------------------------------------- files
def save_tree(folder: str | Path, tree: Any, fsync: bool = True) -> Path:
    """Write ``tree`` as ``folder/tensors.safetensors`` + ``folder/state.json`` (the folder is created).

    The files are written in place, not atomically: write into a fresh folder and rename it for atomicity
    (as :mod:`bilevel.run.checkpoint` does). With ``fsync`` both files are on disk when this returns.

    Raises:
        TypeError: ``tree`` holds something that cannot be stored; the message names its path.
    """
    folder = Path(folder)
    document, tensors = encode_tree(tree)
    folder.mkdir(parents=True, exist_ok=True)
    tensor_path = folder / TENSORS_FILE
    save_file(tensors, str(tensor_path), metadata={"format": FORMAT, "version": str(VERSION)})
    if fsync:
        fsync_path(tensor_path)
    text = json.dumps(document, allow_nan=False, ensure_ascii=True, separators=(",", ":"))
    with open(folder / STATE_FILE, "w", encoding="utf-8") as fh:
        fh.write(text)
        fh.flush()
        if fsync:
            os.fsync(fh.fileno())
    return folder


def load_tree(folder: str | Path) -> Any:
    """Read a tree written by :func:`save_tree`; tensors come back on the CPU, owning their memory.

    Raises:
        TreeFormatError: a file is missing, truncated or corrupt, or the document is malformed or names a
            class outside the allowlist; the message names the file.
    """
    folder = Path(folder)
    state_path, tensor_path = folder / STATE_FILE, folder / TENSORS_FILE
    for path in (state_path, tensor_path):
        if not path.is_file():
            raise TreeFormatError(f"{path} is missing")
    try:
        document = json.loads(state_path.read_text(encoding="utf-8"), parse_constant=_reject_constant)
    except (ValueError, RecursionError) as err:  # JSONDecodeError / UnicodeDecodeError are ValueErrors
        raise TreeFormatError(f"{state_path} is not valid JSON ({type(err).__name__}: {err})") from err
    try:
        # Clones: the result must not depend on the file (it may be pruned, or mapped read-only).
        tensors = {k: v.clone() for k, v in load_file(str(tensor_path), device="cpu").items()}
    except Exception as err:  # safetensors raises its own SafetensorError (and OSError) for bad files
        raise TreeFormatError(f"{tensor_path} is unreadable ({type(err).__name__}: {err})") from err
    try:
        return decode_tree(document, tensors)
    except RecursionError as err:
        raise TreeFormatError(f"{state_path}: the document is nested too deeply") from err
    except TreeFormatError as err:
        raise type(err)(f"{state_path}: {err}") from err


def _reject_constant(token: str) -> Any:
    raise ValueError(f"bare {token} is not allowed (non-finite floats are stored as {{'$': 'float'}} nodes)")


def fsync_path(path: str | Path) -> None:
    """fsync a file or a directory by path (a directory fsync makes renames inside it durable)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


__all__ = ["save_tree", "load_tree", "encode_tree", "decode_tree", "register_class", "allowed_class", "class_name",
           "TreeFormatError", "UnknownClassError", "BUILTIN_CLASSES", "TENSORS_FILE", "STATE_FILE", "fsync_path"]
