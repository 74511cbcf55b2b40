"""Checkpoints that can never execute code: bilevel.run.serialize round trips, the checkpoint directory
format, refusal of pickle checkpoints and of non-allowlisted classes, corrupt checkpoints."""
import collections
import dataclasses
import re
import hashlib
import json
import math
import os
import pickle
import random
import sys
from pathlib import Path
from typing import NamedTuple

import numpy as np
import pytest
import torch
import torchopt

from bilevel.run import checkpoint as ckpt
from bilevel.run.checkpoint import (CheckpointError, find_resume_checkpoint, latest_checkpoint, list_checkpoints,
                                    load_checkpoint, save_checkpoint)
from bilevel.run.serialize import (BUILTIN_CLASSES, TreeFormatError, allowed_class, class_name, decode_tree,
                                   encode_tree, load_tree, register_class, save_tree)
from bilevel.solvers.cmaes import CMAESState

torch.set_num_threads(1)


def round_trip(tree, tmp_path, name="t"):
    save_tree(tmp_path / name, tree)
    return load_tree(tmp_path / name)


def assert_same_tree(a, b):
    """Same structure, same types, tensors/arrays bitwise equal with dtype and shape."""
    assert type(a) is type(b), (type(a), type(b))
    if isinstance(a, torch.Tensor):
        assert a.dtype == b.dtype and a.shape == b.shape and torch.equal(a, b)
    elif isinstance(a, np.ndarray):
        assert a.dtype == b.dtype and a.shape == b.shape and a.tobytes() == b.tobytes()
    elif isinstance(a, dict):
        assert list(a) == list(b) and [type(k) for k in a] == [type(k) for k in b]
        for k in a:
            assert_same_tree(a[k], b[k])
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b)
        for x, y in zip(a, b):
            assert_same_tree(x, y)
    elif isinstance(a, float) and math.isnan(a):
        assert math.isnan(b)
    else:
        assert a == b and (not isinstance(a, float) or math.copysign(1, a) == math.copysign(1, b))


# ---------------------------------------------------------------------------------------------- serialize
@pytest.mark.parametrize("make", [
    lambda p: torch.optim.Adam(p, lr=0.01, betas=(0.8, 0.95)),
    lambda p: torch.optim.SGD(p, lr=0.05, momentum=0.9, nesterov=True),
], ids=["adam", "sgd_momentum"])
def test_torch_optimizer_state_dict_round_trips_and_later_steps_are_bitwise_equal(tmp_path, make):
    torch.manual_seed(0)
    params = [torch.randn(4, 3, requires_grad=True), torch.randn(3, requires_grad=True)]
    x = torch.randn(16, 4)

    def step(ps, opt):
        opt.zero_grad()
        ((x @ ps[0] + ps[1]).tanh().pow(2).sum()).backward()
        opt.step()

    opt = make(params)
    for _ in range(3):
        step(params, opt)
    state = opt.state_dict()
    loaded = round_trip(state, tmp_path)
    assert_same_tree(state, loaded)
    assert 0 in loaded["state"] and isinstance(loaded["param_groups"][0]["params"][0], int)

    twins = [p.detach().clone().requires_grad_(True) for p in params]
    twin_opt = make(twins)
    twin_opt.load_state_dict(loaded)
    for _ in range(3):
        step(params, opt)
        step(twins, twin_opt)
    assert all(torch.equal(a, b) for a, b in zip(params, twins))


def test_rng_states_round_trip_and_reproduce_the_same_draws(tmp_path):
    random.seed(5)
    np.random.seed(5)
    torch.manual_seed(5)
    np.random.randn(3)  # a cached Gaussian makes the numpy state's last two fields non-trivial
    states = {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate()}
    loaded = round_trip(states, tmp_path)
    assert_same_tree(states, loaded)
    assert loaded["torch"].dtype == torch.uint8 and loaded["numpy"][1].dtype == np.uint32
    expected = (torch.rand(5), np.random.rand(5), [random.random() for _ in range(5)])
    torch.set_rng_state(loaded["torch"])
    np.random.set_state(loaded["numpy"])
    random.setstate(loaded["python"])  # needs tuples, not lists
    again = (torch.rand(5), np.random.rand(5), [random.random() for _ in range(5)])
    assert torch.equal(expected[0], again[0]) and np.array_equal(expected[1], again[1]) and expected[2] == again[2]


