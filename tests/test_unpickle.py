"""The restricted unpickler: plain data of protocols 2 to 5 read as pickle reads it; the rest refused, nothing run."""

from __future__ import annotations

import pickle
import struct
import time
from collections import OrderedDict
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from ptwriter import T, dumps, global_, integer, unicode

from gradinspect.errors import InputError
from gradinspect.sources import limits
from gradinspect.sources.unpickle import (
    DTYPES,
    StateDict,
    Stateful,
    StorageRef,
    TensorRef,
    UnpickleError,
    Unpickler,
    loads,
    walk,
)

REFUSED = r"\(only tensors and plain containers are read\)"


def _plain() -> dict[str, Any]:
    return {"a": 1, "neg": -5, "big": 1 << 70, "f": 1.5, "s": "é\u2603", "b": b"\x00\xff" * 300, "none": None,
            "t": True, "nested": {"l": [1, [2, (3, "x")]], "tu": (1, 2.0)}, "set": {1, 2, "3"},
            "fs": frozenset({(1, 2)}), "od": OrderedDict(z=1, a=2), "empty": ([], {}, ()), 7: "int key"}


@pytest.mark.parametrize("protocol", [2, 3, 4, 5])
def test_plain_data_reads_as_pickle_does(protocol: int) -> None:
    obj = _plain()
    data = pickle.dumps(obj, protocol=protocol)
    got = loads(data, "x.pkl")
    assert got == pickle.loads(data) == obj
    assert isinstance(got, dict) and isinstance(got["od"], StateDict) and list(got["od"]) == ["z", "a"]


@pytest.mark.parametrize("protocol", [0, 1])
def test_legacy_protocols_refused(protocol: int) -> None:
    with pytest.raises(InputError, match="refused: not a pickle of protocol 2 or later"):
        loads(pickle.dumps({"a": 1}, protocol=protocol), "x.pkl")


def test_memo_shares_objects_as_pickle_does() -> None:
    inner = [1, 2]
    got = loads(pickle.dumps({"a": inner, "b": inner}, protocol=4), "x")
    assert isinstance(got, dict) and got["a"] is got["b"]


@pytest.mark.parametrize("protocol", [2, 4])
def test_tensor_stand_ins(protocol: int) -> None:
    t = T.of(np.arange(12, dtype=np.float32).reshape(3, 4))
    view = T(t.storage, 1, (3,), (4,))
    pkl, _ = dumps({"w": t, "col": view, "step": 3}, protocol)
    got = loads(pkl, "x.pt")
    assert isinstance(got, dict)
    w, col = got["w"], got["col"]
    assert isinstance(w, TensorRef) and isinstance(col, TensorRef)
    assert w.storage is col.storage and w.storage == StorageRef("0", DTYPES["float32"], 48, "cpu")
    assert (w.offset, w.shape, w.stride, w.dtype.name) == (0, (3, 4), (4, 1), "float32")
    assert (col.offset, col.shape, col.stride) == (1, (3,), (4,))
    assert got["step"] == 3


def test_walk_flattens_to_dotted_names() -> None:
    got = list(walk({"grads": {"w": 1, "l": [2, {"x": 3}]}, "s": 4}, "p"))
    assert got == [("grads.w", 1), ("grads.l.0", 2), ("grads.l.1.x", 3), ("s", 4)]


# --- hostile pickles: refused with the exact message, nothing executed ---------------------------

def _marker_payload(marker: Path, module: str, name: str, protocol: int = 2) -> bytes:
    return b"\x80" + bytes([protocol]) + global_(module, name, protocol) + unicode(f"touch {marker}") + b"\x85R."


def test_os_system_payload_is_live_with_pickle_and_refused_here(tmp_path: Path) -> None:
    marker = tmp_path / "pwned"
    payload = _marker_payload(marker, "os", "system")
    pickle.loads(payload)  # the real unpickler runs it: the payload works
    assert marker.exists()
    marker.unlink()
    with pytest.raises(InputError, match=rf"^x.pt: refused: the pickle references os.system {REFUSED}$"):
        loads(payload, "x.pt")
    assert not marker.exists()


