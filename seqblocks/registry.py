"""Named registries of components.

A registry maps a case-insensitive name to a component class. ``ConfigurableBlock`` and the language
models look components up by the names in a config, so a user adds a component with one decorator::

    @attention_registry.register("my_attention")
    class MyAttention(AttentionBase): ...

and refers to it as ``BlockConfig(attention="my_attention")`` without touching existing code.

There is one registry of sequence mixers; it serves both ``LRNNLMHeadModel(mixer_types=[...])`` and
``BlockConfig.attention``, and is exported as ``attention_registry`` too (the name ``BlockConfig`` users know).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from typing import Generic, TypeVar, overload

T = TypeVar("T")

__all__ = [
    "Registry",
    "MIXERS",
    "FFNS",
    "NORMS",
    "POSITIONS",
    "MLPS",
    "MODELS",
    "CONVERTERS",
    "mixer_registry",
    "attention_registry",
    "ffn_registry",
    "norm_registry",
    "position_registry",
    "mlp_registry",
    "model_registry",
]


def _normalize(name: str) -> str:
    return name.strip().lower()


def _summary(component: object) -> str:
    """The first paragraph of ``component``'s docstring, joined into one line ("" without one)."""
    doc = (getattr(component, "__doc__", None) or "").strip()
    return " ".join(doc.split("\n\n", 1)[0].split())


class Registry(Generic[T]):
    """A case-insensitive mapping from names to components.

    Args:
        kind (str): what the registry holds ("mixer", "ffn", ...); used in error messages.

    Names are stored lower-cased: ``get("S5")`` and ``get("s5")`` find the same entry. Registering a
    name twice and looking up an unknown name raise ``ValueError`` listing the valid names.
    """

    def __init__(self, kind: str) -> None:
        self.kind = kind
        self._entries: dict[str, T] = {}
        self._display: dict[str, str] = {}
        self._descriptions: dict[str, str] = {}

    @overload
    def register(self, name: str, obj: None = None, *, description: str | None = None) -> Callable[[T], T]: ...

    @overload
    def register(self, name: str, obj: T, *, description: str | None = None) -> T: ...

    def register(self, name, obj=None, *, description=None):
        """Register ``obj`` under ``name``; used bare as a decorator when ``obj`` is omitted.

        Args:
            name (str): the lookup name, case-insensitive.
            obj: the component; when omitted, returns a decorator that registers its argument.
            description (str | None): one line shown by ``seqblocks list``.
                Default: the first paragraph of the component's docstring, on one line.

        Raises:
            TypeError: ``name`` is not a non-empty string.
            ValueError: ``name`` is already registered.
        """
        if not isinstance(name, str) or not name.strip():
            raise TypeError(f"{self.kind} registry names must be non-empty strings, got {name!r}")

        def decorator(component: T) -> T:
            key = _normalize(name)
            if key in self._entries:
                raise ValueError(
                    f"{self.kind} {name!r} is already registered (to {self._entries[key]!r}); "
                    f"registered {self.kind} names: {self.keys()}"
                )
            self._entries[key] = component
            self._display[key] = name
            self._descriptions[key] = description if description is not None else _summary(component)
            return component

        return decorator if obj is None else decorator(obj)

    def unregister(self, name: str) -> T:
        """Remove ``name`` and return what it held. Raises ``ValueError`` for an unknown name."""
        key = self._key(name)
        self._display.pop(key)
        self._descriptions.pop(key)
        return self._entries.pop(key)

    def get(self, name: str) -> T:
        """Return the component registered under ``name`` (case-insensitive).

        Raises:
            ValueError: ``name`` is not registered; the message lists the registered names.
        """
        return self._entries[self._key(name)]

    def describe(self, name: str) -> str:
        """The one-line description of ``name``."""
        return self._descriptions[self._key(name)]

    def keys(self) -> list[str]:
        """The registered names, lower-cased and sorted."""
        return sorted(self._entries)

    def items(self) -> list[tuple[str, T]]:
        return [(k, self._entries[k]) for k in self.keys()]

    def names_of(self, component: T) -> list[str]:
        """Every name ``component`` is registered under (aliases included)."""
        return [k for k in self.keys() if self._entries[k] is component]

    def primary_names(self) -> list[str]:
        """One name per distinct component, sorted: its first name whose description does not start
        with "alias" (the convention of alias registrations), else its first name."""
        names, seen = [], []
        for _, component in self.items():
            if any(component is c for c in seen):
                continue
            seen.append(component)
            aliases = self.names_of(component)
            primary = [n for n in aliases if not self.describe(n).lower().startswith("alias")]
            names.append((primary or aliases)[0])
        return sorted(names)

    @contextlib.contextmanager
    def scoped(self) -> Iterator[Registry[T]]:
        """Restore the registry's entries on exit; registrations made inside are temporary."""
        saved = (dict(self._entries), dict(self._display), dict(self._descriptions))
        try:
            yield self
        finally:
            self._entries, self._display, self._descriptions = saved

    def _key(self, name: str) -> str:
        if not isinstance(name, str):
            raise TypeError(f"{self.kind} names are strings, got {type(name).__name__} {name!r}")
        key = _normalize(name)
        if key not in self._entries:
            raise ValueError(f"unknown {self.kind} {name!r}; registered {self.kind} names: {self.keys()}")
        return key

    def __contains__(self, name: object) -> bool:
        return isinstance(name, str) and _normalize(name) in self._entries

    def __iter__(self) -> Iterator[str]:
        return iter(self.keys())

    def __len__(self) -> int:
        return len(self._entries)

    def __repr__(self) -> str:
        return f"Registry({self.kind!r}, {self.keys()})"


MIXERS: Registry = Registry("mixer")
FFNS: Registry = Registry("ffn")
NORMS: Registry = Registry("norm")
POSITIONS: Registry = Registry("position")
#: Residual MLPs of ``LRNNLMHeadModel`` (``mlp_cls``), built as ``cls(d_model, hidden_features=...,
#: out_features=d_model, device=..., dtype=...)``.
MLPS: Registry = Registry("mlp")
#: Model classes a checkpoint's ``model_type`` may name; loading resolves classes only through it.
MODELS: Registry = Registry("model")
#: Checkpoint formats of other ecosystems: objects with ``load(path, **kwargs) -> model`` and
#: ``save(model, path, **kwargs)``; ``seqblocks.interop`` registers "hf". The models' ``from_hf`` /
#: ``save_hf`` reach it here, so the models never import the (higher) interop package.
CONVERTERS: Registry = Registry("converter")

# Other names for the same registries.
mixer_registry = MIXERS
attention_registry = MIXERS
ffn_registry = FFNS
norm_registry = NORMS
position_registry = POSITIONS
mlp_registry = MLPS
model_registry = MODELS
