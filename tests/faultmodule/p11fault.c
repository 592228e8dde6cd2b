/*
 * p11fault: a pass-through PKCS#11 module for tests. It forwards every call to the module named
 * by P11FAULT_MODULE and, for the functions wrapped below, first applies what the control file
 * (P11FAULT_CONTROL) asks for:
 *
 *   latency_ms N                 sleep N ms before each wrapped call
 *   fail C_Function 0xCKR COUNT  answer CKR instead of calling through, COUNT times (-1: always)
 *   gcm_iv rewrite               emulate AWS CloudHSM: on C_EncryptInit with CKM_AES_GCM, write a fresh
 *                                random IV into CK_GCM_PARAMS.pIv (whatever the caller put there) and
 *                                encrypt under it
 *   gcm_iv refuse                emulate a FIPS module that refuses caller IVs: a non-zero pIv gets
 *                                CKR_MECHANISM_PARAM_INVALID; an all-zero pIv gets a fresh random IV as above
 *   max_sessions N               C_OpenSession answers CKR_SESSION_COUNT while N sessions opened through
 *                                this module are open (C_CloseSession frees one)
 *   report_max_sessions N        C_GetTokenInfo reports ulMaxSessionCount = N
 *   ecb_noise                    the output of C_Encrypt after a CKM_AES_ECB C_EncryptInit gets its first byte
 *                                changed, differently each call: a module whose key fingerprint is not deterministic
 *
 * The file is re-read whenever its modification time changes, so a test can change the
 * behaviour of a running plugin. With P11FAULT_CALLLOG set, each wrapped call appends its name
 * to that file, and C_Initialize also a line "C_Initialize:flags=0xN" (or ":args=NULL") with the
 * CK_C_INITIALIZE_ARGS flags it was given, and a line "C_Initialize:reserved=TEXT" when pReserved is set. It exists for failures a real HSM cannot be made to produce on demand.
 */
#include <dlfcn.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/random.h>
#include <sys/stat.h>
#include <time.h>
#include <p11-kit/pkcs11.h>

#define MAX_RULES 32

struct rule { char function[64]; CK_RV rv; long count; };

static CK_FUNCTION_LIST_PTR real;
static CK_FUNCTION_LIST shim;
static pthread_mutex_t lock = PTHREAD_MUTEX_INITIALIZER;
static struct rule rules[MAX_RULES];
static int rule_count;
static long latency_ms;
static char gcm_iv_mode[16];
static long max_sessions = -1;
static long report_max_sessions = -1;
static int ecb_noise;
static CK_MECHANISM_TYPE session_mechanism[4096];  /* last C_EncryptInit mechanism, by session handle */
static long open_sessions;
static struct timespec control_mtime;

static void reload_control(void) {
    const char *path = getenv("P11FAULT_CONTROL");
    struct stat st;
    if (!path || stat(path, &st) != 0) {
        rule_count = 0; latency_ms = 0; gcm_iv_mode[0] = 0; max_sessions = -1; report_max_sessions = -1;
        ecb_noise = 0; return;
    }
    if (st.st_mtim.tv_sec == control_mtime.tv_sec && st.st_mtim.tv_nsec == control_mtime.tv_nsec) return;
    control_mtime = st.st_mtim;
    rule_count = 0; latency_ms = 0; gcm_iv_mode[0] = 0; max_sessions = -1; report_max_sessions = -1; ecb_noise = 0;
    FILE *f = fopen(path, "r");
    if (!f) return;
    char line[256];
    while (fgets(line, sizeof line, f)) {
        struct rule r;
        unsigned long rv;
        if (sscanf(line, "latency_ms %ld", &latency_ms) == 1) continue;
        if (sscanf(line, "gcm_iv %15s", gcm_iv_mode) == 1) continue;
        if (sscanf(line, "max_sessions %ld", &max_sessions) == 1) continue;
        if (sscanf(line, "report_max_sessions %ld", &report_max_sessions) == 1) continue;
        if (strncmp(line, "ecb_noise", 9) == 0) { ecb_noise = 1; continue; }
        if (rule_count < MAX_RULES && sscanf(line, "fail %63s %lx %ld", r.function, &rv, &r.count) == 3) {
            r.rv = (CK_RV)rv;
            rules[rule_count++] = r;
        }
    }
    fclose(f);
}