@pytest.mark.parametrize(("module", "name"), [
    ("os", "system"), ("posix", "system"), ("builtins", "eval"), ("builtins", "exec"), ("builtins", "getattr"),
    ("builtins", "__import__"), ("subprocess", "call"), ("torch", "load"), ("torch._tensor", "_rebuild_from_type_v2"),
    ("collections", "defaultdict"), ("builtins", "object"), ("copyreg", "_reconstructor"),
])
@pytest.mark.parametrize("protocol", [2, 4])
def test_dangerous_globals_refused(tmp_path: Path, module: str, name: str, protocol: int) -> None:
    marker = tmp_path / "pwned"
    with pytest.raises(InputError, match=rf"refused: the pickle references {module}.{name} {REFUSED}"):
        loads(_marker_payload(marker, module, name, protocol), "x.pt")
    assert not marker.exists()


def test_refusal_comes_before_any_call(tmp_path: Path) -> None:
    """getattr(builtins, 'exec') built by a chain: refused at the first global, before REDUCE."""
    marker = tmp_path / "m"
    chain = (b"\x80\x02" + global_("builtins", "getattr", 2) + global_("builtins", "__import__", 2)
             + unicode("os") + b"\x85R" + unicode("system") + b"\x86R" + unicode(f"touch {marker}") + b"\x85R.")
    with pytest.raises(InputError, match=rf"references builtins.getattr {REFUSED}"):
        loads(chain, "x")
    assert not marker.exists()


@pytest.mark.parametrize(("body", "message"), [
    (global_("torch", "float32", 2) + b")R", "calls a DType that is not an allowed callable"),
    (unicode("os.system") + b")R", "calls a str that is not an allowed callable"),
    (b"]" + b")R", "calls a list"),
    (b"}" + b"}b", r"sets the state of a dict \(BUILD"),
    (b"]" + b"}b", "sets the state of a list"),
    (global_("torch", "device", 2) + unicode("cpu") + b"\x85R}b", "sets the state of a Device"),
    (global_("collections", "OrderedDict", 2) + b")R" + unicode("x") + b"b", "the state of an OrderedDict must be"),
    (global_("torch", "Size", 2) + b"(" + unicode("a") + b"t\x85R", "torch.Size must be an integer"),
    (global_("torch", "Size", 2) + b"(K\x01K\x02t" + b"\x81", "bad arguments to torch.Size"),  # NEWOBJ
    (global_("collections", "OrderedDict", 2) + b"(K\x01t\x85R", "OrderedDict takes a list of pairs"),
    (global_("builtins", "set", 2) + b"(]]\x85t\x85R", "unhashable"),
    (global_("_codecs", "encode", 2) + unicode("x") + unicode("rot13") + b"\x86R", "only for latin-1"),
    (global_("_codecs", "encode", 2) + unicode("\u2603") + unicode("latin1") + b"\x86R", "bad arguments to _codecs"),
    (b"(" + unicode("storage") + global_("torch", "FloatStorage", 2) + unicode("../../etc/passwd")
     + unicode("cpu") + b"K\x01tQ", "not a plain member name"),
    (b"(" + unicode("module") + unicode("os") + b"\x86Q", "a persistent id that is not a torch storage"),
    (unicode("x") + b"Q", "a persistent id that is not a torch storage"),
    (b"]" + b"K\x01K\x02" + b"s", "SETITEM on a list"),
    (b"}" + b"(K\x01e", "APPENDS on a dict"),
    (b"}" + b"(K\x01\x90", "ADDITEMS on a dict"),
    (b"}" + b"(]K\x01u", "unhashable list as a dict key"),
    (b"\x82\x01", "pickle opcode EXT1"),
    (b"(cos\nsystem\ni", "references os.system"),
    (b"(" + global_("builtins", "set", 2) + b"o", "pickle opcode OBJ"),
    (b"\x97", "pickle opcode NEXT_BUFFER"),
    (b"I1\n", "pickle opcode INT"),
    (b"Pfoo\n", "pickle opcode PERSID"),
    (b"\x8b" + struct.pack("<i", 1 << 20) + b"\x01" * 10, "an integer of 1048576 bytes"),
])
def test_hostile_opcodes_refused(body: bytes, message: str) -> None:
    with pytest.raises(InputError, match=rf"refused: .*{message}"):
        loads(b"\x80\x02" + body + b".", "x.pt")


