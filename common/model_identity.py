"""A served model's identity as a Generate call's initial metadata carries it.

`x-tokenwire-model: <name>;vocab=<vocabulary size>;eos=<EOS ids, sorted, comma-separated>`,
the name percent-encoded (metadata is printable ASCII). Two servers with the same identity can
continue each other's streams: the same name, vocabulary and EOS ids. The server sends it on
every stream, so a client checks the replica that actually streams, whichever one a shared
channel (a dns:/// name) reached.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from urllib.parse import quote, unquote

HEADER = "x-tokenwire-model"
_FORMAT = re.compile(r"([\x21-\x7e]+);vocab=([0-9]{1,10});eos=((?:[0-9]{1,10}(?:,[0-9]{1,10})*)?)")


def model_header(name: str, vocab_size: int, eos_token_ids: Iterable[int]) -> str:
    """The header's value for a model."""
    eos = ",".join(str(i) for i in sorted(eos_token_ids))
    return f"{quote(name, safe='')};vocab={vocab_size};eos={eos}"


def parse_model_header(value: str) -> tuple[str, int, tuple[int, ...]] | None:
    """(name, vocabulary size, EOS ids) of a header's value; None when it is not one."""
    match = _FORMAT.fullmatch(value)
    if match is None:
        return None
    name, vocab, eos = match.groups()
    return unquote(name), int(vocab), tuple(int(i) for i in eos.split(",") if i)
