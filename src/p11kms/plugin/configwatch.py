"""Noticing that the config file changed on disk, whichever way it was changed.

Operators and tools change a file in three ways, and each defeats a different watch:

- an in-place write (``>>``, some editors): same inode, new content;
- a replacement by rename (vim, ``install``, Ansible, ``p11kms rotate``): a new inode at the same path;
  an inotify watch on the old inode would see nothing more;
- a Kubernetes volume update: ``cfg -> ..data/cfg`` where the kubelet swaps the ``..data`` symlink;
  neither the path nor its first link changes, only the directory the last link points to.

So the watch polls the *path*, not an inode: once a second it reads the bytes at the path (the read
follows every link, so it always reaches the file a fresh start would read) and takes their SHA-256
digest. The digest alone decides whether the config changed: a ``touch`` or a rewrite with identical
bytes is no change, and an edit within the same mtime tick is still one. The file is a few hundred
bytes, so reading it once a second costs nothing, and a second of delay is nothing beside
kube-apiserver's one-minute Status poll. Polling needs only the standard library and works the same
on every filesystem, including the bind mounts of a static pod where inotify events from the host
may never arrive.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path

GENERATION_CHARS = 12  # hex digits of the SHA-256 shown as the config "generation"
POLL_SECONDS = 1.0


def generation_of(content: bytes) -> str:
    """The config generation: a short SHA-256 of the file's bytes, the same on every node with the same file."""
    return hashlib.sha256(content).hexdigest()[:GENERATION_CHARS]


def file_generation(path: Path) -> str | None:
    """The generation of the file at ``path`` now, or None when it cannot be read."""
    try:
        return generation_of(Path(path).read_bytes())
    except OSError:
        return None


@dataclass(frozen=True)
class Change:
    """The config's content differs from the last generation seen."""

    generation: str | None  # None when the file cannot be read


class ConfigWatch:
    """Tells, on each :meth:`poll`, whether the config's content differs from the last one seen.

    ``seen`` is the generation the plugin last loaded or rejected; a rejected generation is not
    retried until the file changes again (or SIGHUP asks for it), so a broken file is logged once,
    not once a second.
    """

    def __init__(self, path: Path, seen: str | None) -> None:
        self.path = Path(path)
        self.seen = seen

    def poll(self) -> Change | None:
        """The change when the content differs from the last generation seen, else None."""
        generation = file_generation(self.path)
        return None if generation == self.seen else Change(generation)

    def settle(self, generation: str | None) -> None:
        """Records the generation the plugin has acted on (loaded, or rejected)."""
        self.seen = generation
