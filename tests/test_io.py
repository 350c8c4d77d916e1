"""Official checkpoints carry more than tensors: they load without running code from the file, code-running ones don't."""
import importlib.abc
import io
import os
import pickle
import sys
import types
import zipfile
from collections import Counter, OrderedDict, defaultdict

import numpy as np
import pytest
import torch

import codetr.core.io as cio
from codetr.core.io import CheckpointError, Opaque, safe_load
from codetr.engine.checkpoint import load_official, read_weights, to_official_state_dict
from codetr.models.co_deformable_detr import co_deformable_detr_tiny
from codetr.models.detector import build_model

FORMATS = ["zip", "legacy"]


def save(obj, path, fmt="zip", protocol=2):
    torch.save(obj, path, _use_new_zipfile_serialization=fmt == "zip", pickle_protocol=protocol)
    return path


def torch_file(path, payload: bytes, fmt="zip"):
    "A torch.save file whose object pickle is `payload` (hand-written opcodes no pickler emits)."
    if fmt == "legacy":
        head = [torch.serialization.MAGIC_NUMBER, torch.serialization.PROTOCOL_VERSION, {}]
        path.write_bytes(b"".join(pickle.dumps(x, protocol=2) for x in head) + payload + pickle.dumps([], protocol=2))
        return path
    buf = io.BytesIO()
    torch.save({}, buf)
    with zipfile.ZipFile(buf) as src, zipfile.ZipFile(path, "w") as dst:
        for info in src.infolist():
            dst.writestr(info, payload if info.filename.endswith("/data.pkl") else src.read(info))
    return path


class ImportSpy(importlib.abc.MetaPathFinder):
    "Records every attempt to import one of `roots` (and lets the import go on to fail or succeed as usual)."
    def __init__(self, roots): self.roots, self.tried = roots, []
    def find_spec(self, name, path=None, target=None):
        if name.partition(".")[0] in self.roots: self.tried.append(name)
        return None


@pytest.fixture
def import_spy():
    spy = ImportSpy({"mmengine", "mmcv", "mmdet"})
    sys.meta_path.insert(0, spy)
    yield spy
    sys.meta_path.remove(spy)


@pytest.fixture
def fake_mmengine():
    "Classes that stand for mmengine's while a file is saved; `forget()` removes their modules before it is loaded."
    names = ["mmengine", "mmengine.logging", "mmengine.logging.message_hub", "mmengine.logging.history_buffer",
             "mmengine.config", "mmengine.config.config"]
    mods = {n: types.ModuleType(n) for n in names}

    def define(module, cls):
        cls.__module__, cls.__qualname__ = module, cls.__name__
        setattr(mods[module], cls.__name__, cls)
        return cls

    class HistoryBuffer:
        def __init__(self, values):
            self._log_history, self._count_history, self.max_length = np.asarray(values), np.ones(len(values)), 1000000

    class MessageHub:
        def __init__(self, **scalars):
            self.instance_name = "co_dino"
            self._log_scalars = OrderedDict((k, HistoryBuffer(v)) for k, v in scalars.items())
            self._runtime_info = OrderedDict(epoch=12, iter=7330)
            self._resumed_keys = defaultdict(bool, epoch=True)

    class ConfigDict(dict): pass

    fake = types.SimpleNamespace(HistoryBuffer=define("mmengine.logging.history_buffer", HistoryBuffer),
                                 MessageHub=define("mmengine.logging.message_hub", MessageHub),
                                 ConfigDict=define("mmengine.config.config", ConfigDict))
    fake.forget = lambda: [sys.modules.pop(n, None) for n in names]
    sys.modules.update(mods)
    yield fake
    fake.forget()


def mmdet2_meta():
    return {"mmdet_version": "2.25.3", "CLASSES": ("person", "bicycle"), "epoch": 12, "iter": 7330,
            "config": "model = dict(type='CoDETR', num_query=300)\n", "seed": np.int64(3),
            "hook_msgs": {"best_score": np.float64(0.5), "last_ckpt": "work_dirs/epoch_12.pth"},
            "history": np.arange(6, dtype=np.float32).reshape(2, 3), "flags": np.array([True, False]),
            "names": np.array(["a", "bc"]), "mixed": np.array([1, "x", None], dtype=object)}


