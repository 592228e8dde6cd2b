"""Token provisioning for development and tests: initialise a fresh token and its user PIN.

Production tokens are set up with the vendor's tools; this exists so the
embedded default and the test suite never pass a PIN on a command line.
"""

from __future__ import annotations

import ctypes

from p11kms.hsm import ckdefs as ck
from p11kms.hsm.errors import TokenNotFound
from p11kms.hsm.module import Pkcs11Module, TokenInfo

_CKF_TOKEN_INITIALIZED = 0x400


def init_token(module: Pkcs11Module, label: str, so_pin: bytes, user_pin: bytes) -> TokenInfo:
    """Initialises the first uninitialised token as ``label`` and sets its user PIN."""
    free = [t for t in module.tokens() if not t.flags & _CKF_TOKEN_INITIALIZED]
    if not free:
        raise TokenNotFound(f"{module.path} offers no uninitialised token to create {label!r} in")
    padded = label.encode().ljust(32, b" ")[:32]
    module.call("C_InitToken", free[0].slot, ck.byte_buffer(so_pin), len(so_pin), ck.byte_buffer(padded))
    info = module.find_token(label=label, serial=None, slot=None)  # SoftHSM renumbers the slot
    session = ck.CK_SESSION_HANDLE()
    module.call("C_OpenSession", info.slot, ck.CKF_SERIAL_SESSION | ck.CKF_RW_SESSION, None, None,
                ctypes.byref(session))
    try:
        module.call("C_Login", session, ck.CKU_SO, ck.byte_buffer(so_pin), len(so_pin))
        module.call("C_InitPIN", session, ck.byte_buffer(user_pin), len(user_pin))
        module.call_rv("C_Logout", session)
    finally:
        module.call_rv("C_CloseSession", session)
    return module.token_info(info.slot)
