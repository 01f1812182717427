"""Per-class content keys: which version of a class's images a latent store was encoded from.

A dataset's ``dataset_key`` names the tree and its preprocessing, not the bytes
of its files: editing or replacing an image of an ImageFolder class changes
neither. :func:`class_content_key` does: it hashes the (``<split>/<item id>``,
sha256) of exactly the files the source lists for the class
(``ImageSource.listing``: the train and test items, by their stored ids), never
re-walking the tree, so a file the source skips (a hidden entry, a name that is
not UTF-8, a FIFO, a damaged file) is never hashed and every file hashed is one
the encoder reads. Reading every file at
each run would cost as much as decoding them, so each file's sha256 is cached
(a small JSON file per class) with its size, mtime, ctime and inode, and a file
is read again only when one of those changed. The ctime and inode catch a file
replaced by another of the same size and mtime (``cp -p``, ``os.utime``); a
file merely touched is re-hashed, gives the same sha256, and so the same key.

Datasets whose content is fixed by their ``dataset_key`` (the embedded MNIST
subset shipped in a package, synthetic sources) key a class by that alone.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path

log = logging.getLogger(__name__)

# Bump when the key's recipe changes (it is a data version: a change re-encodes every class).
CONTENT_KEY_VERSION = 1
_READ_BLOCK = 1 << 20


def _file_sha256(path: Path) -> str:
    """sha256 of the file's bytes; an unreadable file keys by its error (the data layer
    reports it as skipped when the class is listed), so it never breaks the observation."""
    h = hashlib.sha256()
    try:
        with open(path, "rb") as f:
            while block := f.read(_READ_BLOCK):
                h.update(block)
    except OSError as e:
        return f"unreadable:{e.errno}"
    return h.hexdigest()


def _stat_signature(st: os.stat_result) -> list[int]:
    return [st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_ino]


def _listed_files(source, class_id: str) -> list[tuple[str, Path]]:
    """(``<split>/<item id>``, path) of every file of the class's listing, sorted: the
    source's own listing, so the key covers exactly what the stages read."""
    listing = source.listing(class_id)
    out = [(f"{split}/{item}", path) for split, files in listing.files.items() for item, path in files.items()]
    return sorted(out, key=lambda entry: entry[0])


def _read_cache(cache: Path) -> dict:
    try:
        data = json.loads(cache.read_text())
        return data["files"] if data.get("version") == CONTENT_KEY_VERSION else {}
    except (OSError, ValueError, KeyError, TypeError):
        return {}  # missing or damaged: every file is hashed again, nothing is trusted


def _write_cache(cache: Path, files: dict) -> None:
    """Atomically (temp file + rename); a failure to write only costs re-hashing next time."""
    try:
        cache.parent.mkdir(parents=True, exist_ok=True)
        tmp = cache.with_name(f"{cache.name}.tmp{os.getpid()}")
        tmp.write_text(json.dumps({"version": CONTENT_KEY_VERSION, "files": files}))
        os.replace(tmp, cache)
    except OSError as e:
        log.warning("could not write the content-key cache %s (%s); files will be hashed again", cache, e)


@dataclass(frozen=True)
class ClassContent:
    """A class's content key and what it was computed from: ``{<split>/<item id>: (path, sha256)}``
    of every listed file (``missing:<errno>`` for a listed file that could not be read)."""

    key: str
    files: dict[str, tuple[Path, str]]

    def changed_since(self, before: "ClassContent") -> list[Path]:
        """The files added, removed or rewritten between ``before`` and this content."""
        return sorted({path for rel, (path, _) in {**before.files, **self.files}.items()
                       if before.files.get(rel, (None, None))[1] != self.files.get(rel, (None, None))[1]})


def class_content(source, class_id: str, cache: Path | None = None) -> ClassContent:
    """The content key of one class (see :func:`class_content_key`) with its per-file hashes."""
    h = hashlib.sha256(f"v{CONTENT_KEY_VERSION}\0{source.dataset_key}\0{class_id}\0".encode())
    listed = _listed_files(source, class_id)
    hashed: dict[str, tuple[Path, str]] = {}
    if listed:
        known = _read_cache(cache) if cache is not None else {}
        files, rehashed = {}, 0
        for rel, path in listed:
            try:
                sig = _stat_signature(path.stat())
            except OSError as e:
                # Listed, then gone (or unreadable): keyed as such, so the key differs from
                # both the listing with the file and the next one without it.
                hashed[rel] = (path, f"missing:{e.errno}")
                h.update(f"{rel}\0missing:{e.errno}\n".encode())
                continue
            entry = known.get(rel)
            if entry is None or entry[0] != sig:
                entry, rehashed = [sig, _file_sha256(path)], rehashed + 1
            files[rel] = entry
            hashed[rel] = (path, entry[1])
            h.update(f"{rel}\0{entry[1]}\n".encode())
        if cache is not None and (rehashed or files.keys() != known.keys()):
            _write_cache(cache, files)
    return ClassContent(h.hexdigest()[:16], hashed)


def class_content_key(source, class_id: str, cache: Path | None = None) -> str:
    """A short hex key of one class's image content (see the module docstring).

    ``source``: an ``ImageSource``; ``cache``: the JSON file caching file hashes
    for this class (None = hash every file). The key also covers the dataset key
    (preprocessing, split seed, cap), so it changes whenever the class's encoded
    pixels can.
    """
    return class_content(source, class_id, cache).key


# Encodings of one class before giving up on files that keep changing while they are read.
ENCODE_ATTEMPTS = 3
# The content key a store records when its files kept changing: no observation ever gives it,
# so the store is encoded again by the next materialization.
UNSETTLED_CONTENT_KEY = "unsettled"


def encode_settled(class_id: str, source, content: ClassContent, relisted, encode):
    """``encode(source, content_key)`` the class, then key its files again (``relisted()`` ->
    (a fresh source, its ``ClassContent``)): a file deleted or rewritten while the class was
    read would make the recorded key a lie, so if anything changed the class is encoded again,
    from the files as they are then, with a warning naming what changed (a file that vanished is
    left out). The last of ``ENCODE_ATTEMPTS`` encodings is recorded as ``UNSETTLED_CONTENT_KEY``."""
    from .image_source import display_path

    for attempt in range(1, ENCODE_ATTEMPTS):
        result = encode(source, content.key)
        source, now = relisted()
        if now.key == content.key:
            return result
        changed = now.changed_since(content)
        shown = ", ".join(display_path(p) for p in changed[:5]) + (
            f" and {len(changed) - 5} more" if len(changed) > 5 else "")
        log.warning("class %s: files changed while the class was being encoded (%s); encoding it again%s",
                    class_id, shown, " (a last time: the store will be encoded again by the next "
                    "materialization)" if attempt + 1 == ENCODE_ATTEMPTS else "")
        content = now
    return encode(source, UNSETTLED_CONTENT_KEY)
