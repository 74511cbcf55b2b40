"""On-disk cache of built datasets, keyed by the builder's name and arguments.

Every builder in :mod:`problems.data` is deterministic in its arguments (the seed included), so a build
can be stored once with ``Dataset.save_to_disk`` and read back, memory-mapped, with ``load_from_disk``.
The key is a hash of the JSON of the arguments plus a per-builder format version: bump the version
when a builder's output changes, and old entries are simply never read again.

Location: ``cache_dir`` if given, else ``$HF_HOME/bilevel``, else ``~/.cache/bilevel``. ``cache_dir=False``
builds in memory and writes nothing.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any

import datasets

CacheDir = str | os.PathLike | None | bool


def cache_root(cache_dir: CacheDir = None) -> Path:
    """The folder that holds cached builds: ``cache_dir``, ``$HF_HOME/bilevel`` or ``~/.cache/bilevel``."""
    if cache_dir is False:
        raise ValueError("cache_dir=False means 'no cache'; there is no cache folder to return")
    if cache_dir is not None and cache_dir is not True:
        return Path(cache_dir).expanduser()
    hf_home = os.environ.get("HF_HOME")
    if hf_home:
        return Path(hf_home).expanduser() / "bilevel"
    return Path.home() / ".cache" / "bilevel"


def cache_key(name: str, args: Mapping[str, Any]) -> str:
    """``name-<16 hex>``: a stable hash of the arguments (JSON, sorted keys, tuples as lists)."""
    text = json.dumps(args, sort_keys=True, default=_jsonable)
    return f"{name}-{hashlib.sha256(text.encode()).hexdigest()[:16]}"


def _jsonable(value: Any) -> Any:
    if isinstance(value, os.PathLike):
        return os.fspath(value)
    raise TypeError(f"cache key argument {value!r} of type {type(value).__name__} is not JSON-serialisable")


@contextlib.contextmanager
def quiet_progress() -> Iterator[None]:
    """Silence ``datasets`` progress bars inside the block, restoring the caller's setting after."""
    was_disabled = datasets.are_progress_bars_disabled()
    datasets.disable_progress_bars()
    try:
        yield
    finally:
        if not was_disabled:
            datasets.enable_progress_bars()


def cached_build(
    name: str,
    args: Mapping[str, Any],
    build: Callable[[], datasets.Dataset],
    cache_dir: CacheDir = None,
) -> datasets.Dataset:
    """Read ``name``/``args`` from the cache, or call ``build()`` and store its result first.

    The store is atomic (save into a temporary sibling folder, then rename), so several processes that
    build the same entry at once (tests of different problems, ``accelerate launch``) never read a
    half-written folder: the first rename wins and the others discard their copy. The returned dataset
    always comes from ``load_from_disk`` (memory-mapped) so a first and a second build behave the same.

    Returns:
        The dataset in torch format.
    """
    if cache_dir is False:
        return build().with_format("torch")
    root = cache_root(cache_dir)
    path = root / cache_key(name, args)
    if not path.is_dir():
        root.mkdir(parents=True, exist_ok=True)
        ds = build()
        tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", dir=root))
        try:
            with quiet_progress():
                ds.save_to_disk(str(tmp))
            (tmp / "bilevel_args.json").write_text(json.dumps({"name": name, **args}, default=_jsonable))
            try:
                os.rename(tmp, path)
            except OSError:
                if not path.is_dir():  # not a lost race: a real failure
                    raise
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    return datasets.load_from_disk(str(path)).with_format("torch")


def cache_size(path: str | os.PathLike) -> int:
    """Bytes on disk under ``path`` (a cache entry or the whole cache folder)."""
    return sum(f.stat().st_size for f in Path(path).rglob("*") if f.is_file())
