"""A restricted pickle reader: tensors and plain containers, and nothing from the file is ever run.

Why it is safe.  This is not :class:`pickle.Unpickler` with a filter: it is a small pickle
virtual machine of its own (pure Python, no ``pickle`` import) with an opcode allow-list.

- **What can be called.**  Only the values of the allow-list, a mapping from ``(module, name)`` to
  gradinspect's *own* stand-ins (:data:`TORCH_GLOBALS`, extended per reader through
  ``extra_globals``).  ``GLOBAL``/``STACK_GLOBAL`` look the pair up in that mapping and push the
  stand-in; a pair not in it is refused at once (``refused: the pickle references os.system
  (only tensors and plain containers are read)``) so nothing after it runs.  No module is
  imported, no attribute is looked up by a name from the file: torch is never imported.
  ``REDUCE``, ``NEWOBJ`` and ``NEWOBJ_EX`` call only a callable of the allow-list (by identity),
  with arguments the machine built: primitives, lists, tuples, dicts, sets and stand-ins.  The
  stand-ins check their arguments and have no side effects (they return descriptions).
- **What the machine does itself.**  ``APPEND(S)`` only on real lists, ``SETITEM(S)`` only on
  dicts, ``ADDITEMS`` only on real sets (never a method looked up on an object), ``BUILD`` only
  on a :class:`Stateful` stand-in (the ``OrderedDict`` stand-in takes the ``_metadata`` that
  ``state_dict()`` writes; other stand-ins refuse).  Persistent ids (torch storages) go to the
  reader's own ``persistent_load`` (:func:`torch_persistent_load` by default).  Refused
  outright: extension codes (``EXT*``), ``INST``/``OBJ``, out-of-band buffers, protocol 0/1
  text opcodes, Python 2 strings.  Protocols 2 to 5 are read.
- **Limits.**  The pickle is held in memory (at most ``limits.MAX_PICKLE`` bytes) and every
  opcode reads its operands from it, so no length field can make it allocate more than the
  pickle's own size; the stack, the marks and the memo (a dict: a huge ``BINPUT`` index costs
  nothing) grow by at most one entry per opcode.  Integers are at most 32 bytes long.  Marks
  (open containers) and tuples nest at most ``limits.MAX_PICKLE_DEPTH`` deep; a tuple counts at
  most ``limits.MAX_PICKLE_WEIGHT`` elements with repetitions (hashing or comparing one is
  bounded: no exponential ``DUP`` trees, no C-stack overflow); lists and dicts may nest (by
  ``APPEND``) or be cyclic, and whoever walks the result bounds its depth (see :func:`walk`).
  The machine never recurses.  Every problem is an :class:`~gradinspect.errors.InputError`,
  never another exception.

Extension point: ``Unpickler(data, path, extra_globals={("pkg.mod", "Name"): stand_in})``.  A
callable stand-in is called as ``stand_in(*args)`` by ``REDUCE`` and ``NEWOBJ`` (a class is
called too: give it an ``__init__`` that checks its arguments, or make the stand-in a function);
to accept ``BUILD`` the object it returns subclasses :class:`Stateful`.  A non-callable value
(a dtype) is pushed as it is.  Stand-ins raise :class:`UnpickleError` to refuse.
"""

from __future__ import annotations

import struct
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any

from ..errors import InputError
from . import limits

__all__ = [
    "Unpickler", "UnpickleError", "Stateful", "StateDict", "DType", "StorageType", "StorageRef", "TensorRef",
    "Device", "TORCH_GLOBALS", "DTYPES", "torch_persistent_load", "walk", "loads",
]

_MAX_INT_BYTES = 32
_MAX_DIMS = 64


class UnpickleError(Exception):
    """Raised by a stand-in that refuses its arguments (the reader reports it as an InputError)."""


class Stateful:
    """A stand-in that accepts ``BUILD``: the pickle's state goes to :meth:`set_state`."""

    def set_state(self, state: object) -> None:
        raise UnpickleError(f"the pickle sets the state of a {type(self).__name__}")


