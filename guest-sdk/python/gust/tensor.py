"""Host-resident tensors through the GPU bridge (``gust:gpu/tensors``).

A :class:`Tensor` is a handle: its data stays on the host's device between
operations, so a chain of ops never copies through the function's memory;
only :meth:`Tensor.read`, :meth:`Tensor.to_list` and friends copy back.
No numpy needed::

    x = gust.Tensor.from_list([[1.0, 2.0, 3.0]])
    w = gust.Tensor.from_list([[0.5], [0.25], [1.0]])
    y = (x @ w).relu().to_list()     # [[4.0]]

Every op checks shapes and dtypes on the host first; a failure raises
:class:`TensorError`, which an uncaught handler turns into the function
error ``gpu-<code>``.
"""

from __future__ import annotations

from typing import Any, List, Optional, Sequence, Union

from componentize_py_types import Err as _Err
from wit_world.imports import gust_gpu_types as _gpu
from wit_world.imports import layers as _layers
from wit_world.imports import tensors as _raw

Dtype = _gpu.Dtype
"""Element types: ``Dtype.F32``, ``F16``, ``BF16``, ``I32``, ``U32``."""

BlockFormat = _layers.BlockFormat
"""ggml block formats for :meth:`Tensor.from_blocks`: ``Q4_0``, ``Q4_1``,
``Q8_0``, ``Q4_K``, ``Q6_K``."""

BlockFormatLike = Union[_layers.BlockFormat, str]


def _format(format: BlockFormatLike) -> _layers.BlockFormat:
    if isinstance(format, _layers.BlockFormat):
        return format
    try:
        return _layers.BlockFormat[str(format).upper().replace("-", "_")]
    except KeyError:
        names = ", ".join(f.name.lower() for f in _layers.BlockFormat)
        raise TensorError("invalid-argument", f"unknown block format {format!r}; one of {names}") from None

DtypeLike = Union[_gpu.Dtype, str]

# WIT spellings of the error codes, as the Rust SDK and the host print them.
_CODE_NAMES = {
    _gpu.ErrorCode.INVALID_ARGUMENT: "invalid-argument",
    _gpu.ErrorCode.SHAPE_MISMATCH: "shape-mismatch",
    _gpu.ErrorCode.NOT_FOUND: "not-found",
    _gpu.ErrorCode.FORBIDDEN: "forbidden",
    _gpu.ErrorCode.OUT_OF_MEMORY: "out-of-memory",
    _gpu.ErrorCode.QUOTA_EXCEEDED: "quota-exceeded",
    _gpu.ErrorCode.TIMEOUT: "timeout",
    _gpu.ErrorCode.BACKEND: "backend",
    _gpu.ErrorCode.UNSUPPORTED: "unsupported",
}

# The status a caller can act on, as in the Rust SDK: retry later on a
# used-up quota, forbidden by policy, device out of memory, deadline.
_STATUS = {
    "quota-exceeded": 429,
    "forbidden": 403,
    "out-of-memory": 503,
    "timeout": 504,
}


class TensorError(Exception):
    """A bridge call failed: ``code`` (``shape-mismatch``, …) and ``message``."""

    def __init__(self, code: str, message: str, busy_status: Optional[int] = None) -> None:
        super().__init__(f"{code}: {message}")
        self.code = code
        self.message = message
        # Models answer 503 for a full queue instead of 429 (see model.py).
        self._busy_status = busy_status

    def status(self) -> int:
        """The HTTP status this failure maps to as a function error."""
        if self.code == "quota-exceeded" and self._busy_status is not None:
            return self._busy_status
        return _STATUS.get(self.code, 500)


def _error(e: _Err, busy_status: Optional[int] = None) -> TensorError:
    value = e.value
    code = _CODE_NAMES.get(getattr(value, "code", None), "backend")
    return TensorError(code, getattr(value, "message", str(value)), busy_status)


def _dtype(dtype: DtypeLike) -> _gpu.Dtype:
    if isinstance(dtype, _gpu.Dtype):
        return dtype
    try:
        return _gpu.Dtype[str(dtype).upper()]
    except KeyError:
        names = ", ".join(d.name.lower() for d in _gpu.Dtype)
        raise TensorError("invalid-argument", f"unknown dtype {dtype!r}; one of {names}") from None


