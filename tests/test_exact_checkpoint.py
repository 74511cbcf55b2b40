"""``bilevel.run.checkpoint`` and ``bilevel.run.serialize`` held to exact outcomes: which directories exist after
each operation, the manifest's sizes and SHA-256 digests (recomputed here with hashlib), which paths are fsync'ed
(a counting wrapper around ``os.fsync``), and the error raised for each kind of bad checkpoint.

Written to kill the mutants that ``mutation/run.py checkpoint`` found alive (docs/mutation.md). The payloads are
small: every test runs in milliseconds.
"""
from __future__ import annotations

import collections
import contextlib
import hashlib
import json
import locale
import math
import os
import pickle
import struct
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from bilevel.run import checkpoint as ckpt
from bilevel.run import serialize
from bilevel.run.checkpoint import CheckpointError
from torchopt.transform.scale_by_adam import ScaleByAdamState

torch.set_num_threads(1)


def payload(step: int, value: float = 1.0) -> dict:
    """The smallest payload a checkpoint accepts: a step and the outer params."""
    return {"step": step, "outer": {"lam": torch.full((2,), value, dtype=torch.float64)}}


def names(folder: Path) -> list[str]:
    return sorted(os.listdir(folder))


def step_name(step: int) -> str:
    return f"step-{step:08d}"


# ---------------------------------------------------------------------------------------------- listing
def test_listing_a_run_without_checkpoints_folder_is_empty(tmp_path):
    assert ckpt.checkpoint_dir(tmp_path) == tmp_path / "checkpoints"
    assert ckpt.list_checkpoints(tmp_path) == [] and ckpt.legacy_checkpoints(tmp_path) == []
    assert ckpt.latest_checkpoint(tmp_path) is None
    assert ckpt.set_aside_tripped(tmp_path, 0) == []


def test_listing_keeps_only_step_directories_in_step_order(tmp_path):
    folder = tmp_path / "checkpoints"
    folder.mkdir()
    for step in (10, 2, 9):
        (folder / step_name(step)).mkdir()
    (folder / step_name(5)).write_text("a file with a checkpoint's name is not a checkpoint")
    for other in ("step-1", "step-000000001", "xstep-00000003", "step-00000003.tripped", ".step-00000004.1.tmp"):
        (folder / other).mkdir()
    (folder / "step-00000007.pt").write_bytes(b"")
    (folder / "step-00000001.pt").write_bytes(b"")
    (folder / "step-00000008.pth").write_bytes(b"")
    assert [p.name for p in ckpt.list_checkpoints(tmp_path)] == [step_name(2), step_name(9), step_name(10)]
    assert ckpt.latest_checkpoint(tmp_path) == folder / step_name(10)
    assert [p.name for p in ckpt.legacy_checkpoints(tmp_path)] == ["step-00000001.pt", "step-00000007.pt"]


# ---------------------------------------------------------------------------------------------- tripped
def test_set_aside_tripped_renames_the_failed_step_and_every_later_one(tmp_path):
    for step in (3, 4, 5, 6):
        ckpt.save_checkpoint(tmp_path, step, payload(step, float(step)), keep=0)
    folder = tmp_path / "checkpoints"
    moved = ckpt.set_aside_tripped(tmp_path, 5)
    assert moved == [folder / f"{step_name(5)}.tripped", folder / f"{step_name(6)}.tripped"]
    assert names(folder) == [step_name(3), step_name(4), f"{step_name(5)}.tripped", f"{step_name(6)}.tripped"]
    assert all(ckpt.TRIPPED_PATTERN.match(p.name) for p in moved)
    # the newest listed (and resumed) checkpoint is the last one before the failed step
    assert ckpt.latest_checkpoint(tmp_path) == ckpt.find_resume_checkpoint(tmp_path) == folder / step_name(4)
    # the set-aside directories are intact checkpoints, kept for inspection (loadable by explicit path)
    assert float(ckpt.load_checkpoint(moved[0])["outer"]["lam"][0]) == 5.0
    assert ckpt.set_aside_tripped(tmp_path, 7) == [] and names(folder)[:2] == [step_name(3), step_name(4)]


def test_a_newer_tripped_checkpoint_replaces_an_older_one_of_the_same_step(tmp_path):
    ckpt.save_checkpoint(tmp_path, 5, payload(5, 1.0))
    first = ckpt.set_aside_tripped(tmp_path, 5)
    ckpt.save_checkpoint(tmp_path, 5, payload(5, 2.0))
    second = ckpt.set_aside_tripped(tmp_path, 5)
    assert first == second == [tmp_path / "checkpoints" / f"{step_name(5)}.tripped"]
    assert names(tmp_path / "checkpoints") == [f"{step_name(5)}.tripped"]
    assert float(ckpt.load_checkpoint(second[0])["outer"]["lam"][0]) == 2.0


def test_set_aside_tripped_makes_the_renames_durable_only_when_it_renamed(tmp_path, monkeypatch):
    ckpt.save_checkpoint(tmp_path, 2, payload(2))
    synced = []
    monkeypatch.setattr(serialize, "fsync_path", lambda path: synced.append(Path(path)))
    assert ckpt.set_aside_tripped(tmp_path, 3) == [] and synced == []
    ckpt.set_aside_tripped(tmp_path, 2)
    assert synced == [tmp_path / "checkpoints"]


