"""PKCS#11 (Cryptoki 2.40) constants and C structures used by p11kms.

Only what the plugin calls is declared. Layouts follow the standard header on
Unix (natural alignment, CK_ULONG = unsigned long); names keep the standard's
spelling so they can be looked up in the specification.
"""

from __future__ import annotations

import ctypes
from ctypes import POINTER, c_ubyte, c_ulong, c_void_p

CK_ULONG = c_ulong
CK_RV = c_ulong
CK_SLOT_ID = c_ulong
CK_SESSION_HANDLE = c_ulong
CK_OBJECT_HANDLE = c_ulong

# Return values. The table of names is used for error messages and metrics labels.
CKR_NAMES: dict[int, str] = {
    0x000: "CKR_OK",
    0x001: "CKR_CANCEL",
    0x002: "CKR_HOST_MEMORY",
    0x003: "CKR_SLOT_ID_INVALID",
    0x005: "CKR_GENERAL_ERROR",
    0x006: "CKR_FUNCTION_FAILED",
    0x007: "CKR_ARGUMENTS_BAD",
    0x00A: "CKR_CANT_LOCK",
    0x010: "CKR_ATTRIBUTE_READ_ONLY",
    0x011: "CKR_ATTRIBUTE_SENSITIVE",
    0x012: "CKR_ATTRIBUTE_TYPE_INVALID",
    0x013: "CKR_ATTRIBUTE_VALUE_INVALID",
    0x01B: "CKR_ACTION_PROHIBITED",
    0x020: "CKR_DATA_INVALID",
    0x021: "CKR_DATA_LEN_RANGE",
    0x030: "CKR_DEVICE_ERROR",
    0x031: "CKR_DEVICE_MEMORY",
    0x032: "CKR_DEVICE_REMOVED",
    0x035: "CKR_AEAD_DECRYPT_FAILED",
    0x040: "CKR_ENCRYPTED_DATA_INVALID",
    0x041: "CKR_ENCRYPTED_DATA_LEN_RANGE",
    0x050: "CKR_FUNCTION_CANCELED",
    0x054: "CKR_FUNCTION_NOT_SUPPORTED",
    0x060: "CKR_KEY_HANDLE_INVALID",
    0x063: "CKR_KEY_TYPE_INCONSISTENT",
    0x068: "CKR_KEY_FUNCTION_NOT_PERMITTED",
    0x070: "CKR_MECHANISM_INVALID",
    0x071: "CKR_MECHANISM_PARAM_INVALID",
    0x082: "CKR_OBJECT_HANDLE_INVALID",
    0x090: "CKR_OPERATION_ACTIVE",
    0x091: "CKR_OPERATION_NOT_INITIALIZED",
    0x0A0: "CKR_PIN_INCORRECT",
    0x0A1: "CKR_PIN_INVALID",
    0x0A2: "CKR_PIN_LEN_RANGE",
    0x0A3: "CKR_PIN_EXPIRED",
    0x0A4: "CKR_PIN_LOCKED",
    0x0B0: "CKR_SESSION_CLOSED",
    0x0B1: "CKR_SESSION_COUNT",
    0x0B3: "CKR_SESSION_HANDLE_INVALID",
    0x0B4: "CKR_SESSION_PARALLEL_NOT_SUPPORTED",
    0x0B5: "CKR_SESSION_READ_ONLY",
    0x0D0: "CKR_TEMPLATE_INCOMPLETE",
    0x0D1: "CKR_TEMPLATE_INCONSISTENT",
    0x0E0: "CKR_TOKEN_NOT_PRESENT",
    0x0E1: "CKR_TOKEN_NOT_RECOGNIZED",
    0x0E2: "CKR_TOKEN_WRITE_PROTECTED",
    0x100: "CKR_USER_ALREADY_LOGGED_IN",
    0x101: "CKR_USER_NOT_LOGGED_IN",
    0x102: "CKR_USER_PIN_NOT_INITIALIZED",
    0x103: "CKR_USER_TYPE_INVALID",
    0x150: "CKR_BUFFER_TOO_SMALL",
    0x190: "CKR_CRYPTOKI_NOT_INITIALIZED",
    0x191: "CKR_CRYPTOKI_ALREADY_INITIALIZED",
}
CKR_OK = 0x000
CKR_GENERAL_ERROR = 0x005
CKR_FUNCTION_FAILED = 0x006
CKR_CANT_LOCK = 0x00A
CKR_DEVICE_ERROR = 0x030
CKR_DEVICE_MEMORY = 0x031
CKR_DEVICE_REMOVED = 0x032
CKR_AEAD_DECRYPT_FAILED = 0x035  # PKCS#11 3.0: a bad GCM tag
CKR_ENCRYPTED_DATA_INVALID = 0x040
CKR_ENCRYPTED_DATA_LEN_RANGE = 0x041
CKR_KEY_HANDLE_INVALID = 0x060
CKR_KEY_TYPE_INCONSISTENT = 0x063
CKR_KEY_FUNCTION_NOT_PERMITTED = 0x068
CKR_MECHANISM_INVALID = 0x070
CKR_MECHANISM_PARAM_INVALID = 0x071
CKR_OBJECT_HANDLE_INVALID = 0x082
CKR_PIN_INCORRECT = 0x0A0
CKR_PIN_INVALID = 0x0A1
CKR_PIN_LEN_RANGE = 0x0A2
CKR_PIN_EXPIRED = 0x0A3
CKR_PIN_LOCKED = 0x0A4
CKR_SESSION_CLOSED = 0x0B0
CKR_SESSION_COUNT = 0x0B1
CKR_SESSION_HANDLE_INVALID = 0x0B3
CKR_TOKEN_NOT_PRESENT = 0x0E0
CKR_TOKEN_NOT_RECOGNIZED = 0x0E1
CKR_USER_ALREADY_LOGGED_IN = 0x100
CKR_USER_NOT_LOGGED_IN = 0x101
CKR_BUFFER_TOO_SMALL = 0x150
CKR_CRYPTOKI_NOT_INITIALIZED = 0x190
CKR_CRYPTOKI_ALREADY_INITIALIZED = 0x191