static void log_call(const char *function) {
    const char *path = getenv("P11FAULT_CALLLOG");
    if (!path) return;
    FILE *f = fopen(path, "a");
    if (f) { fprintf(f, "%s\n", function); fclose(f); }
}

/* Returns 1 and sets *rv when the call must fail instead of reaching the real module. */
static int inject(const char *function, CK_RV *rv) {
    long sleep_ms;
    int hit = 0;
    pthread_mutex_lock(&lock);
    reload_control();
    log_call(function);
    sleep_ms = latency_ms;
    for (int i = 0; i < rule_count; i++) {
        if (strcmp(rules[i].function, function) == 0 && rules[i].count != 0) {
            if (rules[i].count > 0) rules[i].count--;
            *rv = rules[i].rv;
            hit = 1;
            break;
        }
    }
    pthread_mutex_unlock(&lock);
    if (sleep_ms > 0) {
        struct timespec t = { sleep_ms / 1000, (sleep_ms % 1000) * 1000000L };
        nanosleep(&t, NULL);
    }
    return hit;
}

#define WRAP(name, params, args) \
    static CK_RV wrap_##name params { CK_RV rv; if (inject(#name, &rv)) return rv; return real->name args; }

/* Records the initialisation flags, so a test can prove the caller asked for OS locking. */
static CK_RV wrap_C_Initialize(CK_VOID_PTR a) {
    CK_RV rv;
    const char *path = getenv("P11FAULT_CALLLOG");
    if (path) {
        FILE *f = fopen(path, "a");
        if (f) {
            if (a) fprintf(f, "C_Initialize:flags=0x%lx\n", (unsigned long)((CK_C_INITIALIZE_ARGS *)a)->flags);
            else fprintf(f, "C_Initialize:args=NULL\n");
            if (a && ((CK_C_INITIALIZE_ARGS *)a)->pReserved)
                fprintf(f, "C_Initialize:reserved=%s\n", (const char *)((CK_C_INITIALIZE_ARGS *)a)->pReserved);
            fclose(f);
        }
    }
    if (inject("C_Initialize", &rv)) return rv;
    return real->C_Initialize(a);
}
WRAP(C_GetSlotList, (CK_BBOOL p, CK_SLOT_ID_PTR l, CK_ULONG_PTR n), (p, l, n))
static CK_RV wrap_C_GetTokenInfo(CK_SLOT_ID s, CK_TOKEN_INFO_PTR i) {
    CK_RV rv;
    long report;
    if (inject("C_GetTokenInfo", &rv)) return rv;
    rv = real->C_GetTokenInfo(s, i);
    pthread_mutex_lock(&lock);
    report = report_max_sessions;
    pthread_mutex_unlock(&lock);
    if (rv == CKR_OK && report >= 0) i->ulMaxSessionCount = (CK_ULONG)report;
    return rv;
}
/* Opens a session unless max_sessions are already open through this module. */
static CK_RV wrap_C_OpenSession(CK_SLOT_ID s, CK_FLAGS f, CK_VOID_PTR a, CK_NOTIFY n, CK_SESSION_HANDLE_PTR h) {
    CK_RV rv;
    if (inject("C_OpenSession", &rv)) return rv;
    pthread_mutex_lock(&lock);
    if (max_sessions >= 0 && open_sessions >= max_sessions) { pthread_mutex_unlock(&lock); return CKR_SESSION_COUNT; }
    open_sessions++;
    pthread_mutex_unlock(&lock);
    rv = real->C_OpenSession(s, f, a, n, h);
    if (rv != CKR_OK) { pthread_mutex_lock(&lock); open_sessions--; pthread_mutex_unlock(&lock); }
    return rv;
}

static CK_RV wrap_C_CloseSession(CK_SESSION_HANDLE h) {
    CK_RV rv = real->C_CloseSession(h);
    if (rv == CKR_OK) { pthread_mutex_lock(&lock); if (open_sessions > 0) open_sessions--; pthread_mutex_unlock(&lock); }
    return rv;
}