def test_resume_refuses_a_folder_holding_only_tripped_checkpoints_and_names_them(tmp_path):
    for step in (2, 4):
        ckpt.save_checkpoint(tmp_path, step, payload(step))
    ckpt.set_aside_tripped(tmp_path, 2)
    with pytest.raises(CheckpointError) as info:
        ckpt.find_resume_checkpoint(tmp_path)
    assert str(info.value) == (
        f"--resume: no checkpoint in {tmp_path / 'checkpoints'} (only step-00000002.tripped, step-00000004.tripped, "
        "which held params that tripped the divergence/non-finite guard and are never resumed); run with "
        "--checkpoint-every K to write checkpoints, or start fresh (drop --resume; --overwrite to reuse this folder)")


def test_resume_without_any_checkpoint_does_not_mention_tripped_ones(tmp_path):
    (tmp_path / "checkpoints").mkdir()
    with pytest.raises(CheckpointError) as info:
        ckpt.find_resume_checkpoint(tmp_path)
    assert str(info.value).startswith(f"--resume: no checkpoint in {tmp_path / 'checkpoints'}; run with")
    with pytest.raises(CheckpointError) as info:
        ckpt.find_resume_checkpoint(tmp_path / "elsewhere")
    assert str(info.value) == f"--resume: run folder {tmp_path / 'elsewhere'} does not exist"
    run = tmp_path / "no_checkpoints_folder"
    run.mkdir()
    with pytest.raises(CheckpointError, match=r"no checkpoint in .*no_checkpoints_folder/checkpoints; run with"):
        ckpt.find_resume_checkpoint(run)


