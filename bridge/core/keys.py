"""The recording key ring: AES-256 keys by id, from a key file and/or an environment variable.

Both sources use the same text format, one key per entry::

    # comments and blank lines are ignored
    2026q3:Zm9vYmFy...   (key id, a colon, 32 bytes in standard base64)

Entries in the environment variable may also be separated by commas,
semicolons or spaces. Every key listed can decrypt; ``current`` names the one
that encrypts new recordings, so rotating is: add a new key, point
``current`` at it, keep the old ones for as long as their recordings exist.

Key material never appears in an error message, a log line or a repr.
"""
from __future__ import annotations

import base64
import binascii
import os
import re
import stat

KEY_ID = re.compile(r"^[A-Za-z0-9._-]{1,64}$")
KEY_BYTES = 32


class KeyRingError(ValueError):
    pass


class KeyRing:
    def __init__(self, keys: dict[str, bytes], current: str):
        if current not in keys:
            raise KeyRingError(f"current key {current!r} is not in the key ring")
        self._keys = dict(keys)
        self.current = current
        self.warnings: list[str] = []

    @property
    def ids(self) -> list[str]:
        return sorted(self._keys)

    def key(self, key_id: str) -> bytes:
        try:
            return self._keys[key_id]
        except KeyError:
            raise KeyRingError(f"no key {key_id!r} in the key ring") from None

    def __contains__(self, key_id: str) -> bool:
        return key_id in self._keys

    def __repr__(self) -> str:
        return f"KeyRing(ids={self.ids}, current={self.current!r})"