@pytest.mark.parametrize(("body", "message"), [
    (b"h\x05", "memo entry 5 is read before it is written"),
    (b"0", "stack underflow"),
    (b"(0", "STOP leaves 0 objects"),  # POP of the mark itself is allowed, then the STOP has nothing
    (b"K\x01(q\x00", "stack underflow"),  # BINPUT may not reach below a mark
    (b"t", "no mark"),
    (b"X" + struct.pack("<I", 1 << 31), "runs past its end"),
    (b"\x8d" + struct.pack("<Q", 1 << 63), "runs past its end"),
    (b"\x8e" + struct.pack("<Q", (1 << 64) - 1), "runs past its end"),
    (b"\x95" + struct.pack("<Q", 1 << 62), "a frame of"),
    (b"K\x01K\x02", "STOP leaves 2 objects"),
    (b"\xff", "unknown opcode"),
    (b"\x80\x02", "a second PROTO"),
    (b"X\x02\x00\x00\x00\xff\xfe", "not UTF-8"),
    (b"c" + b"a" * 600, "a GLOBAL without its two lines"),
])
def test_corrupt_pickles(body: bytes, message: str) -> None:
    with pytest.raises(InputError, match=f"corrupt pickle: .*{message}"):
        loads(b"\x80\x02" + body + b".", "x.pt")


def test_truncated_and_trailing() -> None:
    good = pickle.dumps({"a": [1, 2, 3]}, protocol=2)
    for cut in range(3, len(good)):
        with pytest.raises(InputError, match="corrupt pickle"):
            loads(good[:cut], "x")
    with pytest.raises(InputError, match="1 bytes after its STOP"):
        loads(good + b"N", "x")


def test_exponential_dup_tree_is_refused_fast() -> None:
    """t = (t, t) 80 times: 2**80 elements to hash or compare; refused by weight, in no time."""
    t0 = time.perf_counter()
    with pytest.raises(InputError, match="refused: a tuple of more than"):
        loads(b"\x80\x04)" + b"2\x86" * 80 + b".", "x")
    assert time.perf_counter() - t0 < 1


def test_deep_tuples_refused_before_hashing() -> None:
    data = b"\x80\x04)" + b"\x85" * 100_000 + b"\x94}(K\x01h\x00u0."  # a 100,000-deep tuple as a dict key
    with pytest.raises(InputError, match=f"refused: tuples nested more than {limits.MAX_PICKLE_DEPTH} deep"):
        loads(data, "x")


def test_deep_marks_refused_at_once() -> None:
    t0 = time.perf_counter()
    with pytest.raises(InputError, match=f"refused: marks nested more than {limits.MAX_PICKLE_DEPTH} deep"):
        loads(b"\x80\x04" + b"](" * 1_000_000 + b"e" * 1_000_000 + b".", "x")
    assert time.perf_counter() - t0 < 2


def test_deep_lists_and_cycles_refused_by_walk() -> None:
    deep = loads(b"\x80\x04" + b"]" * 50_000 + b"a" * 49_999 + b".", "x")  # nested without marks: never recursed
    with pytest.raises(InputError, match="containers nested more than"):
        list(walk(deep, "x"))
    cyc = loads(b"\x80\x04]\x94h\x00a.", "x")  # l = []; l.append(l)
    assert isinstance(cyc, list) and cyc[0] is cyc
    with pytest.raises(InputError, match="or containing themselves"):
        list(walk(cyc, "x"))


def test_shared_containers_cannot_explode_the_walk(monkeypatch: pytest.MonkeyPatch) -> None:
    """l1 = [l0, l0], l2 = [l1, l1] ... 60 levels: 2**60 paths, refused by the entry budget."""
    monkeypatch.setattr(limits, "MAX_TENSORS", 10_000)
    body = b"]\x940"  # memo 0: []
    for i in range(60):
        body += b"](h" + bytes([i]) + b"h" + bytes([i]) + b"e\x940"
    data = b"\x80\x04" + body + b"h" + bytes([60]) + b"."
    t0 = time.perf_counter()
    with pytest.raises(InputError, match="hold more than"):
        list(walk(loads(data, "x"), "x"))
    assert time.perf_counter() - t0 < 10


def test_huge_memo_index_costs_nothing() -> None:
    data = b"\x80\x02K\x07r\xff\xff\xff\xff0j\xff\xff\xff\xff."
    assert loads(data, "x") == 7


