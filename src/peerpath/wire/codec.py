"""Decoding msgpack that came from the network: the one place that knows every way msgspec
fails on it, mapped to the caller's own error."""

from __future__ import annotations

from typing import TypeVar

import msgspec

T = TypeVar("T")


def decode(decoder: msgspec.msgpack.Decoder[T], data: bytes, error: type[Exception], what: str) -> T:
    """``data`` decoded, or ``error("malformed WHAT: why")``: for bytes that are not msgpack,
    a field out of its bounds (msgspec's ValidationError is a DecodeError), or nesting too
    deep (msgspec recurses into arrays and maps, even those of a field it skips)."""
    try:
        return decoder.decode(data)
    except msgspec.DecodeError as exc:
        raise error(f"malformed {what}: {exc}") from exc
    except RecursionError:
        raise error(f"malformed {what}: nested too deeply") from None
