"""Other libraries' private internals, one module per library: ``faust``, ``aiokafka``,
``eventsourcing``, ``opentelemetry``, ``prometheus_client``, ``httpx`` (with httpcore).

daybook relies on a few names these libraries do not publish (a consumer's read offsets, the
factory that builds the aiokafka consumer, the partitioner's hash, an HTTP transport's
connection pool...). They are used nowhere else: the rest of daybook calls the small
functions here. Each module also lists what it relies on in ``RELIED_ON``, one ``Internal``
per name with the shape daybook expects, and ``tests/unit/test_compat.py`` checks every entry
against the installed version, so an upgrade that removes or reshapes one fails there, naming
it, rather than in a running service.
"""

from __future__ import annotations

import enum
import importlib
import inspect
from collections.abc import Callable
from dataclasses import dataclass
from types import FunctionType, ModuleType


class Kind(enum.Enum):
    """What an internal is expected to be."""

    VALUE = "a value"
    FUNCTION = "a function"
    COROUTINE_FUNCTION = "a coroutine function"


@dataclass(frozen=True)
class Internal:
    """One private name of another library, and what daybook expects of it."""

    #: The distribution, as installed: ``faust-streaming``, ``aiokafka``.
    library: str
    #: Where the name lives: ``module`` or ``module:Class``.
    owner: str
    name: str
    #: The compat function (or class) that relies on it.
    used_by: Callable[..., object]
    #: What to compare in a new version of the library.
    check: str
    kind: Kind = Kind.VALUE
    #: Set by ``__init__``: checked on an instance of ``owner`` (unstarted, no broker needed).
    on_instance: bool = False
    #: For a value: the types it must have (None: any).
    types: tuple[type, ...] | None = None
    #: For a value: names it must have (an event's ``is_set``).
    members: tuple[str, ...] = ()
    #: For a function: its first parameters after ``self``, by name.
    parameters: tuple[str, ...] = ()
    #: ``module:qualname`` of the library code that must still use the name (where daybook
    #: replaces or sets it: the replacement would go unused, silently, otherwise).
    used_in: str = ""

    @property
    def label(self) -> str:
        """``Class.name`` or ``module.name``, as the messages name it."""
        module, _, qualname = self.owner.partition(":")
        return f"{qualname or module}.{self.name}"

    def problem(self, instance: object = None) -> str | None:
        """Why the installed library no longer fits (None when it does).

        ``instance`` is an instance of ``owner`` for the names that ``__init__`` sets
        (``on_instance``); class and module names are looked up on the owner itself.
        """
        try:
            owner = resolve(self.owner)
        except (ImportError, AttributeError):
            return self._message(f"no longer has {_dotted(self.owner)}")
        if self.on_instance:
            if not isinstance(owner, type) or not isinstance(instance, owner):
                raise TypeError(f"{self.label} is checked on an instance of {self.owner}")
            holder = instance
        else:
            holder = owner
        if not hasattr(holder, self.name):
            return self._message(f"no longer has {self.label}")
        value = getattr(holder, self.name)
        shape = self._shape_problem(value)
        if shape is not None:
            return self._message(f"changed {self.label}: {shape}")
        if self.used_in:
            try:
                user = resolve(self.used_in)
                if not isinstance(user, (type, FunctionType, ModuleType)):
                    raise TypeError(f"{self.used_in} has no source of its own")
                source = inspect.getsource(user)
            except (ImportError, AttributeError, OSError, TypeError):
                return self._message(f"no longer has {_dotted(self.used_in)}")
            if self.name not in source:
                return self._message(f"no longer uses {self.label} in {_dotted(self.used_in)}")
        return None

    def _shape_problem(self, value: object) -> str | None:
        if self.kind is Kind.VALUE:
            if self.types is not None and not isinstance(value, self.types):
                expected = " or ".join(t.__name__ for t in self.types)
                return f"it is a {type(value).__name__}, not {expected}"
            missing = [member for member in self.members if not hasattr(value, member)]
            if missing:
                return f"it has no {', '.join(missing)}"
            return None
        if not callable(value):
            return f"it is not {self.kind.value}"
        if self.kind is Kind.COROUTINE_FUNCTION and not inspect.iscoroutinefunction(value):
            return f"it is not {self.kind.value}"
        if self.parameters:
            names = [n for n in inspect.signature(value).parameters if n != "self"]
            if tuple(names[: len(self.parameters)]) != self.parameters:
                return f"it takes ({', '.join(names)}), not ({', '.join(self.parameters)}, ...)"
        return None

    def _message(self, what: str) -> str:
        used_by = f"{self.used_by.__module__}.{self.used_by.__qualname__}"
        return f"{self.library} {what}, which {used_by} relies on; check {self.check}"


def _dotted(path: str) -> str:
    return path.replace(":", ".")


def resolve(path: str) -> object:
    """The object at ``module`` or ``module:qualname``."""
    module, _, qualname = path.partition(":")
    found: object = importlib.import_module(module)
    for part in filter(None, qualname.split(".")):
        found = getattr(found, part)
    return found