class StateDict(dict[Any, Any], Stateful):
    """``collections.OrderedDict`` (a dict keeps its order); ``state_dict()``'s ``_metadata`` is kept, unused."""

    state: object = None

    def set_state(self, state: object) -> None:
        if not isinstance(state, dict) or not all(isinstance(k, str) for k in state):
            raise UnpickleError("the state of an OrderedDict must be a dict of attributes")
        self.state = state


@dataclass(frozen=True, slots=True)
class DType:
    """A torch dtype: its torch name, numpy's name (None: no numpy equivalent), its size in bytes."""

    name: str
    numpy: str | None
    itemsize: int


@dataclass(frozen=True, slots=True)
class StorageType:
    """A storage class (``torch.FloatStorage``: its dtype; ``torch.storage.UntypedStorage``: bytes)."""

    name: str
    dtype: DType | None


@dataclass(frozen=True, slots=True)
class StorageRef:
    """A storage the pickle names by key (its bytes are the archive member ``data/<key>``)."""

    key: str
    dtype: DType | None  # None: untyped (bytes)
    nbytes: int
    location: str


@dataclass(frozen=True, slots=True)
class TensorRef:
    """A tensor: a view (element offset, shape, strides in elements) of a storage, as ``torch.load`` builds it."""

    storage: StorageRef
    dtype: DType
    offset: int
    shape: tuple[int, ...]
    stride: tuple[int, ...]

    @property
    def numel(self) -> int:
        n = 1
        for s in self.shape:
            n *= s
        return n


@dataclass(frozen=True, slots=True)
class Device:
    type: str
    index: int | None = None


_DT = [  # torch name, numpy name, itemsize, legacy storage class
    ("float64", "float64", 8, "DoubleStorage"), ("float32", "float32", 4, "FloatStorage"),
    ("float16", "float16", 2, "HalfStorage"), ("bfloat16", "bfloat16", 2, "BFloat16Storage"),
    ("float8_e4m3fn", "float8_e4m3fn", 1, None), ("float8_e5m2", "float8_e5m2", 1, None),
    ("float8_e4m3fnuz", "float8_e4m3fnuz", 1, None), ("float8_e5m2fnuz", "float8_e5m2fnuz", 1, None),
    ("float8_e8m0fnu", "float8_e8m0fnu", 1, None),
    ("int64", "int64", 8, "LongStorage"), ("int32", "int32", 4, "IntStorage"), ("int16", "int16", 2, "ShortStorage"),
    ("int8", "int8", 1, "CharStorage"), ("uint8", "uint8", 1, "ByteStorage"), ("bool", "bool", 1, "BoolStorage"),
    ("uint16", "uint16", 2, None), ("uint32", "uint32", 4, None), ("uint64", "uint64", 8, None),
    ("complex64", "complex64", 8, "ComplexFloatStorage"), ("complex128", "complex128", 16, "ComplexDoubleStorage"),
    ("complex32", None, 4, None),
]
DTYPES: dict[str, DType] = {name: DType(name, np_name, size) for name, np_name, size, _ in _DT}
"""torch dtypes by torch name (``torch.float32`` is pickled as the global ``torch float32``)."""


def _int(x: object, what: str, lo: int = 0) -> int:
    if type(x) is not int or x < lo:
        raise UnpickleError(f"{what} must be an integer >= {lo}")
    return x


def _ints(x: object, what: str) -> tuple[int, ...]:
    if not isinstance(x, tuple | list) or len(x) > _MAX_DIMS:
        raise UnpickleError(f"{what} must be a tuple of at most {_MAX_DIMS} integers")
    return tuple(_int(v, what) for v in x)


def _view(storage: object, offset: object, size: object, stride: object, dtype: DType) -> TensorRef:
    if not isinstance(storage, StorageRef):
        raise UnpickleError("a tensor's storage is not a storage")
    off, shape, strides = _int(offset, "a storage offset"), _ints(size, "a tensor's size"), _ints(stride, "a stride")
    if len(shape) != len(strides):
        raise UnpickleError(f"a tensor of {len(shape)} dimensions has {len(strides)} strides")
    t = TensorRef(storage, dtype, off, shape, strides)
    if t.numel:
        last = off + sum((n - 1) * s for n, s in zip(shape, strides, strict=True))
        have = storage.nbytes // dtype.itemsize
        if last >= have:
            raise UnpickleError(f"a tensor view (offset {off}, size {list(shape)}, strides {list(strides)}) reaches "
                                f"element {last} of a storage of {have} {dtype.name} elements")
    return t