def _flatten(values: Any) -> "tuple[List[int], List[Any]]":
    """Shape and row-major elements of a nested list of numbers."""
    shape: List[int] = []
    probe = values
    while isinstance(probe, (list, tuple)):
        shape.append(len(probe))
        if not probe:
            break
        probe = probe[0]
    flat: List[Any] = []

    def walk(v: Any, depth: int) -> None:
        if depth == len(shape):
            if isinstance(v, (list, tuple)):
                raise TensorError("invalid-argument", "ragged nested list: rows differ in depth")
            flat.append(v)
            return
        if not isinstance(v, (list, tuple)) or len(v) != shape[depth]:
            raise TensorError(
                "invalid-argument",
                f"ragged nested list: expected {shape[depth]} elements at depth {depth}",
            )
        for item in v:
            walk(item, depth + 1)

    walk(values, 0)
    return shape, flat


def _nest(flat: Sequence[Any], shape: Sequence[int]) -> Any:
    if not shape:
        return flat[0]
    if len(shape) == 1:
        return list(flat)
    step = 1
    for d in shape[1:]:
        step *= d
    return [_nest(flat[i * step : (i + 1) * step], shape[1:]) for i in range(shape[0])]


def devices() -> List[_gpu.DeviceInfo]:
    """The devices this invocation may use, the default first."""
    return _raw.devices()