@pytest.mark.parametrize("make", [
    lambda: torchopt.sgd(0.1),
    lambda: torchopt.sgd(0.1, momentum=0.9, nesterov=True, weight_decay=0.01),
    lambda: torchopt.adam(0.05, weight_decay=0.01),
], ids=["sgd", "momentum", "adam"])
def test_torchopt_states_round_trip_and_later_updates_are_bitwise_equal(tmp_path, make):
    torch.manual_seed(0)
    opt = make()
    params = {"w": torch.randn(3, 2), "b": torch.randn(2)}

    def update(p, s, k):
        grads = {n: (v * (k + 1)).sin() for n, v in p.items()}
        updates, s = opt.update(grads, s, params=p, inplace=False)
        return torchopt.apply_updates(p, updates, inplace=False), s

    state = opt.init(params)
    for k in range(3):
        params, state = update(params, state, k)
    loaded = round_trip({"params": params, "opt_state": state}, tmp_path)
    assert_same_tree(state, loaded["opt_state"])
    p1, s1, p2, s2 = params, state, loaded["params"], loaded["opt_state"]
    for k in range(3, 6):
        p1, s1 = update(p1, s1, k)
        p2, s2 = update(p2, s2, k)
    assert all(torch.equal(p1[n], p2[n]) for n in p1)


def test_nested_containers_scalars_and_tensor_corner_cases_round_trip(tmp_path):
    base = torch.arange(24, dtype=torch.float64).reshape(4, 6)
    shared = torch.ones(3)
    tree = {
        "params": {"inner": {"w": torch.randn(3, 2), "b": torch.zeros(2)}, "outer": {"lam": torch.tensor(0.5)}},
        7: ["int key", 2**70, -3],
        "floats": [0.1, -0.0, math.inf, -math.inf, math.nan, 1e-320, 5e-324],
        "view": base[1:, ::2], "transposed": base.t(), "expanded": torch.tensor([1.0, 2.0]).expand(3, 2),
        "shared": [shared, shared[1:]],
        "dtypes": [torch.zeros(2, dtype=d) + 1 for d in (torch.bfloat16, torch.float16, torch.int8, torch.bool,
                                                         torch.uint8, torch.int64, torch.complex64)],
        "empty": torch.zeros(0, 3), "scalar": torch.tensor(3),
        "numpy": [np.arange(6, dtype=np.uint32).reshape(2, 3), np.zeros((0,), np.float32), np.array(True),
                  np.float32(0.1), np.int64(-5), np.bool_(False), np.float64(math.nan)],
        "meta": (torch.float32, torch.Size([2, 3]), torch.device("cpu"), None, True, "text \u00e9"),
        "ordered": collections.OrderedDict([("b", 1), ("a", 2)]),
        "optimizer_states": (torchopt.base.EmptyState(),),
    }
    loaded = round_trip(tree, tmp_path)
    expected = dict(tree, view=base[1:, ::2].contiguous(), transposed=base.t().contiguous())
    assert_same_tree(expected, loaded)
    assert loaded["view"].is_contiguous() and torch.equal(loaded["view"], base[1:, ::2])
    # shared memory is not preserved: two independent tensors
    loaded["shared"][0][1] = 5.0
    assert float(loaded["shared"][1][0]) == 1.0
    assert math.copysign(1, loaded["floats"][1]) == -1 and loaded[7][1] == 2**70


def test_every_allowlisted_class_resolves_to_itself():
    for name in BUILTIN_CLASSES:
        cls = allowed_class(name)
        assert class_name(cls) == name


def test_registered_classes_round_trip_and_init_false_fields_are_not_stored(tmp_path):
    @register_class
    @dataclasses.dataclass
    class Point:
        x: float
        label: str
        cache: object = dataclasses.field(default=None, init=False)

    p = Point(1.5, "a")
    p.cache = object()  # would not be storable: init=False fields are caches and are skipped
    loaded = round_trip({"p": p}, tmp_path)["p"]
    assert type(loaded) is Point and (loaded.x, loaded.label, loaded.cache) == (1.5, "a", None)


class Unlisted(NamedTuple):
    a: int