def _hooks(requires_grad: object, hooks: object) -> None:
    if type(requires_grad) is not bool or not isinstance(hooks, dict):
        raise UnpickleError("bad requires_grad or backward hooks")


def _rebuild_tensor_v2(storage: object, offset: object, size: object, stride: object, requires_grad: object,
                       hooks: object, metadata: object = None) -> TensorRef:
    _hooks(requires_grad, hooks)
    if not isinstance(storage, StorageRef) or storage.dtype is None:
        raise UnpickleError("_rebuild_tensor_v2 needs a typed storage")
    return _view(storage, offset, size, stride, storage.dtype)


def _rebuild_tensor_v3(storage: object, offset: object, size: object, stride: object, requires_grad: object,
                       hooks: object, dtype: object, metadata: object = None) -> TensorRef:
    _hooks(requires_grad, hooks)
    if not isinstance(dtype, DType):
        raise UnpickleError("_rebuild_tensor_v3 needs a dtype")
    return _view(storage, offset, size, stride, dtype)


def _rebuild_parameter(data: object, requires_grad: object, hooks: object, state: object = None) -> TensorRef:
    _hooks(requires_grad, hooks)
    if not isinstance(data, TensorRef):
        raise UnpickleError("a parameter's data is not a tensor")
    return data


def _ordered_dict(*args: object) -> StateDict:
    d = StateDict()
    if args:
        items = args[0]
        if len(args) > 1 or not isinstance(items, list | tuple) or not all(
                type(p) is tuple and len(p) == 2 for p in items):
            raise UnpickleError("OrderedDict takes a list of pairs")
        for k, v in items:
            d[k] = v
    return d


def _size(dims: object) -> tuple[int, ...]:
    return _ints(dims, "torch.Size")


def _device(kind: object, index: object = None) -> Device:
    if not isinstance(kind, str) or len(kind) > 64 or not (index is None or type(index) is int):
        raise UnpickleError("torch.device takes a name and an index")
    return Device(kind, index)


def _encode(text: object, encoding: object = "utf-8") -> bytes:
    if not isinstance(text, str) or encoding not in ("latin1", "latin-1"):
        raise UnpickleError("_codecs.encode is read only for latin-1 text (bytes in protocol 2)")
    return text.encode("latin-1")


def _set(items: object = ()) -> set[Any]:
    if not isinstance(items, list | tuple):
        raise UnpickleError("set takes a list")
    return set(items)  # the elements were checked hashable where the list was built


def _frozenset(items: object = ()) -> frozenset[Any]:
    return frozenset(_set(items))


TORCH_GLOBALS: dict[tuple[str, str], object] = {
    ("collections", "OrderedDict"): _ordered_dict,
    ("builtins", "set"): _set,
    ("builtins", "frozenset"): _frozenset,
    ("__builtin__", "set"): _set,  # protocol 2 spells builtins the Python 2 way
    ("__builtin__", "frozenset"): _frozenset,
    ("_codecs", "encode"): _encode,
    ("torch._utils", "_rebuild_tensor_v2"): _rebuild_tensor_v2,
    ("torch._utils", "_rebuild_tensor_v3"): _rebuild_tensor_v3,
    ("torch._utils", "_rebuild_parameter"): _rebuild_parameter,
    ("torch._utils", "_rebuild_parameter_with_state"): _rebuild_parameter,
    ("torch", "Size"): _size,
    ("torch", "device"): _device,
    ("torch.storage", "UntypedStorage"): StorageType("UntypedStorage", None),
    ("torch", "UntypedStorage"): StorageType("UntypedStorage", None),
    **{("torch", name): DTYPES[name] for name in DTYPES},
    **{("torch", cls): StorageType(cls, DTYPES[name]) for name, _, _, cls in _DT if cls},
}
"""What torch's ``weights_only`` loader needs for tensors and plain containers, as gradinspect's stand-ins."""


