"""Bytes <-> contracts: msgspec for Structs (the fast path), pydantic for BaseModels."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import msgspec
import msgspec.inspect
import pydantic

from .contract import ContractInfo, contract_info
from .errors import ContractError, DecodeError

__all__ = ["Codec", "codec_for", "encode", "projection_decoder"]

_encoder = msgspec.json.Encoder()
_TOO_DEEP = "nested too deeply (more than about 1,000 levels of arrays or objects)"


class Codec:
    """Encoder and decoder of one contract class, built once and cached."""

    __slots__ = ("decode", "info")

    def __init__(self, info: ContractInfo) -> None:
        self.info = info
        self.decode: Callable[[bytes], Any] = _struct_decoder(info) if info.is_struct else _model_decoder(info)


def _struct_decoder(info: ContractInfo) -> Callable[[bytes], Any]:
    return _decoder(msgspec.json.Decoder(info.cls), info.name)


def _decoder(decoder: msgspec.json.Decoder[Any], name: str) -> Callable[[bytes], Any]:
    decode = decoder.decode

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


_projections: dict[tuple[type[Any], type[Any]], Callable[[bytes], Any]] = {}


def projection_decoder(contract: type[Any], as_type: type[Any]) -> Callable[[bytes], Any]:
    """The cached decoder of ``contract``'s bytes into ``as_type``: a msgspec type shaped like the
    contract, or like part of it (fields it does not name are skipped; a ``msgspec.Raw`` field
    keeps its JSON undecoded). Raises :class:`~busagents.errors.ContractError` for a type msgspec
    cannot decode into."""
    key = (contract, as_type)
    decode = _projections.get(key)
    if decode is None:
        name = f"{contract_info(contract).name} (as {getattr(as_type, '__name__', as_type)})"
        try:
            if isinstance(msgspec.inspect.type_info(as_type), msgspec.inspect.CustomType):
                raise TypeError(f"{as_type!r} is not a msgspec Struct or a type msgspec knows")
            decoder: msgspec.json.Decoder[Any] = msgspec.json.Decoder(as_type)
        except TypeError as exc:
            raise ContractError(f"{name}: not a type msgspec can decode into: {exc}") from None
        decode = _projections[key] = _decoder(decoder, name)
    return decode


def encode(message: Any) -> bytes:
    """The JSON body of a contract instance."""
    if isinstance(message, pydantic.BaseModel):
        return message.model_dump_json().encode()
    return _encoder.encode(message)