# Attributes
CKA_CLASS = 0x000
CKA_TOKEN = 0x001
CKA_PRIVATE = 0x002
CKA_LABEL = 0x003
CKA_KEY_TYPE = 0x100
CKA_ID = 0x102
CKA_SENSITIVE = 0x103
CKA_ENCRYPT = 0x104
CKA_DECRYPT = 0x105
CKA_WRAP = 0x106
CKA_UNWRAP = 0x107
CKA_SIGN = 0x108
CKA_VERIFY = 0x10A
CKA_DERIVE = 0x10C
CKA_VALUE = 0x011
CKA_VALUE_LEN = 0x161
CKA_EXTRACTABLE = 0x162
CKA_MODIFIABLE = 0x170

CKO_SECRET_KEY = 4
CKK_AES = 0x1F
CKM_AES_KEY_GEN = 0x1080
CKM_AES_ECB = 0x1081
CKM_AES_CTR = 0x1086
CKM_AES_CMAC = 0x108A
CKM_AES_GCM = 0x1087

CKU_SO = 0
CKU_USER = 1

CKF_TOKEN_PRESENT = 0x1  # slot flag
CKF_RW_SESSION = 0x2
CKF_SERIAL_SESSION = 0x4
CKF_OS_LOCKING_OK = 0x2
CKF_ENCRYPT = 0x100  # mechanism flag
CKF_DECRYPT = 0x200  # mechanism flag

CK_UNAVAILABLE_INFORMATION = c_ulong(-1).value
CK_EFFECTIVELY_INFINITE = 0


def byte_buffer(data: bytes) -> ctypes.Array[ctypes.c_ubyte]:
    """A C byte array holding a copy of ``data``, for CK_BYTE_PTR arguments."""
    return (ctypes.c_ubyte * len(data)).from_buffer_copy(data)


class CK_VERSION(ctypes.Structure):
    _fields_ = [("major", c_ubyte), ("minor", c_ubyte)]