class Tensor:
    """A tensor on the host's device. Operators ``@ + - * /`` call the
    bridge's ``matmul``/``add``/``sub``/``mul``/``div`` (broadcasting);
    a plain number on either side goes through ``affine``."""

    __slots__ = ("_t",)

    def __init__(self, raw: _raw.Tensor) -> None:
        self._t = raw

    # -- construction ---------------------------------------------------

    @classmethod
    def from_f32(cls, shape: Sequence[int], values: Sequence[float]) -> "Tensor":
        """Upload ``f32`` values with ``shape``."""
        return cls._call(_raw.Tensor.from_f32, list(shape), [float(v) for v in values])

    @classmethod
    def from_i32(cls, shape: Sequence[int], values: Sequence[int]) -> "Tensor":
        """Upload ``i32`` values with ``shape`` (indices for :meth:`gather`)."""
        return cls._call(_raw.Tensor.from_i32, list(shape), [int(v) for v in values])

    @classmethod
    def from_bytes(cls, dtype: DtypeLike, shape: Sequence[int], data: bytes) -> "Tensor":
        """Upload little-endian, row-major ``data`` as ``dtype``."""
        return cls._call(_raw.Tensor.from_bytes, _dtype(dtype), list(shape), bytes(data))

    @classmethod
    def from_blocks(cls, format: BlockFormatLike, shape: Sequence[int], data: bytes) -> "Tensor":
        """Upload a weight matrix as ggml blocks of ``format`` (``"q4_1"``,
        ``BlockFormat.Q8_0``, …), exactly the bytes a GGUF file holds; the
        last dimension is whole blocks (32 values, 256 for the K formats).
        It stays in its blocks on the host and goes to :meth:`linear` as
        weights, :meth:`gather` as a table and :meth:`cast` to f32."""
        return cls._call(_layers.from_blocks, _format(format), list(shape), bytes(data))

    @classmethod
    def zeros(cls, dtype: DtypeLike, shape: Sequence[int]) -> "Tensor":
        """A tensor of zeros."""
        return cls._call(_raw.Tensor.zeros, _dtype(dtype), list(shape))

    @classmethod
    def from_list(cls, values: Any, dtype: DtypeLike = "f32") -> "Tensor":
        """Upload a (nested) list of numbers; its nesting is the shape."""
        shape, flat = _flatten(values)
        kind = _dtype(dtype)
        if kind == _gpu.Dtype.F32:
            return cls.from_f32(shape, flat)
        if kind == _gpu.Dtype.I32:
            return cls.from_i32(shape, flat)
        return cls.from_f32(shape, flat).cast(kind)

    @staticmethod
    def _call(f: Any, *args: Any) -> "Tensor":
        try:
            return Tensor(f(*args))
        except _Err as e:
            raise _error(e) from None

    # -- inspection and read-back --------------------------------------

    @property
    def shape(self) -> List[int]:
        """The tensor's shape."""
        return list(self._t.shape())

    @property
    def dtype(self) -> _gpu.Dtype:
        """The tensor's element type."""
        return self._t.dtype()

    def read(self) -> bytes:
        """Copy the data back: little-endian, row-major bytes."""
        try:
            return self._t.read()
        except _Err as e:
            raise _error(e) from None

    def read_f32(self) -> List[float]:
        """Copy the data back as a flat list of floats (cast if needed)."""
        try:
            return list(self._t.read_f32())
        except _Err as e:
            raise _error(e) from None

    def to_list(self) -> Any:
        """Copy the data back as nested lists shaped like the tensor
        (ints for ``i32``/``u32``, floats otherwise)."""
        kind = self.dtype
        if kind in (_gpu.Dtype.I32, _gpu.Dtype.U32):
            data = self.read()
            signed = kind == _gpu.Dtype.I32
            flat = [
                int.from_bytes(data[i : i + 4], "little", signed=signed)
                for i in range(0, len(data), 4)
            ]
        else:
            flat = self.read_f32()
        return _nest(flat, self.shape)

    @property
    def raw(self) -> _raw.Tensor:
        """The generated binding's handle, for what this class lacks."""
        return self._t

    # -- ops --------------------------------------------------------------

    def _op(self, f: Any, *args: Any) -> "Tensor":
        try:
            return Tensor(f(*args))
        except _Err as e:
            raise _error(e) from None

    def matmul(self, other: "Tensor") -> "Tensor":
        """Matrix product of the last two dimensions (batch dims broadcast)."""
        return self._op(_raw.matmul, self._t, other._t)

    def add(self, other: "Tensor") -> "Tensor":
        """Elementwise ``self + other`` with broadcasting."""
        return self._op(_raw.add, self._t, other._t)

    def sub(self, other: "Tensor") -> "Tensor":
        """Elementwise ``self - other`` with broadcasting."""
        return self._op(_raw.sub, self._t, other._t)

    def mul(self, other: "Tensor") -> "Tensor":
        """Elementwise ``self * other`` with broadcasting."""
        return self._op(_raw.mul, self._t, other._t)

    def div(self, other: "Tensor") -> "Tensor":
        """Elementwise ``self / other`` with broadcasting."""
        return self._op(_raw.div, self._t, other._t)

    def affine(self, scale: float, offset: float) -> "Tensor":
        """``self * scale + offset``, elementwise."""
        return self._op(_raw.affine, self._t, float(scale), float(offset))

    def relu(self) -> "Tensor":
        """``max(x, 0)``."""
        return self._op(_raw.relu, self._t)

    def gelu(self) -> "Tensor":
        """GELU (the erf form)."""
        return self._op(_raw.gelu, self._t)

    def silu(self) -> "Tensor":
        """SiLU, ``x * sigmoid(x)``."""
        return self._op(_raw.silu, self._t)

    def tanh(self) -> "Tensor":
        """Hyperbolic tangent."""
        return self._op(_raw.tanh, self._t)

    def exp(self) -> "Tensor":
        """``e^x``."""
        return self._op(_raw.exp, self._t)

    def softmax(self, dim: int = -1) -> "Tensor":
        """Softmax over ``dim``."""
        return self._op(_raw.softmax, self._t, dim)

    def layer_norm(
        self, weight: Optional["Tensor"] = None, bias: Optional["Tensor"] = None, eps: float = 1e-5
    ) -> "Tensor":
        """Layer normalisation over the last dimension."""
        w = weight._t if weight is not None else None
        b = bias._t if bias is not None else None
        return self._op(_raw.layer_norm, self._t, w, b, float(eps))

    def rms_norm(self, weight: Optional["Tensor"] = None, eps: float = 1e-6) -> "Tensor":
        """RMS normalisation over the last dimension."""
        w = weight._t if weight is not None else None
        return self._op(_raw.rms_norm, self._t, w, float(eps))

    def sum(self, dim: int = -1, keep_dim: bool = False) -> "Tensor":
        """Sum over ``dim``."""
        return self._op(_raw.sum, self._t, dim, keep_dim)

    def mean(self, dim: int = -1, keep_dim: bool = False) -> "Tensor":
        """Mean over ``dim``."""
        return self._op(_raw.mean, self._t, dim, keep_dim)

    def max(self, dim: int = -1, keep_dim: bool = False) -> "Tensor":
        """Maximum over ``dim``."""
        return self._op(_raw.max, self._t, dim, keep_dim)

    def argmax(self, dim: int = -1, keep_dim: bool = False) -> "Tensor":
        """Index of the maximum over ``dim``, as ``u32``."""
        return self._op(_raw.argmax, self._t, dim, keep_dim)

    def transpose(self, dim0: int = -2, dim1: int = -1) -> "Tensor":
        """Swap two dimensions."""
        return self._op(_raw.transpose, self._t, dim0, dim1)

    def permute(self, dims: Sequence[int]) -> "Tensor":
        """Reorder all dimensions; ``dims`` is a permutation of ``0..rank``."""
        return self._op(_raw.permute, self._t, list(dims))

    def reshape(self, shape: Sequence[int]) -> "Tensor":
        """Same data, new shape; one entry may be ``-1``."""
        return self._op(_raw.reshape, self._t, list(shape))

    def slice(self, dim: int, start: int, length: int) -> "Tensor":
        """``length`` elements of ``dim`` from ``start``."""
        return self._op(_raw.slice, self._t, dim, start, length)

    @staticmethod
    def concat(tensors: Sequence["Tensor"], dim: int = 0) -> "Tensor":
        """Join tensors along ``dim``; the other dimensions must match."""
        try:
            return Tensor(_raw.concat([t._t for t in tensors], dim))
        except _Err as e:
            raise _error(e) from None

    def gather(self, indices: "Tensor") -> "Tensor":
        """Rows of this table picked by integer ``indices`` (embedding lookup)."""
        return self._op(_raw.gather, self._t, indices._t)

    def cast(self, to: DtypeLike) -> "Tensor":
        """Convert to another element type."""
        return self._op(_raw.cast, self._t, _dtype(to))

    @property
    def block_format(self) -> Optional[_layers.BlockFormat]:
        """The block format of a tensor from :meth:`from_blocks`, else None."""
        return _layers.format(self._t)

    def linear(self, *weights: "Tensor") -> "Tensor":
        """Linear layers over this input (``[..., in]``): ``self · wᵀ`` for
        each weight matrix ``w`` (``[out, in]``; f32 or blocks), side by side
        in the last dimension, for one pass over the input."""
        return self._op(_layers.linear, self._t, [w._t for w in weights])

    def swiglu(self) -> "Tensor":
        """SwiGLU over the last dimension (``[..., 2n]`` → ``[..., n]``):
        ``silu(gate) * up`` of its two halves."""
        return self._op(_layers.swiglu, self._t)

    # -- operators --------------------------------------------------------

    def __matmul__(self, other: "Tensor") -> "Tensor":
        return self.matmul(other)

    def __add__(self, other: Union["Tensor", float]) -> "Tensor":
        if isinstance(other, Tensor):
            return self.add(other)
        return self.affine(1.0, float(other))

    __radd__ = __add__

    def __sub__(self, other: Union["Tensor", float]) -> "Tensor":
        if isinstance(other, Tensor):
            return self.sub(other)
        return self.affine(1.0, -float(other))

    def __rsub__(self, other: float) -> "Tensor":
        return self.affine(-1.0, float(other))

    def __mul__(self, other: Union["Tensor", float]) -> "Tensor":
        if isinstance(other, Tensor):
            return self.mul(other)
        return self.affine(float(other), 0.0)

    __rmul__ = __mul__

    def __truediv__(self, other: Union["Tensor", float]) -> "Tensor":
        if isinstance(other, Tensor):
            return self.div(other)
        return self.affine(1.0 / float(other), 0.0)

    def __neg__(self) -> "Tensor":
        return self.affine(-1.0, 0.0)

    def __repr__(self) -> str:
        return f"Tensor(shape={self.shape}, dtype={self.dtype.name.lower()})"


