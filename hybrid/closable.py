"""The one context-manager mixin: ``with thing:`` closes ``thing`` (llvmlite style)."""

from __future__ import annotations


class Closable:
    """Objects that hold native resources and free them in an idempotent ``close()``."""

    def close(self) -> None:  # pragma: no cover - every subclass overrides it
        pass

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close()
