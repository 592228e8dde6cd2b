/*
 * p11fault: a pass-through PKCS#11 module for tests. It forwards every call to the module named
 * by P11FAULT_MODULE and, for the functions wrapped below, first applies what the control file
 * (P11FAULT_CONTROL) asks for:
 *
 *   latency_ms N                 sleep N ms before each wrapped call
 *   fail C_Function 0xCKR COUNT  answer CKR instead of calling through, COUNT times (-1: always)
 *
 * The file is re-read whenever its modification time changes, so a test can change the
 * behaviour of a running plugin. With P11FAULT_CALLLOG set, each wrapped call appends its name
 * to that file, and C_Initialize also a line "C_Initialize:flags=0xN" (or ":args=NULL") with the
 * CK_C_INITIALIZE_ARGS flags it was given. It exists for failures a real HSM cannot be made to produce on demand.
 */
#include <dlfcn.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
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
static struct timespec control_mtime;

static void reload_control(void) {
    const char *path = getenv("P11FAULT_CONTROL");
    struct stat st;
    if (!path || stat(path, &st) != 0) { rule_count = 0; latency_ms = 0; return; }
    if (st.st_mtim.tv_sec == control_mtime.tv_sec && st.st_mtim.tv_nsec == control_mtime.tv_nsec) return;
    control_mtime = st.st_mtim;
    rule_count = 0; latency_ms = 0;
    FILE *f = fopen(path, "r");
    if (!f) return;
    char line[256];
    while (fgets(line, sizeof line, f)) {
        struct rule r;
        unsigned long rv;
        if (sscanf(line, "latency_ms %ld", &latency_ms) == 1) continue;
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
            fclose(f);
        }
    }
    if (inject("C_Initialize", &rv)) return rv;
    return real->C_Initialize(a);
}
WRAP(C_GetSlotList, (CK_BBOOL p, CK_SLOT_ID_PTR l, CK_ULONG_PTR n), (p, l, n))
WRAP(C_GetTokenInfo, (CK_SLOT_ID s, CK_TOKEN_INFO_PTR i), (s, i))
WRAP(C_OpenSession, (CK_SLOT_ID s, CK_FLAGS f, CK_VOID_PTR a, CK_NOTIFY n, CK_SESSION_HANDLE_PTR h), (s, f, a, n, h))
WRAP(C_Login, (CK_SESSION_HANDLE h, CK_USER_TYPE u, CK_UTF8CHAR_PTR p, CK_ULONG l), (h, u, p, l))
WRAP(C_FindObjectsInit, (CK_SESSION_HANDLE h, CK_ATTRIBUTE_PTR t, CK_ULONG n), (h, t, n))
WRAP(C_EncryptInit, (CK_SESSION_HANDLE h, CK_MECHANISM_PTR m, CK_OBJECT_HANDLE k), (h, m, k))
WRAP(C_Encrypt, (CK_SESSION_HANDLE h, CK_BYTE_PTR d, CK_ULONG l, CK_BYTE_PTR o, CK_ULONG_PTR ol), (h, d, l, o, ol))
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
