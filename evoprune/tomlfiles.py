"""Reading the user's TOML files (search configs, task files): one clear error for every way a
file can be wrong, never a traceback."""
from __future__ import annotations

from evoprune.errors import EvopruneError

MAX_BYTES = 1 << 20  # a config or task file is a few KB; a larger one is not what the user meant


def read_toml(path, what: str) -> dict:
    """A user's TOML file as a dict; a missing, unreadable or malformed file is one EvopruneError."""
    import tomllib

    try:
        with open(path, "rb") as f:
            raw = f.read(MAX_BYTES + 1)
    except FileNotFoundError:
        raise EvopruneError(f"{what} not found: {path}") from None
    except IsADirectoryError:
        raise EvopruneError(f"{what} {path} is a directory, not a file") from None
    except OSError as e:  # permissions, a symlink loop, a device
        raise EvopruneError(f"{what} {path} cannot be read: {e.strerror or e}") from None
    if len(raw) > MAX_BYTES:
        raise EvopruneError(f"{what} {path} is larger than {MAX_BYTES // 1024} KiB: not a config file")
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise EvopruneError(f"{what} {path} is not UTF-8 text (byte {e.start}); TOML files are UTF-8") from None
    try:
        return tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        raise EvopruneError(f"{what} {path} is not valid TOML: {e}") from None


