"""What the HSM layer reports about itself. Implemented by the metrics layer, injected from the top."""

from __future__ import annotations

from typing import Protocol


class HsmObserver(Protocol):
    def pkcs11_call(self, function: str, seconds: float, rv: int) -> None:
        """One PKCS#11 call returned ``rv`` after ``seconds``."""

    def in_flight(self, delta: int) -> None:
        """An operation started (+1) or ended (-1) on a lent session."""


class NullHsmObserver:
    def pkcs11_call(self, function: str, seconds: float, rv: int) -> None:
        pass

    def in_flight(self, delta: int) -> None:
        pass