class CK_C_INITIALIZE_ARGS(ctypes.Structure):
    _fields_ = [
        ("CreateMutex", c_void_p),
        ("DestroyMutex", c_void_p),
        ("LockMutex", c_void_p),
        ("UnlockMutex", c_void_p),
        ("flags", CK_ULONG),
        ("pReserved", c_void_p),
    ]


class CK_TOKEN_INFO(ctypes.Structure):
    _fields_ = [
        ("label", c_ubyte * 32),
        ("manufacturerID", c_ubyte * 32),
        ("model", c_ubyte * 16),
        ("serialNumber", c_ubyte * 16),
        ("flags", CK_ULONG),
        ("ulMaxSessionCount", CK_ULONG),
        ("ulSessionCount", CK_ULONG),
        ("ulMaxRwSessionCount", CK_ULONG),
        ("ulRwSessionCount", CK_ULONG),
        ("ulMaxPinLen", CK_ULONG),
        ("ulMinPinLen", CK_ULONG),
        ("ulTotalPublicMemory", CK_ULONG),
        ("ulFreePublicMemory", CK_ULONG),
        ("ulTotalPrivateMemory", CK_ULONG),
        ("ulFreePrivateMemory", CK_ULONG),
        ("hardwareVersion", CK_VERSION),
        ("firmwareVersion", CK_VERSION),
        ("utcTime", c_ubyte * 16),
    ]


class CK_ATTRIBUTE(ctypes.Structure):
    _fields_ = [("type", CK_ULONG), ("pValue", c_void_p), ("ulValueLen", CK_ULONG)]


class CK_MECHANISM(ctypes.Structure):
    _fields_ = [("mechanism", CK_ULONG), ("pParameter", c_void_p), ("ulParameterLen", CK_ULONG)]


class CK_MECHANISM_INFO(ctypes.Structure):
    _fields_ = [("ulMinKeySize", CK_ULONG), ("ulMaxKeySize", CK_ULONG), ("flags", CK_ULONG)]


class CK_GCM_PARAMS(ctypes.Structure):
    # Cryptoki 2.40 errata layout (with ulIvBits), as in SoftHSM2 and p11-kit.
    _fields_ = [
        ("pIv", c_void_p),
        ("ulIvLen", CK_ULONG),
        ("ulIvBits", CK_ULONG),
        ("pAAD", c_void_p),
        ("ulAADLen", CK_ULONG),
        ("ulTagBits", CK_ULONG),
    ]


class CK_AES_CTR_PARAMS(ctypes.Structure):
    _fields_ = [("ulCounterBits", CK_ULONG), ("cb", ctypes.c_ubyte * 16)]


# The function list in the standard's order; the struct offsets depend on it.
FUNCTION_NAMES = (
    "C_Initialize", "C_Finalize", "C_GetInfo", "C_GetFunctionList", "C_GetSlotList", "C_GetSlotInfo",
    "C_GetTokenInfo", "C_GetMechanismList", "C_GetMechanismInfo", "C_InitToken", "C_InitPIN", "C_SetPIN",
    "C_OpenSession", "C_CloseSession", "C_CloseAllSessions", "C_GetSessionInfo", "C_GetOperationState",
    "C_SetOperationState", "C_Login", "C_Logout", "C_CreateObject", "C_CopyObject", "C_DestroyObject",
    "C_GetObjectSize", "C_GetAttributeValue", "C_SetAttributeValue", "C_FindObjectsInit", "C_FindObjects",
    "C_FindObjectsFinal", "C_EncryptInit", "C_Encrypt", "C_EncryptUpdate", "C_EncryptFinal", "C_DecryptInit",
    "C_Decrypt", "C_DecryptUpdate", "C_DecryptFinal", "C_DigestInit", "C_Digest", "C_DigestUpdate",
    "C_DigestKey", "C_DigestFinal", "C_SignInit", "C_Sign", "C_SignUpdate", "C_SignFinal",
    "C_SignRecoverInit", "C_SignRecover", "C_VerifyInit", "C_Verify", "C_VerifyUpdate", "C_VerifyFinal",
    "C_VerifyRecoverInit", "C_VerifyRecover", "C_DigestEncryptUpdate", "C_DecryptDigestUpdate",
    "C_SignEncryptUpdate", "C_DecryptVerifyUpdate", "C_GenerateKey", "C_GenerateKeyPair", "C_WrapKey",
    "C_UnwrapKey", "C_DeriveKey", "C_SeedRandom", "C_GenerateRandom", "C_GetFunctionStatus",
    "C_CancelFunction", "C_WaitForSlotEvent",
)