def parse_keys(text: str, source: str, env: bool = False) -> dict[str, bytes]:
    """``id:base64`` entries to {id: key}. Errors name the source and entry, never the key."""
    keys: dict[str, bytes] = {}
    entries: list[tuple[str, str]] = []
    for n, line in enumerate(text.splitlines(), 1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        parts = re.split(r"[\s,;]+", line) if env else [line]
        # an entry is named by its position, never by its text: a malformed entry may be key material
        entries += [(f"entry {len(entries) + i + 1}" if env else f"line {n}", p)
                    for i, p in enumerate(q for q in parts if q)]
    for where, entry in entries:
        kid, sep, b64 = entry.partition(":")
        kid = kid.strip()
        if not sep or not KEY_ID.match(kid):
            raise KeyRingError(f"{source}: {where}: expected KEY_ID:BASE64 (id of letters, digits, . _ -)")
        try:
            key = base64.b64decode(b64.strip(), validate=True)
        except (binascii.Error, ValueError):
            raise KeyRingError(f"{source}: key {kid!r} is not valid base64") from None
        if len(key) != KEY_BYTES:
            raise KeyRingError(f"{source}: key {kid!r} is {len(key)} bytes; AES-256 needs {KEY_BYTES}")
        if kid in keys and keys[kid] != key:
            raise KeyRingError(f"{source}: key {kid!r} is listed twice with different material")
        keys[kid] = key
    return keys


def load_keyring(key_file: str, key_env: str, current: str, environ=None) -> KeyRing:
    """The key ring from the configured sources; ``KeyRingError`` says what is wrong."""
    environ = os.environ if environ is None else environ
    keys: dict[str, bytes] = {}
    warnings = []
    if key_file:
        path = os.path.expanduser(key_file)
        try:
            with open(path, encoding="utf-8") as f:
                text = f.read()
            mode = os.stat(path).st_mode
        except OSError as exc:
            raise KeyRingError(f"key_file: cannot read {key_file}: {exc.strerror}") from None
        except UnicodeDecodeError:
            raise KeyRingError(f"key_file: {key_file} is not a text file") from None
        if mode & (stat.S_IRWXG | stat.S_IRWXO):
            warnings.append(f"key file {key_file} is readable by group/others; chmod 600 it")
        keys.update(parse_keys(text, "key_file"))
    if key_env and environ.get(key_env):
        for kid, key in parse_keys(environ[key_env], key_env, env=True).items():
            if kid in keys and keys[kid] != key:
                raise KeyRingError(f"key {kid!r} differs between key_file and {key_env}")
            keys[kid] = key
    if not keys:
        where = " or ".join(x for x in (key_file and f"key_file {key_file}", key_env and f"${key_env}") if x)
        raise KeyRingError(f"no recording keys found (looked in {where or 'nothing: set key_file or key_env'})")
    if not current:
        if len(keys) > 1:
            raise KeyRingError("current_key: several keys are configured; name the one that encrypts new "
                               "recordings")
        current = next(iter(keys))
    if current not in keys:
        raise KeyRingError(f"current_key: no key {current!r} (have: {', '.join(sorted(keys))})")
    ring = KeyRing(keys, current)
    ring.warnings = warnings
    return ring


def new_key_line(key_id: str) -> str:
    """A fresh random key in the key-file format (for operators and tests)."""
    if not KEY_ID.match(key_id):
        raise KeyRingError("key ids are letters, digits, . _ - (at most 64)")
    return f"{key_id}:{base64.b64encode(os.urandom(KEY_BYTES)).decode()}"


def may_record(rec_cfg: dict) -> bool:
    """Whether calls can be recorded without an API request (the default or a number rule)."""
    return bool(rec_cfg["enabled"] or any(rec_cfg["numbers"].values()))


def configured_keyring(rec_cfg: dict, environ=None) -> KeyRing | None:
    """The key ring of a ``[recordings]`` section: None when no key source is configured and
    nothing is recorded by default; ``KeyRingError`` when keys are needed, missing or invalid."""
    environ = os.environ if environ is None else environ
    file, env = rec_cfg["key_file"], rec_cfg["key_env"]
    if not file and not (env and environ.get(env)) and not may_record(rec_cfg):
        return None
    return load_keyring(file, env, rec_cfg["current_key"], environ)


# -- the key ring of the records (transcripts, events, journals: bridge/records/cipher.py) -------------
LOCAL_KEY_NAME = "records.key"
_RECORDS_CFG: dict[str, tuple] = {}        # data dir -> (recordings section, records section, environ)
_RECORDS_RINGS: dict[str, KeyRing] = {}
_warned_local: set[str] = set()


def _dir_key(data_dir: str) -> str:
    return os.path.realpath(os.path.abspath(os.path.expanduser(data_dir)))


def configure_records(data_dir: str, rec_cfg: dict, records_cfg: dict, environ=None) -> None:
    """Remember how the records of ``data_dir`` are keyed (``config.load`` calls this)."""
    d = _dir_key(data_dir)
    env = dict(os.environ if environ is None else environ)
    key = (dict(rec_cfg), dict(records_cfg), {k: env.get(k) for k in (rec_cfg.get("key_env"),) if k})
    if _RECORDS_CFG.get(d) != key:
        _RECORDS_CFG[d] = key
        _RECORDS_RINGS.pop(d, None)


def local_key_path(data_dir: str, records_cfg: dict | None = None) -> str:
    path = (records_cfg or {}).get("local_key_file") or os.path.join(data_dir, LOCAL_KEY_NAME)
    return os.path.abspath(os.path.expanduser(path))


def _local_keys(path: str, create: bool) -> dict[str, bytes]:
    if not os.path.exists(path):
        if not create:
            return {}
        os.makedirs(os.path.dirname(path), exist_ok=True)
        # Cells of a box start together: write the key whole to a private file, then link it into
        # place; the first link wins and every other process reads the winner's complete file.
        tmp = f"{path}.{os.getpid()}.tmp"
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        try:
            with os.fdopen(fd, "w") as f:
                f.write("# generated by trunkline: records key used while no key ring is configured\n"
                        + new_key_line("local") + "\n")
                f.flush()
                os.fsync(f.fileno())
            try:
                os.link(tmp, path)
            except FileExistsError:
                pass
        finally:
            os.unlink(tmp)
    with open(path, encoding="utf-8") as f:
        return parse_keys(f.read(), f"records key file {path}")


def records_keyring(data_dir: str) -> KeyRing:
    """The key ring that seals the records of ``data_dir``.

    - The ``[recordings]`` key ring (key_file / key_env) when one is configured; a local key file
      left from before is added to it (decrypt only) so older records stay readable.
    - Otherwise, unless ``records.require_keys`` is set (then ``KeyRingError``): a key generated
      once, mode 0600, in ``records.local_key_file`` (default DATA_DIR/records.key), with a loud
      warning: a key kept beside the data protects nothing against a copy of the whole directory.
    """
    d = _dir_key(data_dir)
    ring = _RECORDS_RINGS.get(d)
    if ring is not None:
        return ring
    rec_cfg, records_cfg, env = _RECORDS_CFG.get(d, ({}, {}, {}))
    local = local_key_path(d, records_cfg)
    ring = None
    if rec_cfg and (rec_cfg.get("key_file") or any(env.values())):
        ring = load_keyring(rec_cfg.get("key_file", ""), rec_cfg.get("key_env", ""),
                            rec_cfg.get("current_key", ""), env)
        extra = _local_keys(local, create=False)
        if extra:
            keys = {kid: ring.key(kid) for kid in ring.ids}
            for kid, k in extra.items():
                keys.setdefault(kid, k)
            warnings = ring.warnings
            ring = KeyRing(keys, ring.current)
            ring.warnings = warnings
    elif records_cfg.get("require_keys"):
        raise KeyRingError("records.require_keys is set but no key ring is configured "
                           "([recordings] key_file or key_env)")
    else:
        keys = _local_keys(local, create=True)
        ring = KeyRing(keys, "local" if "local" in keys else sorted(keys)[0])
        if d not in _warned_local:
            _warned_local.add(d)
            import logging
            logging.getLogger("trunkline.records").warning(
                "no key ring is configured: records are encrypted with a key kept beside them in %s, which "
                "protects nothing against a copy of the data; set [recordings] key_file or key_env "
                "(and records.require_keys = true)", local)
    _RECORDS_RINGS[d] = ring
    return ring


def reset_records() -> None:
    """Forget the records key rings loaded so far (read the key sources again on next use)."""
    _RECORDS_RINGS.clear()
