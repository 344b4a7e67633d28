"""Models the host keeps resident across invocations (``gust:gpu/models``).

:meth:`Model.load` finds the model already on the device after the first
call anywhere on the host, so a function can load it on every call::

    model = gust.Model.load("all-minilm-l6-v2")
    a, b = model.embed(["A man is eating food.", "Someone has a meal."])
    cosine = sum(x * y for x, y in zip(a, b))   # vectors are L2-normalised
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Dict, List, Optional, Sequence

from componentize_py_types import Err as _Err
from wit_world.imports import models as _raw

from .tensor import Tensor, TensorError, _error


@dataclass
class GenerateParams:
    """Settings for :meth:`Model.generate`; the defaults are greedy decoding
    of up to 128 tokens, as in the Rust SDK."""

    max_tokens: int = 128
    """Stop after this many new tokens."""
    temperature: float = 0.0
    """0 means greedy decoding."""
    top_k: Optional[int] = None
    """Sample only among the ``k`` most likely tokens."""
    top_p: Optional[float] = None
    """Nucleus sampling threshold."""
    seed: Optional[int] = None
    """Seed for reproducible sampling."""
    stop: List[str] = field(default_factory=list)
    """Stop when any of these strings is produced (not included)."""

    def _raw(self) -> _raw.GenerateParams:
        return _raw.GenerateParams(
            max_tokens=int(self.max_tokens),
            temperature=float(self.temperature),
            top_k=self.top_k,
            top_p=self.top_p,
            seed=self.seed,
            stop=list(self.stop),
        )


# A full model queue is transient (the host answers with Retry-After), so
# unlike a tensor quota it maps to 503, as in the Rust SDK.
_BUSY = 503


def _model_error(e: _Err) -> TensorError:
    return _error(e, busy_status=_BUSY)


class Model:
    """A model resident on the host's device."""

    __slots__ = ("_m",)

    def __init__(self, raw: _raw.Model) -> None:
        self._m = raw

    @classmethod
    def load(cls, name: str) -> "Model":
        """Load the model called ``name`` or find it resident; the tenant's
        policy must list it (``forbidden`` otherwise)."""
        try:
            return cls(_raw.Model.load(name))
        except _Err as e:
            raise _model_error(e) from None

    @property
    def name(self) -> str:
        """The model's name."""
        return self._m.name()

    @property
    def family(self) -> str:
        """The model family, e.g. ``bert`` or ``llama``."""
        return self._m.family()

    def embed(self, texts: Sequence[str]) -> List[List[float]]:
        """Sentence embeddings: one L2-normalised vector per text."""
        if isinstance(texts, str):
            texts = [texts]
        try:
            return [list(v) for v in self._m.embed([str(t) for t in texts])]
        except _Err as e:
            raise _model_error(e) from None

    def generate(self, prompt: str, params: Optional[GenerateParams] = None, **settings: object) -> str:
        """Continue ``prompt``. Pass a :class:`GenerateParams` or its fields
        as keywords (``max_tokens=32, temperature=0.7``)."""
        try:
            return self._m.generate(prompt, _params(params, settings)._raw())
        except _Err as e:
            raise _model_error(e) from None

    def generate_stream(
        self, prompt: str, params: Optional[GenerateParams] = None, **settings: object
    ) -> str:
        """Like :meth:`generate`, and each piece of text also goes to the
        caller as it is produced (see :func:`gust.emit`)."""
        try:
            return self._m.generate_stream(prompt, _params(params, settings)._raw())
        except _Err as e:
            raise _model_error(e) from None

    def run(self, inputs: Dict[str, Tensor]) -> Dict[str, Tensor]:
        """Run the model on named input tensors; returns named outputs."""
        try:
            outputs = self._m.run([(name, t.raw) for name, t in inputs.items()])
        except _Err as e:
            raise _model_error(e) from None
        return {name: Tensor(t) for name, t in outputs}

    def __repr__(self) -> str:
        return f"Model({self.name!r}, family={self.family!r})"


def _params(params: Optional[GenerateParams], settings: Dict[str, object]) -> GenerateParams:
    if params is not None and settings:
        raise TypeError("pass either a GenerateParams or keyword settings, not both")
    if params is not None:
        return params
    return GenerateParams(**settings)  # type: ignore[arg-type]