def torch_persistent_load(pid: object, storages: dict[str, StorageRef]) -> StorageRef:
    """``('storage', storage type, key, location, numel)`` as ``torch.save`` writes it; one ref per key."""
    if not (type(pid) is tuple and len(pid) == 5 and pid[0] == "storage"):
        raise UnpickleError("a persistent id that is not a torch storage")
    _, stype, key, location, numel = pid
    if not isinstance(stype, StorageType) or not isinstance(key, str) or not isinstance(location, str):
        raise UnpickleError("a malformed torch storage id")
    if not key or len(key) > 256 or not all(c.isalnum() or c in "_-." for c in key) or key in (".", ".."):
        raise UnpickleError(f"a storage key {key[:80]!r} that is not a plain member name")
    n = _int(numel, "a storage size")
    nbytes = n * (stype.dtype.itemsize if stype.dtype else 1)
    if nbytes > limits.MAX_USIZE:
        raise UnpickleError(f"storage {key!r} of {n} elements overflows")
    ref = StorageRef(key, stype.dtype, nbytes, location)
    old = storages.setdefault(key, ref)
    if (old.dtype, old.nbytes) != (ref.dtype, ref.nbytes):
        raise UnpickleError(f"storage {key!r} is declared twice with different types or sizes")
    return old


def _safe(name: str) -> str:
    name = name if len(name) <= 100 else name[:100] + "..."
    return name if name.isprintable() else repr(name)


_MARK, _STOP = object(), object()
# opcodes this machine reads, by byte
_NAMES = {
    b"(": "MARK", b".": "STOP", b"0": "POP", b"1": "POP_MARK", b"2": "DUP", b"N": "NONE", b"\x88": "NEWTRUE",
    b"\x89": "NEWFALSE", b"J": "BININT", b"K": "BININT1", b"M": "BININT2", b"\x8a": "LONG1", b"\x8b": "LONG4",
    b"G": "BINFLOAT", b"X": "BINUNICODE", b"\x8c": "SHORT_BINUNICODE", b"\x8d": "BINUNICODE8", b"B": "BINBYTES",
    b"C": "SHORT_BINBYTES", b"\x8e": "BINBYTES8", b"\x96": "BYTEARRAY8", b")": "EMPTY_TUPLE", b"t": "TUPLE",
    b"\x85": "TUPLE1", b"\x86": "TUPLE2", b"\x87": "TUPLE3", b"]": "EMPTY_LIST", b"l": "LIST", b"a": "APPEND",
    b"e": "APPENDS", b"}": "EMPTY_DICT", b"d": "DICT", b"s": "SETITEM", b"u": "SETITEMS", b"\x8f": "EMPTY_SET",
    b"\x90": "ADDITEMS", b"\x91": "FROZENSET", b"c": "GLOBAL", b"\x93": "STACK_GLOBAL", b"R": "REDUCE",
    b"\x81": "NEWOBJ", b"\x92": "NEWOBJ_EX", b"b": "BUILD", b"q": "BINPUT", b"r": "LONG_BINPUT",
    b"\x94": "MEMOIZE", b"h": "BINGET", b"j": "LONG_BINGET", b"Q": "BINPERSID", b"\x95": "FRAME",
    b"\x80": "PROTO",
}
_REFUSED = {  # opcodes of pickle that are refused, by byte (for the message)
    b"I": "INT", b"L": "LONG", b"F": "FLOAT", b"S": "STRING", b"V": "UNICODE", b"T": "BINSTRING",
    b"U": "SHORT_BINSTRING", b"p": "PUT", b"g": "GET", b"P": "PERSID", b"i": "INST", b"o": "OBJ",
    b"\x82": "EXT1", b"\x83": "EXT2", b"\x84": "EXT4", b"\x97": "NEXT_BUFFER", b"\x98": "READONLY_BUFFER",
}