@pytest.mark.parametrize(("offset", "shape", "stride", "numel", "message"), [
    (0, (4,), (1,), 3, "reaches element 3 of a storage of 3"),
    (3, (1,), (1,), 3, "reaches element 3"),
    (0, (2, 2), (2, 1), 3, "reaches element 3"),
    (0, (3,), (1 << 62,), 3, "reaches element"),
    (-1, (1,), (1,), 3, "a storage offset must be an integer >= 0"),
    (0, (-1,), (1,), 3, "a tensor's size must be an integer >= 0"),
    (0, (2,), (-1,), 3, "a stride must be an integer >= 0"),
    (0, (2, 2), (1,), 4, "2 dimensions has 1 strides"),
    (0, (1,) * 65, (1,) * 65, 4, "at most 64 integers"),
])
def test_tensor_views_checked(offset: int, shape: tuple[int, ...], stride: tuple[int, ...], numel: int,
                              message: str) -> None:
    pid = b"(" + unicode("storage") + global_("torch", "FloatStorage", 2) + unicode("0") + unicode("cpu") \
        + integer(numel) + b"tQ"

    def tup(v: tuple[int, ...]) -> bytes:
        return b"(" + b"".join(integer(x) for x in v) + b"t"
    data = (b"\x80\x02" + global_("torch._utils", "_rebuild_tensor_v2", 2) + b"(" + pid + integer(offset) + tup(shape)
            + tup(stride) + b"\x89" + global_("collections", "OrderedDict", 2) + b")Rt" + b"R.")
    with pytest.raises(InputError, match=f"refused: .*{message}"):
        loads(data, "x.pt")


def test_empty_view_may_point_anywhere() -> None:
    pkl, _ = dumps({"e": T.of(np.zeros((0, 3), np.float32))})
    got = loads(pkl, "x")
    assert isinstance(got, dict) and got["e"].shape == (0, 3) and got["e"].numel == 0


def test_a_storage_declared_with_two_types_is_refused() -> None:
    a = T.of(np.zeros(4, np.float32))
    b = T.of(np.zeros(4, np.int32))
    pkl, _ = dumps({"a": a, "b": b})
    pkl = pkl.replace(unicode("1"), unicode("0"))  # b's storage key becomes a's
    with pytest.raises(InputError, match="storage '0' is declared twice with different types"):
        loads(pkl, "x")


def test_limit_on_pickle_size(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(limits, "MAX_PICKLE", 100)
    with pytest.raises(InputError, match="exceeds the 0 MiB limit"):
        loads(pickle.dumps(list(range(100)), protocol=2), "x")


# --- the extension point -------------------------------------------------------------------------

class _Point(Stateful):
    def __init__(self) -> None:
        self.x = self.y = 0

    def set_state(self, state: object) -> None:
        if not isinstance(state, dict) or set(state) != {"x", "y"}:
            raise UnpickleError("a Point's state is {x, y}")
        self.x, self.y = state["x"], state["y"]


def _new_point(*args: object) -> _Point:
    if args:
        raise UnpickleError("Point takes no arguments")
    return _Point()


def test_extra_globals_extend_the_allow_list() -> None:
    pkl = b"\x80\x04" + global_("geo", "Point", 4) + b")\x81}(" + unicode("x") + b"K\x01" + unicode("y") \
        + b"K\x02ub."  # what pickle writes for a plain class: NEWOBJ then BUILD
    with pytest.raises(InputError, match=rf"references geo.Point {REFUSED}"):
        loads(pkl, "x")
    got = Unpickler(pkl, "x", extra_globals={("geo", "Point"): _new_point}, reads="points").load()
    assert isinstance(got, _Point) and (got.x, got.y) == (1, 2)
    bad = pkl.replace(unicode("y"), unicode("z"))
    with pytest.raises(InputError, match=r"refused: a Point's state is \{x, y\} \(only points are read\)"):
        Unpickler(bad, "x", extra_globals={("geo", "Point"): _new_point}, reads="points").load()


def test_persistent_load_is_replaceable() -> None:
    seen: list[object] = []

    def pl(pid: object) -> object:
        seen.append(pid)
        return "loaded"
    got = Unpickler(b"\x80\x02" + unicode("abc") + b"Q.", "x", persistent_load=pl).load()
    assert got == "loaded" and seen == ["abc"]


def test_no_code_is_imported_or_run() -> None:
    """Every call the machine can make is a stand-in of gradinspect's own module."""
    import gradinspect.sources.unpickle as up
    for value in up.TORCH_GLOBALS.values():
        if callable(value):
            assert getattr(value, "__module__", None) == up.__name__