@pytest.mark.parametrize("fmt", FORMATS)
def test_numpy_meta_and_state_dict_load(tmp_path, fmt):
    sd = torch.nn.Linear(3, 2).state_dict()  # an OrderedDict with `_metadata`
    optimizer = {"state": {0: {"step": torch.tensor(5.0), "exp_avg": torch.randn(2, 3)}}, "param_groups": [{"lr": 2e-4}]}
    obj = {"meta": mmdet2_meta(), "state_dict": sd, "optimizer": optimizer}
    with pytest.raises(pickle.UnpicklingError): torch.load(save(obj, tmp_path / "m.pth", fmt), weights_only=True)
    got = safe_load(tmp_path / "m.pth")
    assert type(got["state_dict"]) is OrderedDict and got["state_dict"]._metadata == sd._metadata
    for k, v in sd.items(): assert torch.equal(got["state_dict"][k], v), k
    assert torch.equal(got["optimizer"]["state"][0]["exp_avg"], optimizer["state"][0]["exp_avg"])
    meta, want = got["meta"], mmdet2_meta()
    assert (type(meta["seed"]), meta["seed"], type(meta["hook_msgs"]["best_score"])) == (np.int64, 3, np.float64)
    assert meta["hook_msgs"] == want["hook_msgs"] and meta["config"] == want["config"]
    assert meta["CLASSES"] == ("person", "bicycle") and meta["iter"] == 7330
    for k in ("history", "flags", "names", "mixed"):
        assert meta[k].dtype == want[k].dtype and np.array_equal(meta[k], want[k]), k


def test_numpy_1_spelling_loads(tmp_path):
    "Files written under numpy 1 name `numpy.core.multiarray`; numpy 2 writes `numpy._core.multiarray`."
    payload = pickle.dumps({"best_score": np.float64(0.5), "history": np.arange(3)}, protocol=2)
    assert b"numpy._core.multiarray" in payload
    got = safe_load(torch_file(tmp_path / "np1.pth", payload.replace(b"numpy._core.multiarray", b"numpy.core.multiarray")))
    assert got["best_score"] == 0.5 and type(got["best_score"]) is np.float64 and got["history"].tolist() == [0, 1, 2]


def test_plain_files_take_the_weights_only_path(tmp_path, monkeypatch):
    class Unused:
        def __init__(self, *args, **kwargs): raise AssertionError("the data-only unpickler ran on a plain file")
    monkeypatch.setattr(cio._DATA_PICKLE, "Unpickler", Unused)
    monkeypatch.setattr(cio._DATA_PICKLE, "load", Unused)
    assert safe_load(save({"model": {"w": torch.ones(2)}, "epoch": 3}, tmp_path / "plain.pt"))["epoch"] == 3


@pytest.mark.filterwarnings("ignore:Detected pickle protocol 4")
@pytest.mark.parametrize("fmt,protocol", [("zip", 1), ("zip", 2), ("zip", 4), ("legacy", 2)])
def test_unknown_classes_load_as_placeholders(tmp_path, fake_mmengine, import_spy, fmt, protocol):
    hub = fake_mmengine.MessageHub(loss=[1.5, 0.75], lr=[2e-4])
    cfg = fake_mmengine.ConfigDict(type="CoDETR", num_query=300)
    sd = OrderedDict(w=torch.arange(4.0))
    save({"meta": {"cfg": cfg, "seed": np.int64(3)}, "state_dict": sd, "message_hub": hub}, tmp_path / "e.pth", fmt, protocol)
    fake_mmengine.forget()
    got = safe_load(tmp_path / "e.pth")
    assert import_spy.tried == [] and "mmengine" not in sys.modules  # nothing from the file was imported
    assert torch.equal(got["state_dict"]["w"], sd["w"])
    hub2 = got["message_hub"]
    assert isinstance(hub2, Opaque) and type(hub2).__module__ == "mmengine.logging.message_hub"
    assert "mmengine.logging.message_hub.MessageHub" in repr(hub2)
    assert hub2.state["instance_name"] == "co_dino" and hub2.state["_runtime_info"] == OrderedDict(epoch=12, iter=7330)
    assert hub2.state["_resumed_keys"] == {"epoch": True} and type(hub2.state["_resumed_keys"]) is defaultdict
    buffer = hub2.state["_log_scalars"]["loss"]
    assert type(buffer).__qualname__ == "HistoryBuffer" and buffer.state["_log_history"].tolist() == [1.5, 0.75]
    assert type(got["meta"]["cfg"]).__qualname__ == "ConfigDict"
    held = got["meta"]["cfg"].dictitems or got["meta"]["cfg"].args[0]  # SETITEMS (protocol 2+) or copyreg (protocol 1)
    assert held == {"type": "CoDETR", "num_query": 300}
    with pytest.raises(CheckpointError, match="calls mmengine.logging.message_hub.MessageHub"): type(hub2)()
    assert import_spy.tried == []


def official_file(tmp_path, fake, cfg, model):
    "An mmdet-style file: numpy meta, official state_dict, optimizer and an mmengine message hub."
    sd = OrderedDict(to_official_state_dict(model.state_dict(), cfg))
    obj = {"meta": {**mmdet2_meta(), "cfg": fake.ConfigDict(num_classes=cfg.num_classes)}, "state_dict": sd,
           "optimizer": {"state": {}, "param_groups": [{"lr": np.float64(2e-4)}]}, "message_hub": fake.MessageHub(loss=[1.0])}
    path = save(obj, tmp_path / "co_detr_official.pth")
    fake.forget()
    return path, sd


