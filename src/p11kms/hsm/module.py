"""Loading a PKCS#11 module and calling it safely from many threads.

Why not python-pkcs11 or PyKCS11: python-pkcs11 calls C_Initialize(NULL), which
tells SoftHSM that the application is single-threaded, so SoftHSM drops its
internal locks and concurrent calls corrupt it; PyKCS11 holds the GIL during
every call, so a network HSM that answers in milliseconds would serialise the
whole plugin. This binding uses ctypes (which releases the GIL during foreign
calls) and initialises the module with CKF_OS_LOCKING_OK, so the module itself
guards its state. Modules that cannot lock (CKR_CANT_LOCK) are initialised
single-threaded and every call is then serialised by a process-wide lock.
"""

from __future__ import annotations

import ctypes
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from p11kms.hsm import ckdefs as ck
from p11kms.hsm.errors import HsmError, ModuleLoadError, TokenNotFound, error_for
from p11kms.hsm.observer import HsmObserver, NullHsmObserver


@dataclass(frozen=True)
class TokenInfo:
    slot: int
    label: str
    serial: str
    manufacturer: str
    model: str
    flags: int
    # ulMaxSessionCount: sessions one application may hold at once; None when the module sets no
    # limit (CK_EFFECTIVELY_INFINITE) or does not say (CK_UNAVAILABLE_INFORMATION).
    max_sessions: int | None = None


def _text(field: Any) -> str:
    return bytes(field).decode("utf-8", errors="replace").rstrip(" \x00")