@pytest.mark.parametrize("tree, where", [
    ({"a": [1, object()]}, "tree['a'][1]"),
    ({"fn": lambda x: x}, "tree['fn']"),
    ({"s": {1, 2}}, "tree['s']"),
    ({"nt": Unlisted(1)}, "tree['nt']"),
    ({"k": {(1, 2): 3}}, "tree['k']"),
    ({"arr": np.array([object()])}, "tree['arr']"),
    ({"p": Path("/tmp")}, "tree['p']"),
])
def test_unstorable_values_are_a_type_error_naming_their_path(tree, where):
    with pytest.raises(TypeError, match=re.escape(where)):
        encode_tree(tree)


def test_a_cycle_is_a_type_error():
    cyc: list = []
    cyc.append(cyc)
    with pytest.raises(TypeError, match="cycle"):
        encode_tree(cyc)


@pytest.mark.parametrize("name", ["os.system", "builtins.eval", "subprocess.Popen", "test_checkpoint_safety.Unlisted",
                                  "evil_module_never_imported.Thing"])
def test_an_unknown_class_name_is_refused_without_importing_anything(name):
    document = {"format": "bilevel-tree", "version": 1, "tensors": 0,
                "root": {"$": "object", "class": name, "fields": {"a": ["rm -rf /"]}}}
    modules = set(sys.modules)
    with pytest.raises(TreeFormatError, match="not on the allowlist"):
        decode_tree(document, {})
    assert set(sys.modules) == modules


@pytest.mark.parametrize("node, message", [
    ({"$": "device", "name": "bogus"}, "malformed 'device'"),
    ({"$": "float", "bits": "00"}, "malformed 'float'"),
    ({"$": "size", "items": [-1]}, "non-negative"),
    ({"$": "dict", "items": [["a", 1], ["a", 2]]}, "duplicate dict key"),
    ({"$": "npscalar", "dtype": "O", "hex": ""}, "not a numeric numpy dtype"),
    ({"$": "dtype", "name": "__class__"}, "not a torch dtype"),
    ({"$": "tensor", "key": "../x", "dtype": "float32", "shape": []}, "bad tensor key"),
    ({"$": "pickle", "data": "gASV"}, "unknown node"),
    ({"$": "list", "items": [1, {"$": "object", "class": "builtins.eval", "fields": {}}]}, r"tree\[1\]"),
])
def test_malformed_nodes_are_a_tree_format_error_naming_the_path(node, message):
    with pytest.raises(TreeFormatError, match=message):
        decode_tree({"format": "bilevel-tree", "version": 1, "tensors": 0, "root": node}, {})


@pytest.mark.parametrize("damage, message", [
    (lambda d: (d / "state.json").write_text('{"format": "bilevel-tree", "vers'), "not valid JSON"),
    (lambda d: (d / "tensors.safetensors").unlink(), "missing"),
    (lambda d: (d / "tensors.safetensors").write_bytes((d / "tensors.safetensors").read_bytes()[:40]), "unreadable"),
    (lambda d: (d / "state.json").write_text((d / "state.json").read_text().replace('"t0"', '"t9"')),
     "tensor 't9' is missing"),
    (lambda d: (d / "state.json").write_text((d / "state.json").read_text().replace('"float32"', '"float64"')),
     "float64"),
    (lambda d: (d / "state.json").write_text((d / "state.json").read_text().replace('"$":"dict"', '"$":"code"')),
     "unknown node"),
])
def test_damaged_trees_are_a_clear_error_naming_the_file(tmp_path, damage, message):
    save_tree(tmp_path / "t", {"x": torch.ones(2), "y": [1, 2]})
    damage(tmp_path / "t")
    with pytest.raises(TreeFormatError, match=message) as info:
        load_tree(tmp_path / "t")
    assert str(tmp_path / "t") in str(info.value)


# ---------------------------------------------------------------------------------------------- checkpoints
def payload(step):
    """What bilevel.run.loop writes: outer params, optimiser, per-process task state and RNG states."""
    outer = {"lam": torch.randn(4, requires_grad=True)}
    opt = torch.optim.SGD(list(outer.values()), lr=1.0)
    task_state = {"inner": {"w": torch.randn(3)},
                  "solver_state": CMAESState.start(np.zeros(4), 0.3, 4, 1),
                  "opt_state": torchopt.adam(0.1).init({"w": torch.randn(3)})}
    rng = {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate()}
    return {"step": step, "problem": "ridge", "solver": "cmaes", "seed": 0, "num_processes": 1,
            "outer": {k: v.detach() for k, v in outer.items()}, "optimizer": opt.state_dict(),
            "processes": [{"task": task_state, "rng": rng}]}