class Unpickler:
    """Read one pickle (protocols 2 to 5) into plain containers and stand-ins; see the module docstring."""

    def __init__(self, data: bytes, path: str, extra_globals: Mapping[tuple[str, str], object] | None = None,
                 persistent_load: Callable[[object], object] | None = None,
                 reads: str = "tensors and plain containers") -> None:
        self.data, self.path, self.reads = data, path, reads
        self.globals: dict[tuple[str, str], object] = {**TORCH_GLOBALS, **(extra_globals or {})}
        self._callables: dict[int, Callable[..., object]] = {id(v): v for v in self.globals.values() if callable(v)}
        self._names = {id(v): f"{m}.{n}" for (m, n), v in reversed(self.globals.items()) if callable(v)}
        self.storages: dict[str, StorageRef] = {}
        self._persistent = persistent_load or (lambda pid: torch_persistent_load(pid, self.storages))
        self._tuples: dict[int, tuple[int, int, object]] = {}  # id -> (depth, weight, the tuple kept alive)

    def _err(self, problem: str) -> InputError:
        return InputError(self.path, problem)

    def _refuse(self, problem: str) -> InputError:
        return InputError(self.path, f"refused: {problem} (only {self.reads} are read)")

    # --- hashing stays bounded: tuples' depth and weight are known --------------------------------

    def _measure(self, obj: object) -> tuple[int, int]:
        if type(obj) is not tuple:
            return 0, 1
        known = self._tuples.get(id(obj))
        if known is not None:
            return known[0], known[1]
        depth, weight = 1, 1  # a tuple a stand-in built (of primitives, or of tuples the machine measured)
        for item in obj:
            d, w = self._measure(item)
            depth, weight = max(depth, d + 1), weight + w
        return self._keep(obj, depth, weight)

    def _keep(self, t: tuple[Any, ...], depth: int, weight: int) -> tuple[int, int]:
        if depth > limits.MAX_PICKLE_DEPTH:
            raise self._err(f"refused: tuples nested more than {limits.MAX_PICKLE_DEPTH} deep")
        if weight > limits.MAX_PICKLE_WEIGHT:
            raise self._err(f"refused: a tuple of more than {limits.MAX_PICKLE_WEIGHT} elements "
                            "counting the ones it nests")
        self._tuples[id(t)] = (depth, weight, t)
        return depth, weight

    def _tuple(self, items: list[Any]) -> tuple[Any, ...]:
        t = tuple(items)
        depth, weight = 1, 1
        for item in t:
            if type(item) is tuple:
                d, w = self._measure(item)
                depth, weight = max(depth, d + 1), weight + w
            else:
                weight += 1
        self._keep(t, depth, weight)
        return t

    def _key(self, key: object) -> object:
        """``key`` if hashing it is cheap and works (dict keys, set elements)."""
        if isinstance(key, (list, dict, set)):
            raise self._err(f"refused: an unhashable {type(key).__name__} as a dict key or set element")
        if type(key) is tuple:
            self._measure(key)
        try:
            hash(key)
        except TypeError:
            raise self._err("refused: an unhashable dict key or set element") from None
        return key

    # --- the machine ------------------------------------------------------------------------------

    def load(self) -> object:
        data = self.data
        if len(data) > limits.MAX_PICKLE:
            raise self._err(f"a pickle of {len(data)} bytes exceeds the {limits.MAX_PICKLE >> 20} MiB limit")
        if len(data) < 3 or data[0] != 0x80:
            raise self._err("refused: not a pickle of protocol 2 or later (legacy protocols are not read)")
        if not 2 <= data[1] <= 5:
            raise self._err(f"refused: pickle protocol {data[1]} (protocols 2 to 5 are read)")
        try:
            return self._run(data)
        except InputError:
            raise
        except UnpickleError as e:
            raise self._refuse(str(e)) from None
        except (IndexError, struct.error):
            raise self._err("corrupt pickle: it ends in the middle of an opcode") from None
        except (RecursionError, MemoryError):
            raise self._err("refused: the pickle is too large or too deeply nested") from None

    def _run(self, data: bytes) -> object:
        stack: list[Any] = []
        marks: list[int] = []
        memo: dict[int, Any] = {}
        pos, end = 2, len(data)
        unpack_from = struct.unpack_from

        def pop() -> Any:
            if len(stack) <= (marks[-1] if marks else 0):
                raise self._err(f"corrupt pickle: stack underflow at byte {at}")
            return stack.pop()

        def top() -> Any:
            if len(stack) <= (marks[-1] if marks else 0):
                raise self._err(f"corrupt pickle: stack underflow at byte {at}")
            return stack[-1]

        def pop_mark() -> list[Any]:
            if not marks:
                raise self._err(f"corrupt pickle: no mark at byte {at}")
            m = marks.pop()
            items = stack[m:]
            del stack[m:]
            return items

        def take(n: int) -> bytes:
            nonlocal pos
            if n < 0 or pos + n > end:
                raise self._err(f"corrupt pickle: an operand of {n} bytes at byte {pos} runs past its end")
            b = data[pos : pos + n]
            pos += n
            return b

        def text(n: int) -> str:
            try:
                return take(n).decode("utf-8", "surrogatepass")
            except UnicodeDecodeError:
                raise self._err(f"corrupt pickle: a string that is not UTF-8 at byte {at}") from None

        def glob(module: object, name: object) -> object:
            if not isinstance(module, str) or not isinstance(name, str):
                raise self._err(f"corrupt pickle: a global that is not named by strings at byte {at}")
            key = (module, name)
            if key not in self.globals:
                raise self._refuse(f"the pickle references {_safe(module)}.{_safe(name)}")
            return self.globals[key]

        def call(fn: object, args: object, kwargs: object = None) -> object:
            target = self._callables.get(id(fn))
            if target is None or target is not fn:  # only a value of the allow-list, by identity
                raise self._refuse(f"the pickle calls a {type(fn).__name__} that is not an allowed callable")
            if type(args) is not tuple or not (kwargs is None or (
                    type(kwargs) is dict and all(isinstance(k, str) for k in kwargs))):
                raise self._err(f"corrupt pickle: a call's arguments are not a tuple at byte {at}")
            name = _safe(self._names[id(fn)])
            if (fn is _set or fn is _frozenset) and args and isinstance(args[0], list | tuple):
                for item in args[0]:
                    self._key(item)
            try:
                out = target(*args, **(kwargs or {}))
            except (TypeError, ValueError, OverflowError):
                raise self._refuse(f"bad arguments to {name}") from None
            except UnpickleError as e:
                raise self._refuse(str(e)) from None
            return out

        while True:
            at = pos
            if pos >= end:
                raise self._err("corrupt pickle: it ends without a STOP opcode")
            op = data[pos : pos + 1]
            pos += 1
            name = _NAMES.get(op)
            if name is None:
                known = _REFUSED.get(op)
                if known is None:
                    raise self._err(f"corrupt pickle: unknown opcode {op!r} at byte {at}")
                raise self._refuse(f"pickle opcode {known} at byte {at}")
            if name == "BINPUT" or name == "LONG_BINPUT" or name == "MEMOIZE":
                idx = (data[pos] if name == "BINPUT" else unpack_from("<I", data, pos)[0]) if name != "MEMOIZE" \
                    else len(memo)
                pos += 1 if name == "BINPUT" else 4 if name == "LONG_BINPUT" else 0
                memo[idx] = top()
            elif name == "BINGET" or name == "LONG_BINGET":
                idx = data[pos] if name == "BINGET" else unpack_from("<I", data, pos)[0]
                pos += 1 if name == "BINGET" else 4
                if idx not in memo:
                    raise self._err(f"corrupt pickle: memo entry {idx} is read before it is written (byte {at})")
                stack.append(memo[idx])
            elif name == "BINUNICODE" or name == "SHORT_BINUNICODE" or name == "BINUNICODE8":
                n, k = ((data[pos], 1) if name == "SHORT_BINUNICODE" else (unpack_from("<I", data, pos)[0], 4)
                        if name == "BINUNICODE" else (unpack_from("<Q", data, pos)[0], 8))
                pos += k
                stack.append(text(n))
            elif name == "BININT1":
                stack.append(data[pos])
                pos += 1
            elif name == "BININT2":
                stack.append(unpack_from("<H", data, pos)[0])
                pos += 2
            elif name == "BININT":
                stack.append(unpack_from("<i", data, pos)[0])
                pos += 4
            elif name == "LONG1" or name == "LONG4":
                n = data[pos] if name == "LONG1" else unpack_from("<i", data, pos)[0]
                pos += 1 if name == "LONG1" else 4
                if not 0 <= n <= _MAX_INT_BYTES:
                    raise self._refuse(f"an integer of {n} bytes at byte {at}")
                stack.append(int.from_bytes(take(n), "little", signed=True))
            elif name == "MARK":
                if len(marks) >= limits.MAX_PICKLE_DEPTH:  # a pickle nests its marks as its containers
                    raise self._err(f"refused: marks nested more than {limits.MAX_PICKLE_DEPTH} deep (byte {at})")
                marks.append(len(stack))
            elif name == "TUPLE":
                stack.append(self._tuple(pop_mark()))
            elif name == "EMPTY_TUPLE":
                stack.append(())
            elif name == "TUPLE1" or name == "TUPLE2" or name == "TUPLE3":
                k = 1 if name == "TUPLE1" else 2 if name == "TUPLE2" else 3
                items = [pop() for _ in range(k)][::-1]
                stack.append(self._tuple(items))
            elif name == "REDUCE":
                args = pop()
                stack.append(call(pop(), args))
            elif name == "BINPERSID":
                pid = pop()
                try:
                    stack.append(self._persistent(pid))
                except UnpickleError as e:
                    raise self._refuse(str(e)) from None
            elif name == "GLOBAL":
                nl = data.find(b"\n", pos, min(end, pos + 512))
                nl2 = data.find(b"\n", nl + 1, min(end, nl + 513)) if nl >= 0 else -1
                if nl2 < 0:
                    raise self._err(f"corrupt pickle: a GLOBAL without its two lines at byte {at}")
                module = text(nl - pos)
                pos += 1
                gname = text(nl2 - pos)
                pos += 1
                stack.append(glob(module, gname))
            elif name == "STACK_GLOBAL":
                gname = pop()
                stack.append(glob(pop(), gname))
            elif name == "NONE":
                stack.append(None)
            elif name == "NEWTRUE" or name == "NEWFALSE":
                stack.append(name == "NEWTRUE")
            elif name == "BINFLOAT":
                stack.append(unpack_from(">d", data, pos)[0])
                pos += 8
            elif name == "EMPTY_DICT":
                stack.append({})
            elif name == "EMPTY_LIST":
                stack.append([])
            elif name == "EMPTY_SET":
                stack.append(set())
            elif name == "SETITEM" or name == "SETITEMS":
                items = [pop(), pop()][::-1] if name == "SETITEM" else pop_mark()
                target = top()
                if not isinstance(target, dict) or len(items) % 2:
                    raise self._refuse(f"{name} on a {type(target).__name__} at byte {at}")
                for i in range(0, len(items), 2):
                    target[self._key(items[i])] = items[i + 1]
            elif name == "APPEND" or name == "APPENDS":
                items = [pop()] if name == "APPEND" else pop_mark()
                target = top()
                if type(target) is not list:
                    raise self._refuse(f"{name} on a {type(target).__name__} at byte {at}")
                target.extend(items)
            elif name == "ADDITEMS":
                items = pop_mark()
                target = top()
                if type(target) is not set:
                    raise self._refuse(f"ADDITEMS on a {type(target).__name__} at byte {at}")
                for item in items:
                    target.add(self._key(item))
            elif name == "FROZENSET":
                stack.append(frozenset(self._key(item) for item in pop_mark()))
            elif name == "LIST":
                stack.append(pop_mark())
            elif name == "DICT":
                items = pop_mark()
                if len(items) % 2:
                    raise self._err(f"corrupt pickle: DICT of an odd number of items at byte {at}")
                stack.append({self._key(items[i]): items[i + 1] for i in range(0, len(items), 2)})
            elif name == "BUILD":
                state = pop()
                obj = top()
                if not isinstance(obj, Stateful):
                    raise self._refuse(f"the pickle sets the state of a {type(obj).__name__} (BUILD at byte {at})")
                try:
                    obj.set_state(state)
                except UnpickleError as e:
                    raise self._refuse(str(e)) from None
            elif name == "NEWOBJ":
                args = pop()
                stack.append(call(pop(), args))
            elif name == "NEWOBJ_EX":
                kwargs = pop()
                args = pop()
                stack.append(call(pop(), args, kwargs))
            elif name == "BINBYTES" or name == "SHORT_BINBYTES" or name == "BINBYTES8" or name == "BYTEARRAY8":
                n, k = ((data[pos], 1) if name == "SHORT_BINBYTES" else (unpack_from("<I", data, pos)[0], 4)
                        if name == "BINBYTES" else (unpack_from("<Q", data, pos)[0], 8))
                pos += k
                stack.append(take(n))
            elif name == "POP":
                if marks and len(stack) == marks[-1]:
                    marks.pop()  # pickle's POP of a mark
                else:
                    pop()
            elif name == "POP_MARK":
                pop_mark()
            elif name == "DUP":
                stack.append(top())
            elif name == "FRAME":
                n = unpack_from("<Q", data, pos)[0]
                pos += 8
                if pos + n > end:
                    raise self._err(f"corrupt pickle: a frame of {n} bytes at byte {at} runs past its end")
            elif name == "PROTO":
                raise self._err(f"corrupt pickle: a second PROTO opcode at byte {at}")
            elif name == "STOP":
                if marks or len(stack) != 1:
                    raise self._err("corrupt pickle: STOP leaves "
                                    f"{len(stack)} objects and {len(marks)} marks, not one object")
                if pos != end:
                    raise self._err(f"corrupt pickle: {end - pos} bytes after its STOP opcode")
                return stack[0]
            else:  # pragma: no cover - every name of _NAMES is handled above
                raise AssertionError(name)