class Pkcs11Module:
    """One PKCS#11 library, initialised once for this process."""

    def __init__(self, path: str, *, initialize: bool = True, init_args: str | None = None,
                 entry_point: str = "C_GetFunctionList") -> None:
        self.path = path
        # Passed as pReserved of CK_C_INITIALIZE_ARGS (NSS softoken reads its database directory
        # there); None passes NULL, as the standard requires of every other module.
        self.init_args = init_args
        self.initialized = False
        # Counts initialisations. Handles belong to one of them: after C_Finalize and C_Initialize a
        # module numbers sessions and objects from the start again, so a stale handle can name
        # another session or key. Tokens compare their epoch with this before every call.
        self.epoch = 0
        self.observer: HsmObserver = NullHsmObserver()
        try:
            self._lib = ctypes.CDLL(path)
            # Another entry point than the standard's serves a module's other personality, e.g. NSS
            # softoken's FIPS mode (FC_GetFunctionList).
            get_function_list = getattr(self._lib, entry_point)
        except (OSError, AttributeError) as exc:
            raise ModuleLoadError(
                f"cannot load PKCS#11 module {path!r}: {exc}; check PKCS11_Module in the config "
                "and that the vendor library and its dependencies are installed"
            ) from exc
        get_function_list.restype = ck.CK_RV
        get_function_list.argtypes = [ctypes.POINTER(ctypes.POINTER(ck.CK_FUNCTION_LIST))]
        table = ctypes.POINTER(ck.CK_FUNCTION_LIST)()
        rv = get_function_list(ctypes.byref(table))
        if rv != ck.CKR_OK:
            raise ModuleLoadError(f"{entry_point} of {path!r} failed", ckr=rv)
        self._functions = self._bind(table.contents)
        self._serial_lock: threading.Lock | None = None
        if initialize:
            self.initialize()

    @staticmethod
    def _bind(table: ck.CK_FUNCTION_LIST) -> dict[str, Callable[..., int]]:
        functions: dict[str, Callable[..., int]] = {}
        for name, argtypes in ck.PROTOTYPES.items():
            address = getattr(table, name)
            if address:
                functions[name] = ctypes.CFUNCTYPE(ck.CK_RV, *argtypes)(address)
        return functions

    def initialize(self) -> None:
        """C_Initialize with OS locking; raises the typed error when the module refuses (e.g. its
        remote end is unreachable), leaving the module loaded but not initialised."""
        reserved = None if self.init_args is None else ctypes.create_string_buffer(self.init_args.encode())
        args = ck.CK_C_INITIALIZE_ARGS(flags=ck.CKF_OS_LOCKING_OK,
                                       pReserved=ctypes.cast(reserved, ctypes.c_void_p) if reserved else None)
        rv = self._functions["C_Initialize"](ctypes.cast(ctypes.byref(args), ctypes.c_void_p))
        if rv == ck.CKR_CANT_LOCK:
            self._serial_lock = threading.Lock()
            if reserved is None:
                rv = self._functions["C_Initialize"](None)
            else:  # keep the arguments the module needs, without OS locking
                single = ck.CK_C_INITIALIZE_ARGS(flags=0, pReserved=ctypes.cast(reserved, ctypes.c_void_p))
                rv = self._functions["C_Initialize"](ctypes.cast(ctypes.byref(single), ctypes.c_void_p))
        if rv not in (ck.CKR_OK, ck.CKR_CRYPTOKI_ALREADY_INITIALIZED):
            raise error_for("C_Initialize", rv)
        self.initialized = True
        self.epoch += 1

    @property
    def serialized(self) -> bool:
        """True when the module cannot lock and p11kms serialises every call."""
        return self._serial_lock is not None

    def call(self, name: str, *args: Any) -> None:
        """Calls one PKCS#11 function and raises the typed error for any CKR other than CKR_OK."""
        rv = self.call_rv(name, *args)
        if rv != ck.CKR_OK:
            raise error_for(name, rv)

    def call_rv(self, name: str, *args: Any) -> int:
        """Calls one PKCS#11 function and returns its CKR code, for callers that accept some failures."""
        try:
            function = self._functions[name]
        except KeyError:
            raise HsmError(f"{self.path} does not implement {name}") from None
        started = time.perf_counter()
        if self._serial_lock is None:
            rv = function(*args)
        else:
            with self._serial_lock:
                rv = function(*args)
        self.observer.pkcs11_call(name, time.perf_counter() - started, rv)
        return rv

    def finalize(self) -> None:
        self.initialized = False
        self.call_rv("C_Finalize", None)

    def reinitialize(self) -> None:
        """C_Finalize then C_Initialize: the only way back for modules whose connection died
        (p11-kit-client.so answers CKR_DEVICE_ERROR until then, even after its server is back).
        Every session and object handle of this process becomes invalid."""
        self.finalize()
        self.initialize()

    def slots_with_token(self) -> list[int]:
        count = ck.CK_ULONG(0)
        self.call("C_GetSlotList", 1, None, ctypes.byref(count))
        slots = (ck.CK_ULONG * count.value)()
        self.call("C_GetSlotList", 1, slots, ctypes.byref(count))
        return list(slots[: count.value])

    def token_info(self, slot: int) -> TokenInfo:
        info = ck.CK_TOKEN_INFO()
        self.call("C_GetTokenInfo", slot, ctypes.byref(info))
        return TokenInfo(
            slot=slot,
            label=_text(info.label),
            serial=_text(info.serialNumber),
            manufacturer=_text(info.manufacturerID),
            model=_text(info.model),
            flags=info.flags,
            max_sessions=(None if info.ulMaxSessionCount in (ck.CK_EFFECTIVELY_INFINITE, ck.CK_UNAVAILABLE_INFORMATION)
                          else info.ulMaxSessionCount),
        )

    def tokens(self) -> list[TokenInfo]:
        return [self.token_info(slot) for slot in self.slots_with_token()]

    def find_token(self, *, label: str | None, serial: str | None, slot: int | None) -> TokenInfo:
        """Returns the one token that matches every given criterion."""
        tokens = self.tokens()
        matches = [
            t for t in tokens
            if (label is None or t.label == label)
            and (serial is None or t.serial == serial)
            and (slot is None or t.slot == slot)
        ]
        wanted = ", ".join(
            f"{name}={value!r}" for name, value in (("label", label), ("serial", serial), ("slot", slot))
            if value is not None
        )
        if not matches:
            seen = "; ".join(f"slot {t.slot}: label={t.label!r} serial={t.serial!r}" for t in tokens) or "none"
            raise TokenNotFound(f"no token with {wanted} in {self.path} (tokens present: {seen})")
        if len(matches) > 1:
            raise TokenNotFound(
                f"{len(matches)} tokens match {wanted}; add Token_Serial or Slot to pick one"
            )
        return matches[0]

    def mechanism_flags(self, slot: int, mechanism: int) -> int:
        """The CKF_ flags the module reports for ``mechanism`` on ``slot``; 0 when it offers or reports none."""
        info = ck.CK_MECHANISM_INFO()
        rv = self.call_rv("C_GetMechanismInfo", slot, mechanism, ctypes.byref(info))
        return int(info.flags) if rv == ck.CKR_OK else 0

    def supports_gcm(self, slot: int) -> bool:
        info = ck.CK_MECHANISM_INFO()
        rv = self.call_rv("C_GetMechanismInfo", slot, ck.CKM_AES_GCM, ctypes.byref(info))
        return rv == ck.CKR_OK and bool(info.flags & ck.CKF_ENCRYPT) and bool(info.flags & ck.CKF_DECRYPT)


_modules: dict[str, Pkcs11Module] = {}
_modules_lock = threading.Lock()


def load_module(path: str, *, initialize: bool = True, init_args: str | None = None) -> Pkcs11Module:
    """Returns the process-wide instance for ``path``, initialised unless ``initialize`` is False.

    ``init_args`` (``Module_Init_Args``) is passed as pReserved at the next C_Initialize."""
    with _modules_lock:
        module = _modules.get(path)
        if module is None:
            module = _modules[path] = Pkcs11Module(path, initialize=False, init_args=init_args)
        elif init_args is not None:
            module.init_args = init_args
    if initialize and not module.initialized:
        module.initialize()
    return module