def test_checkpoint_is_a_directory_that_round_trips_and_keeps_the_newest(tmp_path):
    run = tmp_path / "run"
    (run / "checkpoints").mkdir(parents=True)
    stray = run / "checkpoints" / ".step-00000001.99999.tmp"  # an interrupted save
    stray.mkdir()
    (stray / "state.json").write_text("{")
    assert list_checkpoints(run) == [] and latest_checkpoint(run) is None
    saved = {}
    for step in (2, 4, 6):
        saved[step] = payload(step)
        path = save_checkpoint(run, step, saved[step], keep=2)
        assert path == run / "checkpoints" / f"step-{step:08d}" and path.is_dir()
    assert not stray.exists()
    assert [p.name for p in list_checkpoints(run)] == ["step-00000004", "step-00000006"]
    assert sorted(os.listdir(run / "checkpoints")) == ["step-00000004", "step-00000006"]
    assert sorted(os.listdir(run / "checkpoints" / "step-00000006")) == ["manifest.json", "state.json",
                                                                         "tensors.safetensors"]
    assert find_resume_checkpoint(run) == latest_checkpoint(run) == run / "checkpoints" / "step-00000006"
    loaded = load_checkpoint(find_resume_checkpoint(run))
    expected = saved[6]
    state = loaded["processes"][0]["task"]["solver_state"]
    assert isinstance(state, CMAESState) and torch.equal(state.x0, expected["processes"][0]["task"]["solver_state"].x0)
    del loaded["processes"][0]["task"]["solver_state"], expected["processes"][0]["task"]["solver_state"]
    assert_same_tree(expected, loaded)
    manifest = json.loads((run / "checkpoints" / "step-00000006" / "manifest.json").read_text())
    assert manifest["format"] == "bilevel-checkpoint" and manifest["version"] == 2 and manifest["step"] == 6


def test_pruning_never_deletes_the_checkpoint_just_written(tmp_path):
    for step in (8, 10):
        save_checkpoint(tmp_path, step, payload(step), keep=2)
    save_checkpoint(tmp_path, 2, payload(2), keep=2)  # a newer-numbered pair from an earlier run stays too
    assert [p.name for p in list_checkpoints(tmp_path)] == ["step-00000002", "step-00000008", "step-00000010"]
    save_checkpoint(tmp_path, 4, payload(4), keep=1)
    assert [p.name for p in list_checkpoints(tmp_path)] == ["step-00000004", "step-00000008", "step-00000010"]


def test_saving_the_same_step_again_replaces_it(tmp_path):
    save_checkpoint(tmp_path, 2, payload(2))
    second = payload(2)
    save_checkpoint(tmp_path, 2, second)
    assert torch.equal(load_checkpoint(latest_checkpoint(tmp_path))["outer"]["lam"], second["outer"]["lam"])
    assert sorted(os.listdir(tmp_path / "checkpoints")) == ["step-00000002"]


def test_an_unstorable_payload_fails_the_save_and_leaves_no_checkpoint(tmp_path):
    with pytest.raises(TypeError, match=r"cannot store tree\['extra'\]: type builtins\.object is not storable\. "
                                        r"Storable: None, bool"):
        save_checkpoint(tmp_path, 2, dict(payload(2), extra=object()))
    assert os.listdir(tmp_path / "checkpoints") == []


@pytest.mark.parametrize("damage, message", [
    (lambda d: (d / "tensors.safetensors").write_bytes((d / "tensors.safetensors").read_bytes()[:-9]), "SHA-256"),
    (lambda d: (d / "state.json").unlink(), "state.json is missing"),
    (lambda d: (d / "manifest.json").write_text("{\"format\""), "manifest.json is not valid JSON"),
    (lambda d: (d / "manifest.json").unlink(), "manifest.json is missing"),
])
def test_a_truncated_or_corrupt_checkpoint_is_a_checkpoint_error_naming_it(tmp_path, damage, message):
    path = save_checkpoint(tmp_path, 2, payload(2))
    damage(path)
    with pytest.raises(CheckpointError, match=message) as info:
        load_checkpoint(find_resume_checkpoint(tmp_path))
    assert str(path) in str(info.value)
    assert "delete it to resume from the previous one, or start a fresh run" in str(info.value)