# ---------------------------------------------------------------------------------------------- writing
def test_the_manifest_lists_each_file_with_its_size_and_sha256(tmp_path):
    path = ckpt.save_checkpoint(tmp_path, 12, payload(12))
    manifest = json.loads((path / "manifest.json").read_text())
    assert set(manifest) == {"format", "version", "step", "files"}
    assert (manifest["format"], manifest["version"], manifest["step"]) == ("bilevel-checkpoint", 2, 12)
    expected = {}
    for name in ("tensors.safetensors", "state.json"):
        data = (path / name).read_bytes()
        expected[name] = {"bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()}
    assert manifest["files"] == expected
    assert ckpt._digest(path / "state.json") == expected["state.json"]


def test_a_large_file_is_digested_over_all_its_blocks(tmp_path):
    data = bytes(range(256)) * 9000  # 2.3 MB: three 1 MiB blocks
    (tmp_path / "big").write_bytes(data)
    assert ckpt._digest(tmp_path / "big") == {"bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()}


def test_every_file_and_both_directories_are_fsynced(tmp_path, monkeypatch):
    """A counting wrapper around os.fsync, resolving each descriptor to its path."""
    synced = []
    real = os.fsync

    def counting(fd):
        synced.append(os.readlink(f"/proc/self/fd/{fd}"))
        return real(fd)

    monkeypatch.setattr(os, "fsync", counting)
    ckpt.save_checkpoint(tmp_path, 3, payload(3))
    tmp = str(tmp_path / "checkpoints" / f".step-00000003.{os.getpid()}.tmp")
    assert sorted(synced) == sorted([f"{tmp}/tensors.safetensors", f"{tmp}/state.json", f"{tmp}/manifest.json",
                                     tmp, str(tmp_path / "checkpoints")])


def test_a_leftover_temporary_of_this_process_is_replaced_not_merged(tmp_path):
    folder = tmp_path / "checkpoints"
    leftover = folder / f".step-00000002.{os.getpid()}.tmp"
    leftover.mkdir(parents=True)
    (leftover / "junk").write_text("from an interrupted save")
    path = ckpt.save_checkpoint(tmp_path, 2, payload(2))
    assert names(path) == ["manifest.json", "state.json", "tensors.safetensors"]
    assert names(folder) == [step_name(2)]


def test_a_failed_write_leaves_neither_temporary_nor_checkpoint(tmp_path, monkeypatch):
    def failing(tmp, step, data):
        (tmp / "partial").parent.mkdir(parents=True, exist_ok=True)
        (tmp / "partial").write_text("half written")
        raise KeyboardInterrupt  # a BaseException: a kill during the write

    monkeypatch.setattr(ckpt, "_write", failing)
    with pytest.raises(KeyboardInterrupt):
        ckpt.save_checkpoint(tmp_path, 2, payload(2))
    assert names(tmp_path / "checkpoints") == []


@pytest.mark.parametrize("keep, kept", [
    (0, [2, 4, 6, 8]), (-1, [2, 4, 6, 8]), (1, [8]), (2, [6, 8]), (3, [4, 6, 8]), (4, [2, 4, 6, 8]), (9, [2, 4, 6, 8]),
])
def test_pruning_keeps_exactly_the_newest_keep(tmp_path, keep, kept):
    for step in (2, 4, 6):
        ckpt.save_checkpoint(tmp_path, step, payload(step), keep=0)
    ckpt.save_checkpoint(tmp_path, 8, payload(8), keep=keep)
    assert [p.name for p in ckpt.list_checkpoints(tmp_path)] == [step_name(s) for s in kept]


def test_the_default_keeps_two(tmp_path):
    for step in (1, 2, 3):
        ckpt.save_checkpoint(tmp_path, step, payload(step))
    assert [p.name for p in ckpt.list_checkpoints(tmp_path)] == [step_name(2), step_name(3)]


def test_stray_temporaries_of_other_processes_are_deleted_by_the_next_save(tmp_path):
    folder = tmp_path / "checkpoints"
    for stray in (".step-00000001.123.tmp", ".step-00000009.7.replaced.tmp"):
        (folder / stray).mkdir(parents=True)
    (folder / "notes.txt").write_text("not ours: kept")
    ckpt.save_checkpoint(tmp_path, 4, payload(4))
    assert names(folder) == ["notes.txt", step_name(4)]


# ---------------------------------------------------------------------------------------------- loading
@pytest.mark.parametrize("name", ["step-00000004.pt", "model.pt", "model.pth", "model.pkl", "model.bin"])
def test_pickle_files_are_refused_by_name_and_suffix(tmp_path, name):
    path = tmp_path / name
    path.write_bytes(b"\x80\x04N.")  # pickle of None: never read
    with pytest.raises(CheckpointError) as info:
        ckpt.load_checkpoint(path)
    assert str(info.value).startswith(f"{path}: old-format pickle checkpoint (torch.save .pt). Pickle checkpoints "
                                      "are never loaded")


def test_two_legacy_files_are_named_together_in_the_plural(tmp_path):
    folder = tmp_path / "checkpoints"
    folder.mkdir()
    for step in (1, 2):
        (folder / f"step-0000000{step}.pt").write_bytes(b"")
    with pytest.raises(CheckpointError) as info:
        ckpt.find_resume_checkpoint(tmp_path)
    assert str(info.value).startswith(f"{folder / 'step-00000001.pt'}, {folder / 'step-00000002.pt'}: old-format "
                                      "pickle checkpoints (torch.save .pt)")


def test_a_missing_path_or_an_ordinary_file_is_not_a_checkpoint(tmp_path):
    (tmp_path / "notes.txt").write_text("x")
    for path in (tmp_path / "absent", tmp_path / "notes.txt"):
        with pytest.raises(CheckpointError) as info:
            ckpt.load_checkpoint(path)
        assert str(info.value).startswith(f"checkpoint {path} is not a checkpoint directory (missing or a file)")


def rewrite_manifest(path: Path, change) -> None:
    manifest = json.loads((path / "manifest.json").read_text())
    change(manifest)
    (path / "manifest.json").write_text(json.dumps(manifest))


@pytest.mark.parametrize("change, message", [
    (lambda m: m.update(format="other"), "manifest.json is not a bilevel-checkpoint manifest"),
    (lambda m: m.pop("format"), "manifest.json is not a bilevel-checkpoint manifest"),
    (lambda m: m.update(version=1), "manifest.json: checkpoint version 1, this code reads version 2"),
    (lambda m: m.pop("version"), "manifest.json: checkpoint version None, this code reads version 2"),
    (lambda m: m.update(files=[]), "manifest.json does not list the checkpoint's files"),
    (lambda m: m["files"].pop("state.json"), "manifest.json does not list the checkpoint's files"),
    (lambda m: m["files"].update(extra={"bytes": 0, "sha256": ""}), "does not list the checkpoint's files"),
    (lambda m: m["files"]["state.json"].update(bytes=1), "state.json does not match its size/SHA-256"),
    (lambda m: m["files"]["tensors.safetensors"].update(sha256="0" * 64), "tensors.safetensors does not match"),
])
def test_each_manifest_defect_is_named(tmp_path, change, message):
    path = ckpt.save_checkpoint(tmp_path, 2, payload(2))
    rewrite_manifest(path, change)
    with pytest.raises(CheckpointError) as info:
        ckpt.load_checkpoint(path)
    assert str(info.value).startswith(f"checkpoint {path} is unreadable (") and message in str(info.value)


def test_a_manifest_that_is_not_an_object_or_a_listed_file_that_is_gone(tmp_path):
    path = ckpt.save_checkpoint(tmp_path, 2, payload(2))
    (path / "manifest.json").write_text("[1, 2]")
    with pytest.raises(CheckpointError, match="manifest.json is not a bilevel-checkpoint manifest"):
        ckpt.load_checkpoint(path)
    path = ckpt.save_checkpoint(tmp_path, 3, payload(3))
    (path / "tensors.safetensors").unlink()
    with pytest.raises(CheckpointError) as info:
        ckpt.load_checkpoint(path)
    assert f"{path / 'tensors.safetensors'} is missing" in str(info.value)


@pytest.mark.parametrize("tree", [[1, 2], {"outer": {}}, {"step": 1}])
def test_a_valid_tree_that_is_not_a_checkpoint_payload_is_refused(tmp_path, tree):
    path = tmp_path / "checkpoints" / step_name(1)
    ckpt._write(path, 1, tree)  # a complete, well-formed directory with the wrong content
    with pytest.raises(CheckpointError) as info:
        ckpt.load_checkpoint(path)
    assert str(info.value) == f"{path} is not a bilevel checkpoint (missing 'step'/'outer')"


def test_a_round_trip_returns_the_payload_bitwise(tmp_path):
    data = {"step": 7, "outer": {"lam": torch.tensor([0.1, -2.5], dtype=torch.float64)}, "note": "x"}
    loaded = ckpt.load_checkpoint(ckpt.save_checkpoint(tmp_path, 7, data))
    assert set(loaded) == {"step", "outer", "note"} and loaded["step"] == 7 and loaded["note"] == "x"
    assert torch.equal(loaded["outer"]["lam"], data["outer"]["lam"]) and loaded["outer"]["lam"].dtype == torch.float64


# ---------------------------------------------------------------------------------------------- serialize: decoding
def document(node, tensors: int = 0) -> dict:
    """A version-1 document whose root dict holds ``node`` under the key "x" (so its path is tree['x'])."""
    return {"format": "bilevel-tree", "version": 1, "tensors": tensors, "root": {"$": "dict", "items": [["x", node]]}}


LONG = "a" * 100
DECODE_ERRORS = [
    (math.nan, {}, "tree['x']: bare non-finite float"),
    ([1], {}, "tree['x']: unknown node [1]"),
    ({"$": "zzz"}, {}, "tree['x']: unknown node {'$': 'zzz'}"),
    ({"$": "float"}, {}, "tree['x']: malformed 'float' node (KeyError: 'bits')"),
    ({"$": "list", "items": "ab"}, {}, "tree['x']: expected a JSON array, got 'ab'"),
    ({"$": "dict", "items": {"k": 1}}, {}, "tree['x']: expected a JSON array, got {'k': 1}"),
    ({"$": "tuple", "items": [1, {"$": "zzz"}]}, {}, "tree['x'][1]: unknown node {'$': 'zzz'}"),
    ({"$": "dict", "items": [["a"]]}, {}, "tree['x']: a dict item must be [str-or-int key, node], got ['a']"),
    ({"$": "dict", "items": [[1.5, 1]]}, {}, "tree['x']: a dict item must be [str-or-int key, node], got [1.5, 1]"),
    ({"$": "dict", "items": ["ab"]}, {}, "tree['x']: a dict item must be [str-or-int key, node], got 'ab'"),
    ({"$": "dict", "items": [[2, 1], [2, 3]]}, {}, "tree['x']: duplicate dict key 2"),
    ({"$": "dict", "items": [["k", {"$": "zzz"}]]}, {}, "tree['x']['k']: unknown node {'$': 'zzz'}"),
    ({"$": "tensor", "key": "x1", "dtype": "float32", "shape": []}, {}, "tree['x']: bad tensor key 'x1'"),
    ({"$": "tensor", "key": 5, "dtype": "float32", "shape": []}, {}, "tree['x']: bad tensor key 5"),
    ({"$": "tensor", "key": "t3", "dtype": "float32", "shape": []}, {"t0": torch.ones(1)},
     "tree['x']: tensor 't3' is missing from the tensor file"),
    ({"$": "tensor", "key": "t0", "dtype": "float64", "shape": [2]}, {"t0": torch.ones(2)},
     "tree['x']: tensor 't0' is torch.float32 [2] in the tensor file but float64 [2] in the document"),
    ({"$": "tensor", "key": "t0", "dtype": "float32", "shape": [1, 2]}, {"t0": torch.ones(2)},
     "tree['x']: tensor 't0' is torch.float32 [2] in the tensor file but float32 [1, 2] in the document"),
    ({"$": "ndarray", "key": "t0", "dtype": "<f8", "shape": [2]}, {"t0": torch.zeros(16, dtype=torch.int8)},
     "tree['x']: array bytes 't0' do not fit dtype float64 shape [2]"),
    ({"$": "ndarray", "key": "t0", "dtype": "<f8", "shape": [2]}, {"t0": torch.zeros(2, 8, dtype=torch.uint8)},
     "tree['x']: array bytes 't0' do not fit dtype float64 shape [2]"),
    ({"$": "ndarray", "key": "t0", "dtype": "<f8", "shape": [2]}, {"t0": torch.zeros(15, dtype=torch.uint8)},
     "tree['x']: array bytes 't0' do not fit dtype float64 shape [2]"),
    ({"$": "ndarray", "key": "t0", "dtype": "<f8", "shape": 2}, {"t0": torch.zeros(16, dtype=torch.uint8)},
     "tree['x']: expected a JSON array, got 2"),
    ({"$": "ndarray", "key": "t0", "dtype": "O", "shape": [2]}, {"t0": torch.zeros(16, dtype=torch.uint8)},
     "tree['x']: 'O' is not a numeric numpy dtype"),
    ({"$": "ndarray", "key": "t9", "dtype": "<f8", "shape": [2]}, {"t0": torch.zeros(16, dtype=torch.uint8)},
     "tree['x']: tensor 't9' is missing from the tensor file"),
    ({"$": "npscalar", "dtype": "<f8", "hex": "000000"}, {}, "tree['x']: 3 bytes for a numpy float64 scalar"),
    ({"$": "npscalar", "dtype": "<U4", "hex": "00"}, {}, "tree['x']: '<U4' is not a numeric numpy dtype"),
    ({"$": "dtype", "name": "float99"}, {}, "tree['x']: 'float99' is not a torch dtype"),
    ({"$": "dtype", "name": 5}, {}, "tree['x']: 5 is not a torch dtype"),
    ({"$": "dtype", "name": "tensor"}, {}, "tree['x']: 'tensor' is not a torch dtype"),
    ({"$": "size", "items": [2, -1]}, {}, "tree['x']: torch.Size entries must be non-negative ints"),
    ({"$": "size", "items": [2.0]}, {}, "tree['x']: torch.Size entries must be non-negative ints"),
    ({"$": "size", "items": 3}, {}, "tree['x']: expected a JSON array, got 3"),
    ({"$": "device", "name": 5}, {}, "tree['x']: device name must be a string"),
    ({"$": "object", "class": 5, "fields": {}}, {}, "tree['x']: an object node needs a class name and a fields object"),
    ({"$": "object", "class": "a.B", "fields": []}, {},
     "tree['x']: an object node needs a class name and a fields object"),
    ({"$": "object", "class": "bilevel.solvers.cmaes.CMAESState", "fields": {"x0": 1}}, {},
     "tree['x']: bilevel.solvers.cmaes.CMAESState has fields ['x0', 'sigma0', 'popsize', 'seed', 'fitness'], the "
     "document gives ['x0']"),
    ({"$": "object", "class": "bilevel.solvers.cmaes.CMAESState",
      "fields": {"x0": 1, "sigma0": 1.0, "popsize": 4, "seed": 0, "fitness": []}}, {},
     "tree['x'].fitness: unknown node []"),
    ({"$": "object", "class": "bilevel.solvers.cmaes.CMAESState",
      "fields": {"x0": 1, "sigma0": 1.0, "popsize": 4, "seed": 0, "fitness": {"$": "list", "items": []}}}, {},
     "tree['x']: invalid bilevel.solvers.cmaes.CMAESState (CMAESState.x0 must be a finite float64 vector with >= 2 "
     "entries)"),
    ([LONG], {}, f"tree['x']: unknown node {repr([LONG])[:77]}..."),
    (["a" * 76], {}, f"tree['x']: unknown node {repr(['a' * 76])}"),  # exactly 80 characters: not shortened
    (["a" * 77], {}, f"tree['x']: unknown node {repr(['a' * 77])[:77]}..."),  # 81 characters: shortened
]


@pytest.mark.parametrize("node, tensors, message", DECODE_ERRORS, ids=[e[2][10:60] for e in DECODE_ERRORS])
def test_each_malformed_node_is_named_with_its_path(node, tensors, message):
    with pytest.raises(serialize.TreeFormatError) as info:
        serialize.decode_tree(document(node, len(tensors)), tensors)
    assert str(info.value) == message


def test_an_unknown_class_names_its_path():
    with pytest.raises(serialize.UnknownClassError) as info:
        serialize.decode_tree(document({"$": "object", "class": "os.system", "fields": {}}), {})
    assert str(info.value).startswith("tree['x']: class 'os.system' is not on the allowlist of storable classes")


@pytest.mark.parametrize("doc, message", [
    ([], "not a 'bilevel-tree' document"),
    ({"format": "other"}, "not a 'bilevel-tree' document"),
    ({"format": "bilevel-tree", "version": 2}, "bilevel-tree version 2 is not supported (this code reads version 1); "
                                               "use the bilevel version that wrote it"),
    ({"format": "bilevel-tree", "version": 1, "tensors": 2, "root": None},
     "the document lists 2 tensors, the tensor file holds 0"),
    ({"format": "bilevel-tree", "version": 1, "root": None}, "the document lists None tensors, the tensor file holds 0"),
])
def test_document_level_defects(doc, message):
    with pytest.raises(serialize.TreeFormatError) as info:
        serialize.decode_tree(doc, {})
    assert str(info.value) == message


def test_decoding_the_plain_nodes_and_the_ordered_flag():
    tensors = {"t0": torch.zeros(16, dtype=torch.uint8), "t1": torch.tensor([1.5, 2.5])}
    root = {"$": "list", "items": [
        {"$": "dict", "items": [["a", 1], [2, "b"]], "ordered": True},
        {"$": "dict", "items": [["a", 1]], "ordered": False},
        {"$": "dict", "items": [["a", 1]]},
        {"$": "float", "bits": struct.pack(">d", -math.inf).hex()},
        {"$": "ndarray", "key": "t0", "dtype": "<i4", "shape": [2, 2]},
        {"$": "npscalar", "dtype": "<i2", "hex": "0100"},
        {"$": "dtype", "name": "bfloat16"},
        {"$": "size", "items": [0, 3]},
        {"$": "device", "name": "cpu"},
        {"$": "tensor", "key": "t1", "dtype": "float32", "shape": [2]},
        {"$": "tuple", "items": [None, True, 3, "s", 0.25]},
    ]}
    out = serialize.decode_tree({"format": "bilevel-tree", "version": 1, "tensors": 2, "root": root}, tensors)
    assert type(out[0]) is collections.OrderedDict and list(out[0].items()) == [("a", 1), (2, "b")]
    assert type(out[1]) is dict and type(out[2]) is dict
    assert out[3] == -math.inf
    assert out[4].dtype == np.dtype("<i4") and out[4].tolist() == [[0, 0], [0, 0]]
    assert out[5] == np.int16(1) and out[5].dtype == np.int16
    assert out[6] is torch.bfloat16 and out[7] == torch.Size([0, 3]) and out[8] == torch.device("cpu")
    assert torch.equal(out[9], torch.tensor([1.5, 2.5]))
    assert out[10] == (None, True, 3, "s", 0.25) and type(out[10]) is tuple


# ---------------------------------------------------------------------------------------------- serialize: classes
def test_register_class_takes_namedtuple_and_dataclass_types_only():
    from typing import NamedTuple
    import dataclasses

    class Pair(NamedTuple):
        a: int
        b: float

    assert serialize.register_class(Pair) is Pair
    assert serialize.allowed_class(serialize.class_name(Pair)) is Pair
    assert serialize.decode_tree(*serialize.encode_tree(Pair(1, 2.5))) == Pair(1, 2.5)

    @dataclasses.dataclass
    class Box:
        v: int

    for bad in (Box(1), int, dict, "Box"):
        with pytest.raises(TypeError) as info:
            serialize.register_class(bad)
        assert str(info.value) == f"register_class({bad!r}): only NamedTuple and dataclass types can be stored"



# ---------------------------------------------------------------------------------------------- serialize: encoding
def test_the_encoded_document_is_exactly_the_documented_format():
    x = torch.tensor([[1.0, 2.0, 3.0], [4.0, 5.0, 6.0]])
    tree = collections.OrderedDict([
        ("none", None), ("flag", False), ("n", -7), ("s", "é"), ("f", 0.1), ("inf", math.inf), ("nan_neg", -math.nan),
        ("view", x[:, 1]), ("list", [1]), ("tuple", (2,)), ("np", np.arange(3, dtype=">u2")),
        ("np_scalar", np.float32(0.5)), ("dtype", torch.int16), ("size", torch.Size([4, 0])),
        ("device", torch.device("cpu")), (3, {"plain": True}),
    ])
    doc, tensors = serialize.encode_tree(tree)
    items = [
        ["none", None], ["flag", False], ["n", -7], ["s", "é"], ["f", 0.1],
        ["inf", {"$": "float", "bits": "7ff0000000000000"}],
        ["nan_neg", {"$": "float", "bits": struct.pack(">d", -math.nan).hex()}],
        ["view", {"$": "tensor", "key": "t0", "dtype": "float32", "shape": [2]}],
        ["list", {"$": "list", "items": [1]}], ["tuple", {"$": "tuple", "items": [2]}],
        ["np", {"$": "ndarray", "key": "t1", "dtype": ">u2", "shape": [3]}],
        ["np_scalar", {"$": "npscalar", "dtype": "<f4", "hex": "0000003f"}],
        ["dtype", {"$": "dtype", "name": "int16"}], ["size", {"$": "size", "items": [4, 0]}],
        ["device", {"$": "device", "name": "cpu"}],
        [3, {"$": "dict", "items": [["plain", True]], "ordered": False}],
    ]
    assert doc == {"format": "bilevel-tree", "version": 1, "tensors": 2,
                   "root": {"$": "dict", "items": items, "ordered": True}}
    assert list(tensors) == ["t0", "t1"]
    assert torch.equal(tensors["t0"], torch.tensor([2.0, 5.0])) and tensors["t0"].is_contiguous()
    assert tensors["t1"].dtype == torch.uint8 and tensors["t1"].tolist() == [0, 0, 0, 1, 0, 2]  # big-endian bytes
    x[0, 1] = 99.0  # the stored tensor is a copy
    assert float(tensors["t0"][0]) == 2.0


def test_conjugate_and_negative_views_are_stored_as_their_values():
    z = torch.tensor([1 + 2j, 3 - 1j], dtype=torch.complex64)
    _, tensors = serialize.encode_tree([z.conj(), torch.tensor([1.0, -2.0]).neg(), z.conj().imag])
    assert torch.equal(tensors["t0"], torch.tensor([1 - 2j, 3 + 1j], dtype=torch.complex64))
    assert not tensors["t0"].is_conj() and not tensors["t2"].is_neg()
    assert torch.equal(tensors["t2"], torch.tensor([-2.0, 1.0]))


def test_a_tensor_that_requires_grad_is_stored_detached():
    w = torch.ones(2, requires_grad=True)
    _, tensors = serialize.encode_tree({"w": w * 2})
    assert not tensors["t0"].requires_grad and torch.equal(tensors["t0"], torch.full((2,), 2.0))


def test_a_shared_container_is_not_a_cycle():
    shared = [1, 2]
    doc, _ = serialize.encode_tree([shared, shared, {"again": shared}])
    node = {"$": "list", "items": [1, 2]}
    assert doc["root"] == {"$": "list", "items": [node, node, {"$": "dict", "items": [["again", node]],
                                                                "ordered": False}]}
    cyc: dict = {}
    cyc["self"] = [cyc]
    with pytest.raises(TypeError) as info:
        serialize.encode_tree({"a": cyc})
    assert str(info.value) == "cannot store tree['a']['self'][0]: the tree contains a reference cycle"


@pytest.mark.parametrize("tree, message", [
    ({"k": {True: 1}}, "cannot store tree['k']: dict key True is a bool; only str and int keys are storable"),
    ({"k": {1.5: 1}}, "cannot store tree['k']: dict key 1.5 is a float; only str and int keys are storable"),
    ({"a": [np.array(["2020-01-01"], dtype="datetime64[D]")]},
     "cannot store tree['a'][0]: numpy dtype datetime64[D] is not storable (numeric and bool dtypes only)"),
    ({"a": np.str_("x")}, "cannot store tree['a']: numpy dtype <U1 is not storable (numeric and bool dtypes only)"),
    ({"m": torch.empty(2, device="meta")},
     "cannot store tree['m']: only dense tensors with data are storable (got layout torch.strided, device meta); "
     "convert it with .to_dense() first"),
    ({"s": torch.zeros(2).to_sparse()},
     "cannot store tree['s']: only dense tensors with data are storable (got layout torch.sparse_coo, device cpu); "
     "convert it with .to_dense() first"),
    ({"m": np.matrix([[1.0]])}, "cannot store tree['m']: type numpy.matrix is not storable."),
    ({"o": collections.defaultdict(int)}, "cannot store tree['o']: type collections.defaultdict is not storable."),
    # inside an allowlisted NamedTuple: the path continues with the field name
    ({"opt": ScaleByAdamState(mu=(torch.zeros(1), {1}), nu=(), count=torch.zeros(1))},
     "cannot store tree['opt'].mu[1]: type builtins.set is not storable."),
])
def test_unstorable_values_name_their_exact_path(tree, message):
    with pytest.raises(TypeError) as info:
        serialize.encode_tree(tree)
    assert str(info.value).startswith(message)


def test_numeric_numpy_dtypes_round_trip(tmp_path):
    arrays = [np.array([True, False]), np.arange(4, dtype="<i8").reshape(2, 2), np.array([1.5], dtype=">f4"),
              np.array([1 + 2j], dtype="<c16"), np.asfortranarray(np.arange(6, dtype=np.uint8).reshape(2, 3))]
    serialize.save_tree(tmp_path / "t", arrays, fsync=False)
    loaded = serialize.load_tree(tmp_path / "t")
    for a, b in zip(arrays, loaded):
        assert a.dtype == b.dtype and a.shape == b.shape and np.array_equal(a, b)


def test_a_look_alike_of_an_allowlisted_class_is_refused():
    from bilevel.solvers import cmaes

    real = cmaes.CMAESState
    fake = type("CMAESState", (), {"__module__": real.__module__, "__qualname__": real.__qualname__})
    with pytest.raises(TypeError, match=r"cannot store tree: type bilevel\.solvers\.cmaes\.CMAESState is not storable"):
        serialize.encode_tree(fake())


def test_an_allowlisted_class_that_is_not_installed_says_so(monkeypatch):
    monkeypatch.setitem(serialize.BUILTIN_CLASSES, "absent_module.Thing", ("absent_module_xyz", "Thing"))
    with pytest.raises(serialize.TreeFormatError) as info:
        serialize.allowed_class("absent_module.Thing")
    assert str(info.value).startswith("allowlisted class 'absent_module.Thing' is not available here (")
    assert str(info.value).endswith("); install the package that provides it")
    monkeypatch.setitem(serialize.BUILTIN_CLASSES, "torch.Nope", ("torch", "nn.Nope"))
    with pytest.raises(serialize.TreeFormatError, match="'torch.Nope' is not available here"):
        serialize.allowed_class("torch.Nope")
    assert serialize.allowed_class("torchopt.base.EmptyState").__name__ == "EmptyState"


# ---------------------------------------------------------------------------------------------- serialize: files
def test_save_tree_writes_compact_ascii_json_and_tagged_tensors(tmp_path):
    from safetensors import safe_open

    folder = serialize.save_tree(tmp_path / "new" / "t", {"s": "é", "x": torch.ones(1)}, fsync=False)
    assert folder == tmp_path / "new" / "t" and names(folder) == ["state.json", "tensors.safetensors"]
    text = (folder / "state.json").read_text(encoding="utf-8")
    assert text == json.dumps(serialize.encode_tree({"s": "é", "x": torch.ones(1)})[0], separators=(",", ":"))
    assert "\\u00e9" in text and " " not in text
    with safe_open(str(folder / "tensors.safetensors"), framework="pt") as fh:
        assert fh.metadata() == {"format": "bilevel-tree", "version": "1"}


@pytest.mark.parametrize("fsync, expected", [(True, ["state.json", "tensors.safetensors"]), (False, [])])
def test_save_tree_fsyncs_both_files_only_when_asked(tmp_path, monkeypatch, fsync, expected):
    synced = []
    real = os.fsync

    def counting(fd):
        synced.append(os.path.basename(os.readlink(f"/proc/self/fd/{fd}")))
        return real(fd)

    monkeypatch.setattr(os, "fsync", counting)
    serialize.save_tree(tmp_path / "t", {"x": torch.ones(1)}, fsync=fsync)
    assert sorted(synced) == expected
    synced.clear()
    serialize.save_tree(tmp_path / "u", {"x": torch.ones(1)})  # the default is durable
    assert sorted(synced) == ["state.json", "tensors.safetensors"]


def test_load_tree_file_defects_are_named(tmp_path, monkeypatch):
    folder = serialize.save_tree(tmp_path / "t", {"x": torch.ones(1)}, fsync=False)
    (folder / "state.json").write_text('{"a": NaN}')
    with pytest.raises(serialize.TreeFormatError) as info:
        serialize.load_tree(folder)
    assert str(info.value) == (f"{folder / 'state.json'} is not valid JSON (ValueError: bare NaN is not allowed "
                               "(non-finite floats are stored as {'$': 'float'} nodes))")
    (folder / "state.json").write_text(json.dumps(serialize.encode_tree({"x": torch.ones(1)})[0]))

    def too_deep(document, tensors):  # Python's own limit, hit by a crafted deeply nested document
        raise RecursionError("maximum recursion depth exceeded")

    with monkeypatch.context() as patch:
        patch.setattr(serialize, "decode_tree", too_deep)
        with pytest.raises(serialize.TreeFormatError) as info:
            serialize.load_tree(folder)
    assert str(info.value) == f"{folder / 'state.json'}: the document is nested too deeply"
    (folder / "state.json").write_text(json.dumps({"format": "bilevel-tree", "version": 1, "tensors": 1,
                                                   "root": {"$": "zzz"}}))
    with pytest.raises(serialize.TreeFormatError) as info:
        serialize.load_tree(folder)
    assert str(info.value) == f"{folder / 'state.json'}: tree: unknown node {{'$': 'zzz'}}"
    (folder / "state.json").unlink()
    with pytest.raises(serialize.TreeFormatError) as info:
        serialize.load_tree(folder)
    assert str(info.value) == f"{folder / 'state.json'} is missing"


def test_pruning_tolerates_a_checkpoint_removed_by_another_process(tmp_path, monkeypatch):
    """Two processes pruning the same folder: the listing can name a checkpoint the other one just deleted."""
    for step in (1, 2):
        ckpt.save_checkpoint(tmp_path, step, payload(step), keep=0)
    real = ckpt.list_checkpoints
    gone = tmp_path / "checkpoints" / step_name(0)  # listed, but already deleted
    monkeypatch.setattr(ckpt, "list_checkpoints", lambda run_dir: [gone] + real(run_dir))
    assert ckpt.save_checkpoint(tmp_path, 3, payload(3), keep=1) == tmp_path / "checkpoints" / step_name(3)
    assert names(tmp_path / "checkpoints") == [step_name(3)]


def test_a_stray_that_cannot_be_removed_does_not_fail_the_save(tmp_path):
    """Cleaning up strays is best effort: a regular file matching .step-*.tmp (rmtree refuses files) stays."""
    folder = tmp_path / "checkpoints"
    folder.mkdir()
    (folder / ".step-00000001.7.tmp").write_text("not a directory")
    assert ckpt.save_checkpoint(tmp_path, 2, payload(2)) == folder / step_name(2)
    assert names(folder) == [".step-00000001.7.tmp", step_name(2)]


def test_a_dotted_qualname_in_the_allowlist_is_resolved_attribute_by_attribute(monkeypatch):
    monkeypatch.setitem(serialize.BUILTIN_CLASSES, "torch.nn.Linear", ("torch", "nn.Linear"))
    assert serialize.allowed_class("torch.nn.Linear") is torch.nn.Linear


def test_an_allowlisted_name_that_cannot_be_imported_is_not_storable(monkeypatch):
    import dataclasses

    @dataclasses.dataclass
    class Local:
        v: int

    monkeypatch.setitem(serialize.BUILTIN_CLASSES, serialize.class_name(Local), ("absent_module_xyz", "Local"))
    with pytest.raises(TypeError, match="is not storable"):
        serialize.encode_tree(Local(1))


def test_a_class_with_fields_that_is_not_a_tuple_is_not_a_namedtuple():
    class FieldsOnly:
        _fields = ("a",)

    with pytest.raises(TypeError, match="only NamedTuple and dataclass types can be stored"):
        serialize.register_class(FieldsOnly)


def test_save_tree_into_an_existing_folder_replaces_both_files(tmp_path):
    """The folder may exist already (it is created only if missing); a second save overwrites the first."""
    first = {"a": torch.arange(3.0), "b": [1, 2]}
    second = {"c": torch.tensor([7], dtype=torch.int16)}
    assert serialize.save_tree(tmp_path, first, fsync=False) == tmp_path  # pytest's tmp_path exists already
    assert serialize.save_tree(tmp_path, second, fsync=False) == tmp_path
    assert names(tmp_path) == ["state.json", "tensors.safetensors"]
    out = serialize.load_tree(tmp_path)
    assert list(out) == ["c"] and out["c"].dtype == torch.int16 and out["c"].tolist() == [7]


@contextlib.contextmanager
def ascii_locale():
    """Switch this process's LC_CTYPE to "C", whose codeset is ASCII: the locale's encoding (what ``open`` uses
    without ``encoding=``) then cannot decode any non-ASCII byte. Yields that encoding's name."""
    old = locale.setlocale(locale.LC_CTYPE)
    locale.setlocale(locale.LC_CTYPE, "C")
    try:
        yield locale.getpreferredencoding(False)
    finally:
        locale.setlocale(locale.LC_CTYPE, old)


def test_state_json_is_ascii_on_disk_and_read_as_utf8_whatever_the_locale(tmp_path):
    """The file format does not depend on the machine's locale: save_tree writes pure ASCII (every non-ASCII
    character, even a lone surrogate, as a \\u escape) and load_tree decodes UTF-8, so a state.json holding raw
    UTF-8 (another JSON writer's, or a hand edit) loads under an ASCII locale too."""
    tree = {"é": ["ü€", "\ud800"]}
    with ascii_locale() as encoding:
        if sys.flags.utf8_mode or encoding.lower().replace("-", "") == "utf8":
            pytest.skip("Python's UTF-8 mode ignores the locale's codeset")
        assert serialize.save_tree(tmp_path / "a", tree, fsync=False) == tmp_path / "a"
        assert (tmp_path / "a" / "state.json").read_bytes() == (
            b'{"format":"bilevel-tree","version":1,"tensors":0,"root":{"$":"dict","items":'
            b'[["\\u00e9",{"$":"list","items":["\\u00fc\\u20ac","\\ud800"]}]],"ordered":false}}')
        assert serialize.load_tree(tmp_path / "a") == tree
        raw = {"format": "bilevel-tree", "version": 1, "tensors": 0,
               "root": {"$": "dict", "items": [["é", {"$": "list", "items": ["ü€"]}]]}}
        (tmp_path / "a" / "state.json").write_bytes(json.dumps(raw, ensure_ascii=False).encode("utf-8"))
        assert serialize.load_tree(tmp_path / "a") == {"é": ["ü€"]}
    (tmp_path / "a" / "state.json").write_bytes(b'{"format": "bilevel-tree", "s": "\xe9"}')  # Latin-1, not UTF-8
    with pytest.raises(serialize.TreeFormatError) as info:
        serialize.load_tree(tmp_path / "a")
    assert str(info.value).startswith(f"{tmp_path / 'a' / 'state.json'} is not valid JSON (UnicodeDecodeError: "
                                      "'utf-8' codec can't decode byte 0xe9")


class _Exploit:
    """Unpickling this would create ``path``: the marker that shows whether a loader executed the file."""

    def __init__(self, path: str) -> None:
        self.path = path

    def __reduce__(self):
        return (Path.touch, (Path(self.path),))


def test_an_unreadable_tensor_file_names_the_file_and_the_real_cause(tmp_path):
    """A truncated tensor file, or a pickle put in its place, is refused with the file's name and the underlying
    error's type and text; the pickle is never executed."""
    folder = serialize.save_tree(tmp_path / "t", {"x": torch.ones(3)}, fsync=False)
    tensor_path = folder / "tensors.safetensors"
    marker = tmp_path / "executed"
    for content in (tensor_path.read_bytes()[:-4], pickle.dumps({"x": _Exploit(str(marker))})):
        tensor_path.write_bytes(content)
        with pytest.raises(serialize.TreeFormatError) as info:
            serialize.load_tree(folder)
        cause = info.value.__cause__
        assert type(cause).__name__ == "SafetensorError"
        assert str(info.value) == f"{tensor_path} is unreadable (SafetensorError: {cause})"
        assert str(cause).startswith("Error while deserializing header")
    assert not marker.exists()
    pickle.loads(pickle.dumps(_Exploit(str(marker))))  # the control: unpickling the payload does run it
    assert marker.exists()