class CK_FUNCTION_LIST(ctypes.Structure):
    _fields_ = [("version", CK_VERSION)] + [(name, c_void_p) for name in FUNCTION_NAMES]


_ULONG_P = POINTER(CK_ULONG)
_BYTES_P = POINTER(c_ubyte)

# Prototypes of the functions p11kms calls. CFUNCTYPE (not PYFUNCTYPE) makes ctypes
# release the GIL for the duration of each call, so slow HSM calls run in parallel.
PROTOTYPES: dict[str, tuple[type, ...]] = {
    "C_Initialize": (c_void_p,),
    "C_Finalize": (c_void_p,),
    "C_GetSlotList": (c_ubyte, _ULONG_P, _ULONG_P),
    "C_GetTokenInfo": (CK_SLOT_ID, POINTER(CK_TOKEN_INFO)),
    "C_GetMechanismInfo": (CK_SLOT_ID, CK_ULONG, POINTER(CK_MECHANISM_INFO)),
    "C_InitToken": (CK_SLOT_ID, _BYTES_P, CK_ULONG, _BYTES_P),
    "C_InitPIN": (CK_SESSION_HANDLE, _BYTES_P, CK_ULONG),
    "C_OpenSession": (CK_SLOT_ID, CK_ULONG, c_void_p, c_void_p, POINTER(CK_SESSION_HANDLE)),
    "C_CloseSession": (CK_SESSION_HANDLE,),
    "C_Login": (CK_SESSION_HANDLE, CK_ULONG, _BYTES_P, CK_ULONG),
    "C_Logout": (CK_SESSION_HANDLE,),
    "C_GetAttributeValue": (CK_SESSION_HANDLE, CK_OBJECT_HANDLE, POINTER(CK_ATTRIBUTE), CK_ULONG),
    "C_FindObjectsInit": (CK_SESSION_HANDLE, POINTER(CK_ATTRIBUTE), CK_ULONG),
    "C_FindObjects": (CK_SESSION_HANDLE, POINTER(CK_OBJECT_HANDLE), CK_ULONG, _ULONG_P),
    "C_FindObjectsFinal": (CK_SESSION_HANDLE,),
    "C_EncryptInit": (CK_SESSION_HANDLE, POINTER(CK_MECHANISM), CK_OBJECT_HANDLE),
    "C_Encrypt": (CK_SESSION_HANDLE, _BYTES_P, CK_ULONG, _BYTES_P, _ULONG_P),
    "C_DecryptInit": (CK_SESSION_HANDLE, POINTER(CK_MECHANISM), CK_OBJECT_HANDLE),
    "C_Decrypt": (CK_SESSION_HANDLE, _BYTES_P, CK_ULONG, _BYTES_P, _ULONG_P),
    "C_GenerateKey": (CK_SESSION_HANDLE, POINTER(CK_MECHANISM), POINTER(CK_ATTRIBUTE), CK_ULONG,
                      POINTER(CK_OBJECT_HANDLE)),
    "C_DestroyObject": (CK_SESSION_HANDLE, CK_OBJECT_HANDLE),
    "C_CreateObject": (CK_SESSION_HANDLE, POINTER(CK_ATTRIBUTE), CK_ULONG, POINTER(CK_OBJECT_HANDLE)),
    "C_SetAttributeValue": (CK_SESSION_HANDLE, CK_OBJECT_HANDLE, POINTER(CK_ATTRIBUTE), CK_ULONG),
    "C_SignInit": (CK_SESSION_HANDLE, POINTER(CK_MECHANISM), CK_OBJECT_HANDLE),
    "C_Sign": (CK_SESSION_HANDLE, _BYTES_P, CK_ULONG, _BYTES_P, _ULONG_P),
}