def test_read_weights_and_load_official_take_the_weights(tmp_path, fake_mmengine, import_spy):
    cfg = co_deformable_detr_tiny(num_classes=3)
    torch.manual_seed(0)
    src, dst = build_model(cfg), build_model(cfg)
    path, sd = official_file(tmp_path, fake_mmengine, cfg, src)
    contents = read_weights(path)
    assert contents.kind == "official" and contents.state_dict.keys() == sd.keys()
    assert isinstance(contents.meta["message_hub"], Opaque)
    assert load_official(dst, path, cfg) == {"missing": [], "unexpected": [], "skipped": []}
    for k, v in src.state_dict().items(): assert torch.equal(v, dst.state_dict()[k]), k
    assert import_spy.tried == []


# ------------------------------------------------------------------ files that would run code
class Reduces:
    "Pickles as a call: `func(*args)` when unpickled."
    def __init__(self, func, *args): self.func, self.args = func, args
    def __reduce__(self): return (self.func, self.args)


def code_files(target):
    "name -> (pickle bytes, global the error must name); each would create `target` if it ran."
    p = str(target)
    via_type = Reduces(torch._tensor._rebuild_from_type_v2, io.open, torch.Tensor, (p, "w"), {})
    return {
        "os.system": (pickle.dumps({"w": 1, "x": Reduces(os.system, f"touch {p}")}, protocol=2), f"{os.system.__module__}.system"),
        "eval": (pickle.dumps(Reduces(eval, f"open({p!r}, 'w').close()"), protocol=2), "builtins.eval"),
        "io.open": (pickle.dumps(Reduces(io.open, p, "w"), protocol=2), "io.open"),  # a function the file names
        "via an allowed rebuild function": (pickle.dumps(via_type, protocol=2), "io.open"),
        "getattr chain": (b"c__builtin__\ngetattr\n(c__builtin__\n__import__\n(Vos\ntRVsystem\ntR(Vtouch " + p.encode()
                          + b"\ntR.", "builtins.getattr"),
        "INST": (b"(V" + p.encode() + b"\nVw\niio\nopen\n.", "io.open"),  # protocol 0: INST calls the class
        "OBJ": (b"\x80\x01(cio\nopen\nV" + p.encode() + b"\nVw\no.", "io.open"),
        # BUILD with (None, {"pwned": 1}) would setattr on the class itself: a global changed for the whole process
        "BUILD on a class": (b"ccollections\nCounter\n(N(dVpwned\nI1\nstb.", "collections.Counter"),
    }


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("case", list(code_files("x")))
def test_code_running_files_are_refused(tmp_path, fmt, case):
    target = tmp_path / "pwned"
    payload, name = code_files(target)[case]
    path = torch_file(tmp_path / "evil.pth", payload, fmt)
    with pytest.raises(CheckpointError) as e: safe_load(path, "official checkpoint")
    msg = str(e.value)
    assert f"official checkpoint {str(path)!r} was refused" in msg and name in msg, msg
    assert "would need to run arbitrary code" in msg and "weights_only=False)['state_dict']" in msg
    assert not target.exists() and not hasattr(Counter, "pwned")


def test_torch_saved_code_is_refused(tmp_path):
    target = tmp_path / "pwned"
    path = save({"state_dict": {"w": torch.ones(1)}, "hook": Reduces(os.system, f"touch {target}")}, tmp_path / "e.pth")
    with pytest.raises(CheckpointError, match=rf"e\.pth' was refused: .*\(it refers to {os.system.__module__}\.system\)"):
        safe_load(path)
    assert not target.exists()


def test_pickled_codetr_objects_are_refused(tmp_path):
    from codetr.core.config import Config
    path = save({"model": {}, "config": Config()}, tmp_path / "c.pt")
    with pytest.raises(CheckpointError, match=r"codetr\.core\.config\.Config object.*config_to_dict"): safe_load(path)


def test_truncated_and_foreign_files(tmp_path):
    path = save({"meta": mmdet2_meta(), "state_dict": {"w": torch.ones(3)}}, tmp_path / "m.pth", "legacy")
    (tmp_path / "cut.pth").write_bytes(path.read_bytes()[:120])
    with pytest.raises(CheckpointError, match=r"cut\.pth' cannot be read"): safe_load(tmp_path / "cut.pth")
    (tmp_path / "text.pth").write_text("not a checkpoint")
    with pytest.raises(CheckpointError, match=r"text\.pth' cannot be read"): safe_load(tmp_path / "text.pth")