def loads(data: bytes, path: str, extra_globals: Mapping[tuple[str, str], object] | None = None) -> object:
    """One pickle with the torch allow-list (plus ``extra_globals``)."""
    return Unpickler(data, path, extra_globals).load()


def walk(obj: object, path: str, prefix: str = "") -> Iterator[tuple[str, object]]:
    """(dotted name, leaf) for every leaf under dicts, lists and tuples, in order ({"a": {"b": t}} -> "a.b").

    Keys are strings or integers.  Containers nest at most ``limits.MAX_PICKLE_DEPTH`` deep (a
    cycle is refused by that) and at most ``2 * limits.MAX_TENSORS`` entries are visited (a
    container shared many times over is refused by that).  Iterative: never a deep recursion.
    """
    todo: list[tuple[str, object, int]] = [(prefix, obj, 0)]
    budget = 2 * limits.MAX_TENSORS
    while todo:
        name, node, depth = todo.pop()
        if isinstance(node, dict | list | tuple):
            if depth >= limits.MAX_PICKLE_DEPTH:
                raise InputError(path, f"refused: containers nested more than {limits.MAX_PICKLE_DEPTH} deep "
                                 "(or containing themselves)")
            budget -= len(node)
            if budget < 0:
                raise InputError(path, f"refused: the pickle's containers hold more than {2 * limits.MAX_TENSORS} "
                                 "entries (counting shared ones each time)")
            items = node.items() if isinstance(node, dict) else enumerate(node)
            children = []
            for key, value in items:
                if type(key) is not str and type(key) is not int:
                    raise InputError(path, f"{_safe(name) or 'the top-level dict'}: a key that is not a string or "
                                     f"an integer ({type(key).__name__})")
                children.append((f"{name}.{key}" if name else str(key), value, depth + 1))
            todo.extend(reversed(children))
        else:
            yield name, node