# ---------------------------------------------------------------------------------------------- security
class Malicious:
    """Unpickling this creates the marker file: the proof that a pickle executes code."""

    marker = ""

    def __reduce__(self):
        return (Path.touch, (Path(self.marker),))


def write_malicious_pickle(path: Path, marker: Path) -> None:
    evil = Malicious()
    evil.marker = str(marker)
    path.write_bytes(pickle.dumps({"step": 4, "outer": {}, "x": evil}))


def test_the_malicious_pickle_does_execute_code_when_unpickled(tmp_path):
    """Sanity check of the fixture: the danger is real."""
    marker = tmp_path / "pwned"
    write_malicious_pickle(tmp_path / "evil.pt", marker)
    pickle.loads((tmp_path / "evil.pt").read_bytes())
    assert marker.exists()


def test_old_style_pickle_checkpoint_is_refused_and_never_executed(tmp_path):
    run, marker = tmp_path / "run", tmp_path / "pwned"
    (run / "checkpoints").mkdir(parents=True)
    legacy = run / "checkpoints" / "step-00000004.pt"
    write_malicious_pickle(legacy, marker)
    for call in (lambda: load_checkpoint(legacy), lambda: find_resume_checkpoint(run)):
        with pytest.raises(CheckpointError, match="never loaded, because loading a pickle can execute") as info:
            call()
        assert str(legacy) in str(info.value) and "fresh run" in str(info.value)
    # also when new-format checkpoints sit next to it
    save_checkpoint(run, 2, payload(2))
    with pytest.raises(CheckpointError, match="pickle"):
        find_resume_checkpoint(run)
    assert not marker.exists()


@pytest.mark.parametrize("evil_class", ["os.system", "builtins.eval", "posix.system",
                                        "test_checkpoint_safety.Malicious"])
def test_crafted_checkpoint_naming_a_non_allowlisted_class_is_refused(tmp_path, evil_class):
    """A well-formed checkpoint (valid manifest hashes) whose JSON asks for a dangerous class."""
    run, marker = tmp_path / "run", tmp_path / "pwned"
    path = save_checkpoint(run, 4, payload(4))
    state = json.loads((path / "state.json").read_text())
    state["root"]["items"].append(["x", {"$": "object", "class": evil_class,
                                         "fields": {"command": f"touch {marker}", "marker": str(marker)}}])
    (path / "state.json").write_text(json.dumps(state))
    manifest = json.loads((path / "manifest.json").read_text())
    data = (path / "state.json").read_bytes()
    manifest["files"]["state.json"] = {"bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()}
    (path / "manifest.json").write_text(json.dumps(manifest))
    for call in (lambda: load_checkpoint(path), lambda: load_checkpoint(find_resume_checkpoint(run))):
        with pytest.raises(CheckpointError, match="not on the allowlist") as info:
            call()
        assert evil_class in str(info.value) and str(path) in str(info.value)
        assert "Nothing in it was built or executed" in str(info.value) and "Delete it" in str(info.value)
    assert not marker.exists()


def test_a_pickle_renamed_into_the_new_layout_is_not_unpickled(tmp_path):
    """A pickle dropped in as tensors.safetensors or state.json is just a corrupt file."""
    run, marker = tmp_path / "run", tmp_path / "pwned"
    path = save_checkpoint(run, 4, payload(4))
    for name in ("tensors.safetensors", "state.json"):
        write_malicious_pickle(path / name, marker)
    manifest = json.loads((path / "manifest.json").read_text())
    for name in ("tensors.safetensors", "state.json"):
        data = (path / name).read_bytes()
        manifest["files"][name] = {"bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()}
    (path / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(CheckpointError, match=r"is unreadable \(.*state\.json is not valid JSON.*\); delete it"):
        load_checkpoint(path)
    assert not marker.exists()


def test_loading_a_checkpoint_never_calls_the_unpickler(tmp_path, monkeypatch):
    path = save_checkpoint(tmp_path, 2, payload(2))

    def forbidden(*args, **kwargs):
        raise AssertionError("a checkpoint load reached pickle / torch.load")

    for module, name in ((pickle, "load"), (pickle, "loads"), (pickle, "Unpickler"), (torch, "load")):
        monkeypatch.setattr(module, name, forbidden)
    assert load_checkpoint(find_resume_checkpoint(tmp_path))["step"] == 2
    assert "pickle" not in sys.modules["bilevel.run.serialize"].__dict__
    assert "pickle" not in ckpt.__dict__
