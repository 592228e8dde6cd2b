"""Edits p11-kit 0.25.5's p11-kit/rpc-transport.c so that a broken connection wakes every waiting reader.

The defect (p11-kit 0.25.5, and the same code in later releases): p11-kit-client lets one thread
read a reply header at a time; a thread that reads a header meant for another thread waits on a
condition variable until that thread has read its body. When the connection breaks between a reply's
header and its body, the reading thread gives up but leaves the header's code in place and signals
nobody, so every other thread with a call in flight waits for ever (seen in p11kms's soak: a
`p11-kit server` killed under load left 15 threads inside C_Encrypt/C_Decrypt for good, and the
plugin's reconnect waited for them).

The edit: a failed read marks the socket as failed and wakes the waiters, which then give up too.
scripts/build-p11kit.sh keeps the unmodified client as well, for the test that shows what p11kms
does when a PKCS#11 library wedges like this (tests/plugin/test_faults.py).

    python scripts/p11kit-wake-readers.py SOURCE_DIR
"""

from __future__ import annotations

import sys
from pathlib import Path

# A read_code no call uses (codes count up from 0x10): "the connection broke, no reply will come".
SENTINEL = "/* p11kms build: the read_code of a broken connection */\n#define READ_FAILED 0xFFFFFFFFu\n\n"
GIVE_UP = "\t\tif (sock->read_code == READ_FAILED)\n\t\t\tbreak;  /* p11kms build: the connection broke */\n"
WAKE_ALL = ("\t/* p11kms build: wake every waiting reader; they all give up instead of waiting for ever */\n"
            "\tif (ret != CKR_OK)\n\t\trpc_socket_set_read_code_inlock (sock, READ_FAILED);\n\n")
READ_LOOP = "\tp11_mutex_lock (&sock->read_lock);\n\n\tfor (;;) {\n"  # rpc_socket_read's loop
READ_END = "\tp11_mutex_unlock (&sock->read_lock);\n\treturn ret;\n}\n"  # and its end


def main() -> None:
    path = Path(sys.argv[1]) / "p11-kit" / "rpc-transport.c"
    text = path.read_text()
    text = _insert(text, before="static rpc_socket *\nrpc_socket_new", what=SENTINEL)
    text = _insert(text, after=READ_LOOP, what=GIVE_UP)
    text = _insert(text, before=READ_END, what=WAKE_ALL)
    path.write_text(text)


def _insert(text: str, what: str, *, before: str = "", after: str = "") -> str:
    anchor = before or after
    if text.count(anchor) != 1:
        raise SystemExit(f"p11kit-wake-readers: the source differs from 0.25.5's (anchor found "
                         f"{text.count(anchor)} times): {anchor[:40]!r}")
    return text.replace(anchor, what + anchor if before else anchor + what)


if __name__ == "__main__":
    main()
