"""Bytes <-> contracts: msgspec for Structs (the fast path), pydantic for BaseModels."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import msgspec
import pydantic

from .contract import ContractInfo, contract_info
from .errors import DecodeError

__all__ = ["Codec", "codec_for", "encode"]

_encoder = msgspec.json.Encoder()
_TOO_DEEP = "nested too deeply (more than about 1,000 levels of arrays or objects)"


class Codec:
    """Encoder and decoder of one contract class, built once and cached."""

    __slots__ = ("decode", "info")

    def __init__(self, info: ContractInfo) -> None:
        self.info = info
        self.decode: Callable[[bytes], Any] = _struct_decoder(info) if info.is_struct else _model_decoder(info)


def _struct_decoder(info: ContractInfo) -> Callable[[bytes], Any]:
    decoder = msgspec.json.Decoder(info.cls)
    decode = decoder.decode
    name = info.name

    def decode_struct(data: bytes) -> Any:
        try:
            return decode(data)
        except msgspec.ValidationError as exc:
            raise DecodeError(f"{name}: {exc}") from None
        except msgspec.DecodeError as exc:
            raise DecodeError(f"{name}: malformed JSON: {exc}") from None
        except RecursionError:  # msgspec's answer to JSON nested deeper than it recurses
            raise DecodeError(f"{name}: malformed JSON: {_TOO_DEEP}") from None

    return decode_struct


def _model_decoder(info: ContractInfo) -> Callable[[bytes], Any]:
    model: type[pydantic.BaseModel] = info.cls
    name = info.name

    def decode_model(data: bytes) -> Any:
        try:
            return model.model_validate_json(data)
        except pydantic.ValidationError as exc:
            problems = "; ".join(
                f"{e['msg']} - at $.{'.'.join(str(p) for p in e['loc'])}" if e["loc"] else e["msg"]
                for e in exc.errors()
            )
            raise DecodeError(f"{name}: {problems}") from None

    return decode_model


_codecs: dict[type[Any], Codec] = {}


def codec_for(cls: type[Any]) -> Codec:
    """The cached codec of a contract class."""
    codec = _codecs.get(cls)
    if codec is None:
        codec = _codecs[cls] = Codec(contract_info(cls))
    return codec


def encode(message: Any) -> bytes:
    """The JSON body of a contract instance."""
    if isinstance(message, pydantic.BaseModel):
        return message.model_dump_json().encode()
    return _encoder.encode(message)