/* The IV a CloudHSM-like module generates: a fresh random 96-bit value, written into pIv. */
static CK_RV module_iv(CK_MECHANISM_PTR m) {
    CK_GCM_PARAMS *params;
    char mode[16];
    pthread_mutex_lock(&lock);
    reload_control();
    memcpy(mode, gcm_iv_mode, sizeof mode);
    pthread_mutex_unlock(&lock);
    if (!mode[0] || !m || m->mechanism != CKM_AES_GCM || !m->pParameter) return CKR_OK;
    params = (CK_GCM_PARAMS *)m->pParameter;
    if (!params->pIv || params->ulIvLen == 0) return CKR_MECHANISM_PARAM_INVALID;
    if (strcmp(mode, "refuse") == 0) {
        for (CK_ULONG i = 0; i < params->ulIvLen; i++)
            if (params->pIv[i]) return CKR_MECHANISM_PARAM_INVALID;
    }
    if (getrandom(params->pIv, params->ulIvLen, 0) != (ssize_t)params->ulIvLen) return CKR_GENERAL_ERROR;
    return CKR_OK;
}

static CK_RV wrap_C_EncryptInit(CK_SESSION_HANDLE h, CK_MECHANISM_PTR m, CK_OBJECT_HANDLE k) {
    CK_RV rv;
    if (inject("C_EncryptInit", &rv)) return rv;
    if ((rv = module_iv(m)) != CKR_OK) return rv;
    session_mechanism[h % 4096] = m ? m->mechanism : 0;
    return real->C_EncryptInit(h, m, k);
}

static CK_RV wrap_C_Encrypt(CK_SESSION_HANDLE h, CK_BYTE_PTR d, CK_ULONG l, CK_BYTE_PTR o, CK_ULONG_PTR ol) {
    CK_RV rv;
    int noise;
    if (inject("C_Encrypt", &rv)) return rv;
    rv = real->C_Encrypt(h, d, l, o, ol);
    pthread_mutex_lock(&lock);
    noise = ecb_noise;
    pthread_mutex_unlock(&lock);
    if (rv == CKR_OK && noise && o && ol && *ol > 0 && session_mechanism[h % 4096] == CKM_AES_ECB) {
        static unsigned char counter;  /* a different non-zero change on each call: never the same answer twice */
        pthread_mutex_lock(&lock);
        if (++counter == 0) counter = 1;
        o[0] ^= counter;
        pthread_mutex_unlock(&lock);
    }
    return rv;
}
WRAP(C_Login, (CK_SESSION_HANDLE h, CK_USER_TYPE u, CK_UTF8CHAR_PTR p, CK_ULONG l), (h, u, p, l))
WRAP(C_FindObjectsInit, (CK_SESSION_HANDLE h, CK_ATTRIBUTE_PTR t, CK_ULONG n), (h, t, n))
WRAP(C_DecryptInit, (CK_SESSION_HANDLE h, CK_MECHANISM_PTR m, CK_OBJECT_HANDLE k), (h, m, k))
WRAP(C_Decrypt, (CK_SESSION_HANDLE h, CK_BYTE_PTR d, CK_ULONG l, CK_BYTE_PTR o, CK_ULONG_PTR ol), (h, d, l, o, ol))

CK_RV C_GetFunctionList(CK_FUNCTION_LIST_PTR_PTR list) {
    if (!real) {
        const char *path = getenv("P11FAULT_MODULE");
        void *lib = path ? dlopen(path, RTLD_NOW | RTLD_LOCAL) : NULL;
        CK_C_GetFunctionList get = lib ? (CK_C_GetFunctionList)dlsym(lib, "C_GetFunctionList") : NULL;
        if (!get || get(&real) != CKR_OK) return CKR_GENERAL_ERROR;
        shim = *real;
        shim.C_Initialize = wrap_C_Initialize;
        shim.C_GetSlotList = wrap_C_GetSlotList;
        shim.C_GetTokenInfo = wrap_C_GetTokenInfo;
        shim.C_OpenSession = wrap_C_OpenSession;
        shim.C_CloseSession = wrap_C_CloseSession;
        shim.C_Login = wrap_C_Login;
        shim.C_FindObjectsInit = wrap_C_FindObjectsInit;
        shim.C_EncryptInit = wrap_C_EncryptInit;
        shim.C_Encrypt = wrap_C_Encrypt;
        shim.C_DecryptInit = wrap_C_DecryptInit;
        shim.C_Decrypt = wrap_C_Decrypt;
    }
    *list = &shim;
    return CKR_OK;
}
