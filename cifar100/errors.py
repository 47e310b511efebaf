"""The one exception type that means "the user asked for something we cannot do", and how its
messages quote what the user gave."""

from __future__ import annotations

import os
import reprlib
from typing import Any

SHOWN = 200  # characters of a user's value an error message quotes at most

# Bounded at every level, so quoting a huge or deeply nested value costs little and prints little.
_REPR = reprlib.Repr()
_REPR.maxlevel, _REPR.maxdict, _REPR.maxlist, _REPR.maxtuple, _REPR.maxstring, _REPR.maxother = 3, 6, 6, 6, SHOWN, SHOWN


class UserError(Exception):
    """Bad input (config, recipe, data, checkpoint): the CLI prints the message and exits 2."""


def shown(value: Any) -> str:
    """A user's value as an error message quotes it: its repr, at most about `SHOWN` characters."""
    return clip(_REPR.repr(value))


def clip(text: str, limit: int = SHOWN) -> str:
    """`text` cut in the middle to at most `limit` characters (a typed value, a path, a message)."""
    if len(text) <= limit:
        return text
    half = (limit - 1) // 2
    return f"{text[:half]}…{text[-half:]}"


def printable(text: str) -> str:
    """`text` with every character a terminal would act on (newlines, escape sequences, other
    controls and invisible format characters) written as its backslash escape."""
    return "".join(c if c.isprintable() else repr(c)[1:-1] for c in text)


def shown_path(path: str | os.PathLike[str]) -> str:
    """A file name as a message shows it: `printable`, each byte that is not UTF-8 as `\\xNN`,
    cut to about `SHOWN` characters. A name can neither break a line nor drive the terminal."""
    return clip(printable(os.fsencode(path).decode("utf-8", "backslashreplace")))
