"""Bearer API keys, as the server and the edge both read them: `TOKENWIRE_API_KEYS`
(comma-separated) plus `TOKENWIRE_API_KEYS_FILE` (one a line, blank lines and `#` comments
skipped). A setting that would leave authentication off without saying so is refused."""

from __future__ import annotations

from pathlib import Path

from tokenwire.common.settings import SettingsError, require


def valid_key(key: str) -> bool:
    """A key travels as `authorization: Bearer <key>` metadata: visible ASCII, no spaces."""
    return bool(key) and all("!" <= c <= "~" for c in key)


def key_lines(path: Path) -> list[tuple[int, str]]:
    """(line number from 1, key) for each key line of a keys file."""
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as exc:
        raise SettingsError("api_keys_file", f"cannot read {str(path)!r}: {exc}") from exc
    return [
        (number, key)
        for number, line in enumerate(lines, start=1)
        if (key := line.strip()) and not key.startswith("#")
    ]


def read_api_keys(path: Path) -> tuple[str, ...]:
    """The keys in a keys file."""
    return tuple(key for _, key in key_lines(path))


def check_api_keys(keys: tuple[str, ...], keys_file: Path | None) -> None:
    """Every key valid (a bad one named by its place, never shown), and a keys file that holds
    at least one (an empty one would turn authentication off)."""
    bad = [i for i, key in enumerate(keys) if not valid_key(key)]
    require(not bad, "api_keys", "visible ASCII without spaces", f"<key #{bad[0]}>" if bad else "")
    if keys_file is not None:
        lines = key_lines(keys_file)
        require(bool(lines), "api_keys_file", "a file with at least one key", str(keys_file))
        bad = [number for number, key in lines if not valid_key(key)]
        require(
            not bad, "api_keys_file", "visible ASCII keys", f"<key on line {bad[0]}>" if bad else ""
        )


def all_api_keys(keys: tuple[str, ...], keys_file: Path | None) -> tuple[str, ...]:
    """The keys plus the file's; empty means authentication is off."""
    from_file = read_api_keys(keys_file) if keys_file is not None else ()
    if keys_file is not None and not from_file:
        # Emptied since the settings were checked: authentication must not quietly go off.
        raise SettingsError("api_keys_file", f"{str(keys_file)!r} holds no key")
    return keys + from_file
