"""Wire codecs and compression whose errors a caller can read.

connectrpc reports any exception a codec or a decompressor raises as INVALID_ARGUMENT
with the exception's own text ("unmarshal message: 'NoneType' object is not
iterable", "decompress: Error -3 while decompressing data"), which leaks Python
internals and helps nobody fix the request. It passes a ConnectError through
unchanged, so these raise a ConnectError with a plain message that names the field
or the problem.

JSON is parsed by the C `json` module and its shape is checked against the message's
descriptor before Google's pure-Python `json_format.ParseDict` sees it, so a 1 MiB array
of empty strings, a 100 000-deep nesting or a 1 MiB field name never reaches the slow
parser, and the refusal names the field.
"""

from __future__ import annotations

import functools
import json
import logging
import math
import re
from typing import Any, NoReturn, TypeVar, cast

from connectrpc.code import Code
from connectrpc.codec import Codec
from connectrpc.compat import google_protobuf_binary_codec, google_protobuf_json_codec
from connectrpc.compression import Compression
from connectrpc.compression.gzip import GzipCompression
from connectrpc.errors import ConnectError
from google.protobuf import json_format, message_factory
from google.protobuf.descriptor import Descriptor, EnumDescriptor, FieldDescriptor
from google.protobuf.message import Message

from broker.purchase.validation import MAX_URIS
from broker.rpc.errors import detail
from ramp.broker.v1 import broker_pb2 as bpb

M = TypeVar("M", bound=Message)
log = logging.getLogger(__name__)

# The largest request body (after decompression) the broker reads. A valid request needs
# far less: at most MAX_URIS (256) URIs of at most MAX_URI_LENGTH (2048) ASCII characters
# (RFC 3986 percent-encodes the rest) is 512 KiB, plus 6 bytes of framing each (JSON
# quotes and comma, or a protobuf tag and 2-byte length) = 513.5 KiB; or, instead of
# URIs, 256 chosen offers, each its URI plus an offer as Resolve returned it (ids, title,
# pricing, exchange: well under 1 KiB) ~ 768 KiB. A few hundred bytes of ids and
# constraints on top; 1 MiB leaves room and still bounds what a caller makes us hold.
MAX_BODY_BYTES = 1 << 20

# JSON arrays (and objects of map fields) longer than this are refused before ParseDict
# sees them: the broker accepts at most this many URIs or offers in a request.
MAX_ITEMS = MAX_URIS
# Messages nested deeper than this are refused; the broker's own nest 4 deep at most.
MAX_DEPTH = 32
# Field names and values quoted back in an error are cut to this many characters.
MAX_SHOWN = 64


def _descriptor(message_class: type[Message]) -> Descriptor:
    return cast(Descriptor, message_class.DESCRIPTOR)


def _message_type(field: FieldDescriptor) -> Descriptor:
    """The message type of a message field (only ever asked of one)."""
    if field.message_type is None:
        raise TypeError(f"{field.full_name} is not a message field")
    return field.message_type


def _enum_type(field: FieldDescriptor) -> EnumDescriptor:
    if field.enum_type is None:
        raise TypeError(f"{field.full_name} is not an enum field")
    return field.enum_type


def _refuse(message: str) -> ConnectError:
    """A problem with the body as a whole."""
    return ConnectError(Code.INVALID_ARGUMENT, message)


def _invalid(field: str, problem: str, message: str | None = None) -> ConnectError:
    """A problem with one field: "field: problem" and a FieldViolation detail, as the
    broker's own validation reports it (broker.rpc.errors)."""
    return ConnectError(Code.INVALID_ARGUMENT, message or f"{field}: {problem}",
                        [detail(bpb.FieldViolation(field=field, description=problem))])


def _quote(text: str) -> str:
    """`text` as a short, printable, quoted string: never echoes a megabyte back."""
    shown = "".join(c if c.isprintable() else "?" for c in text[:MAX_SHOWN])
    more = f"... ({len(text)} characters)" if len(text) > MAX_SHOWN else ""
    return json.dumps(shown, ensure_ascii=False)[:-1] + more + '"'


def _cut(text: str) -> str:
    """A field name as written by the caller, cut short and made printable."""
    shown = "".join(c if c.isprintable() else "?" for c in text[:MAX_SHOWN])
    return shown + ("..." if len(text) > MAX_SHOWN else "")


# --- binary ----------------------------------------------------------------------


class ProtoBinaryCodec:
    """Google protobuf binary, with readable decode errors."""

    def __init__(self) -> None:
        self._inner: Codec[Message, Any] = google_protobuf_binary_codec()

    def name(self) -> str:
        return self._inner.name()

    def encode(self, message: Message) -> bytes:
        return self._inner.encode(message)

    def decode(self, data: bytes | bytearray, message_class: type[M]) -> M:
        try:
            message: M = message_class.FromString(bytes(data))
        except Exception as exc:
            # upb says only "Wire format was corrupt" or "String field had bad UTF-8";
            # the walk below finds which field, as far as it can.
            raise _binary_problem(bytes(data), _descriptor(message_class)) from exc
        return message


_WIRE_VARINT, _WIRE_I64, _WIRE_LEN, _WIRE_I32 = 0, 1, 2, 5
# A diagnosis looks at this many fields at most: it runs only on a refused body.
_SCAN_FIELDS = 4096


def _binary_problem(data: bytes, descriptor: Descriptor) -> ConnectError:
    """What is wrong with a protobuf body upb refused, naming the field when it can."""
    problem = _scan(data, descriptor, "", 0, [_SCAN_FIELDS])
    return problem or _refuse(f"body is not a valid protobuf {descriptor.full_name} message")


def _varint(data: bytes, pos: int) -> tuple[int, int]:
    """The varint at `pos` and the position after it; IndexError if cut off or too long."""
    value = shift = 0
    for i in range(pos, min(pos + 10, len(data))):
        value |= (data[i] & 0x7F) << shift
        if data[i] < 0x80:
            return value, i + 1
        shift += 7
    raise IndexError(pos)


def _scan(data: bytes, descriptor: Descriptor, path: str, depth: int,
          budget: list[int]) -> ConnectError | None:
    """The first problem in `data` as a `descriptor` message, or None if none is found.
    `budget` (shared across the recursion) caps the fields looked at."""
    if depth > MAX_DEPTH:
        return _invalid(path, "is nested too deeply")
    counts: dict[int, int] = {}
    pos = 0
    inside = f" in {path}" if path else ""
    while pos < len(data):
        budget[0] -= 1
        if budget[0] < 0:
            return None
        try:
            tag, after = _varint(data, pos)
        except IndexError:
            return _refuse(f"body has a cut-off protobuf tag{inside} (at byte {pos})")
        number, wire = tag >> 3, tag & 7
        if number == 0 or wire not in (_WIRE_VARINT, _WIRE_I64, _WIRE_LEN, _WIRE_I32):
            return _refuse(f"body has an invalid protobuf tag{inside} (at byte {pos}: "
                           f"field {number}, wire type {wire})")
        pos = after
        field = descriptor.fields_by_number.get(number)
        index = counts[number] = counts.get(number, -1) + 1
        where = _binary_path(path, field, number, index)
        if wire == _WIRE_VARINT:
            try:
                _, pos = _varint(data, pos)
            except IndexError:
                return _invalid(where, "is not a valid varint (cut off, or longer than 10 bytes)")
            continue
        if wire != _WIRE_LEN:
            pos += 8 if wire == _WIRE_I64 else 4
            if pos > len(data):
                return _invalid(where, "is cut off")
            continue
        try:
            size, pos = _varint(data, pos)
        except IndexError:
            return _invalid(where, "has a cut-off length")
        if pos + size > len(data):
            return _invalid(where, f"is cut off: {size} bytes announced, {len(data) - pos} left")
        chunk, pos = data[pos:pos + size], pos + size
        if field is None:
            continue
        if field.type == FieldDescriptor.TYPE_STRING:
            try:
                chunk.decode("utf-8")
            except UnicodeDecodeError:
                return _invalid(where, "is not valid UTF-8")
        elif field.type == FieldDescriptor.TYPE_MESSAGE:
            inner = _scan(chunk, _message_type(field), where, depth + 1, budget)
            if inner is not None:
                return inner
    return None


def _binary_path(path: str, field: FieldDescriptor | None, number: int, index: int) -> str:
    name = field.name if field is not None else f"field {number}"
    if field is not None and field.is_repeated:
        name = f"{name}[{index}]"
    return f"{path}.{name}" if path else name


# --- JSON ------------------------------------------------------------------------


class _Refused(Exception):
    """Raised from json.loads hooks; its message is for the caller."""


def _pairs(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    # As json_format.Parse does: a repeated key is ambiguous (which one wins?), refuse it.
    result = dict(pairs)
    if len(result) != len(pairs):
        seen: set[str] = set()
        for key, _ in pairs:
            if key in seen:
                raise _Refused(f"body has the key {_quote(key)} twice in one object")
            seen.add(key)
    return result


def _constant(name: str) -> NoReturn:
    raise _Refused(f"body is not valid JSON: {name} is not a JSON number (quote it: \"{name}\")")


def _loads(data: bytes | bytearray) -> Any:
    """The parsed JSON of a request body, or a ConnectError saying what is wrong."""
    if not data:
        raise _refuse("body is empty: send a JSON object, such as {}")
    try:
        text = bytes(data).decode("utf-8")
    except UnicodeDecodeError as exc:
        raise _refuse(f"body is not UTF-8 (invalid byte at offset {exc.start})") from None
    if text.startswith("\ufeff"):
        raise _refuse("body starts with a byte order mark: send UTF-8 JSON without one")
    try:
        return json.loads(text, object_pairs_hook=_pairs, parse_constant=_constant)
    except _Refused as exc:
        raise _refuse(str(exc)) from None
    except json.JSONDecodeError as exc:
        raise _refuse(f"body is not valid JSON: {exc.msg} (line {exc.lineno}, column {exc.colno})") from None
    except RecursionError:
        raise _refuse("body is nested too deeply") from None
    except ValueError:
        # The only other one: an integer literal of more than 4300 digits.
        raise _refuse("body has a number with too many digits") from None


_INT_RANGES = {
    FieldDescriptor.CPPTYPE_INT32: (-(2**31), 2**31 - 1),
    FieldDescriptor.CPPTYPE_UINT32: (0, 2**32 - 1),
    FieldDescriptor.CPPTYPE_INT64: (-(2**63), 2**63 - 1),
    FieldDescriptor.CPPTYPE_UINT64: (0, 2**64 - 1),
}
_FLOAT32_MAX = 3.4028234663852886e38
_NUMBER = re.compile(r"-?(?:0|[1-9][0-9]*)(?:\.[0-9]+)?(?:[eE][+-]?[0-9]+)?")
_BASE64 = re.compile(r"[A-Za-z0-9+/_-]*={0,2}")
# JSON-as-string well-known types: what a value must look like, for the error message.
_STRING_WKT = {
    "google.protobuf.Duration": 'a duration string such as "1.5s"',
    "google.protobuf.Timestamp": 'an RFC 3339 timestamp string such as "2026-01-31T12:00:00Z"',
    "google.protobuf.FieldMask": 'a string of comma-separated field paths such as "a,bC"',
}
_GENERIC_WKT = {"google.protobuf.Value", "google.protobuf.Struct", "google.protobuf.ListValue",
                "google.protobuf.Any"}


def _noun(field: FieldDescriptor) -> tuple[str, str]:
    """How to name one value of `field` in a message: (singular, plural)."""
    cpp = field.cpp_type
    if cpp == FieldDescriptor.CPPTYPE_MESSAGE:
        full = _message_type(field).full_name
        if full in _STRING_WKT:
            return _STRING_WKT[full], "strings"
        if full in _GENERIC_WKT:
            return "a JSON value", "JSON values"
        if full.startswith("google.protobuf.") and full.endswith("Value"):
            return _noun(_message_type(field).fields_by_name["value"])
        return "an object", "objects"
    if cpp == FieldDescriptor.CPPTYPE_STRING:
        if field.type == FieldDescriptor.TYPE_BYTES:
            return "a base64 string", "base64 strings"
        return "a string", "strings"
    if cpp == FieldDescriptor.CPPTYPE_BOOL:
        return "true or false", "booleans"
    if cpp == FieldDescriptor.CPPTYPE_ENUM:
        return f"a {_enum_type(field).name} name", f"{_enum_type(field).name} names"
    if cpp in _INT_RANGES:
        return "an integer", "integers"
    return "a number", "numbers"


@functools.cache
def _fields(descriptor: Descriptor) -> dict[str, FieldDescriptor]:
    """A message's fields by every name ProtoJSON accepts: the JSON name and the proto name."""
    return {**{f.name: f for f in descriptor.fields}, **{f.json_name: f for f in descriptor.fields}}


def _join(path: str, key: str) -> str:
    return f"{path}.{key}" if path else key


class _Shape:
    """Checks parsed JSON against a message descriptor, mirroring what ParseDict accepts,
    and raises a ConnectError naming the first field that does not fit."""

    def message(self, value: Any, descriptor: Descriptor, path: str, depth: int) -> None:
        if depth > MAX_DEPTH:
            raise _invalid(path, "is nested too deeply")
        if not isinstance(value, dict):
            raise _invalid(path, "must be an object") if path else _refuse("body must be a JSON object")
        seen: dict[int, str] = {}
        oneofs: dict[str, str] = {}
        for key, item in value.items():
            field = _fields(descriptor).get(key)
            if field is None:
                where = f" in {path}" if path else ""
                raise _invalid(_join(path, _cut(key)), "unknown field",
                               f"unknown field {_quote(key)}{where}")
            here = _join(path, key)
            if field.number in seen:
                raise _invalid(here, f"is given twice (also as {seen[field.number]})")
            seen[field.number] = key
            if item is None:
                continue  # null means the default, as ProtoJSON says
            oneof = field.containing_oneof
            if oneof is not None:
                if oneof.full_name in oneofs:
                    other = _join(path, oneofs[oneof.full_name])
                    raise _invalid(here, f"give only one of {other} and {here}")
                oneofs[oneof.full_name] = key
            self.field(item, field, here, depth)

    def field(self, value: Any, field: FieldDescriptor, path: str, depth: int) -> None:
        entry = field.message_type
        if entry is not None and entry.GetOptions().map_entry:
            if not isinstance(value, dict):
                raise _invalid(path, "must be an object")
            if len(value) > MAX_ITEMS:
                raise _invalid(path, f"{len(value)} entries given; at most {MAX_ITEMS} per request")
            key_field = entry.fields_by_name["key"]
            value_field = entry.fields_by_name["value"]
            for key, item in value.items():
                if key_field.cpp_type in _INT_RANGES:
                    self.integer(key, key_field, f"{path}[{_quote(key)}]")
                elif key_field.cpp_type == FieldDescriptor.CPPTYPE_BOOL and key not in ("true", "false"):
                    raise _invalid(f"{path}[{_quote(key)}]", "the key must be \"true\" or \"false\"")
                self.value(item, value_field, f"{path}[{_quote(key)}]", depth)
            return
        if field.is_repeated:
            if not isinstance(value, list):
                raise _invalid(path, f"must be a list of {_noun(field)[1]}")
            if len(value) > MAX_ITEMS:
                raise _invalid(path, f"{len(value)} items given; at most {MAX_ITEMS} per request")
            if field.type == FieldDescriptor.TYPE_STRING and _all_text(value):
                return  # the common case (URIs), checked in one go
            for i, item in enumerate(value):
                self.value(item, field, f"{path}[{i}]", depth)
            return
        self.value(value, field, path, depth)

    def value(self, value: Any, field: FieldDescriptor, path: str, depth: int) -> None:
        """One (non-repeated) value of `field`."""
        cpp = field.cpp_type
        if cpp == FieldDescriptor.CPPTYPE_MESSAGE:
            message_type = _message_type(field)
            full = message_type.full_name
            if full in _GENERIC_WKT:
                if value is None and full == "google.protobuf.Value":
                    return
                self.generic(value, path, depth + 1)
            elif full in _STRING_WKT:
                self.string_wkt(value, message_type, path)
            elif full.startswith("google.protobuf.") and full.endswith("Value"):
                self.value(value, message_type.fields_by_name["value"], path, depth)
            elif value is None:
                raise _wrong(field, path)  # null inside a list (a single null field was skipped)
            else:
                self.message(value, message_type, path, depth + 1)
        elif cpp == FieldDescriptor.CPPTYPE_STRING:
            if not isinstance(value, str):
                raise _wrong(field, path)
            if field.type == FieldDescriptor.TYPE_BYTES:
                if not _BASE64.fullmatch(value):
                    raise _wrong(field, path)
            elif not _is_unicode(value):
                raise _invalid(path, "is not valid Unicode (it has an unpaired surrogate)")
        elif cpp == FieldDescriptor.CPPTYPE_BOOL:
            if not isinstance(value, bool):
                raise _wrong(field, path)
        elif cpp == FieldDescriptor.CPPTYPE_ENUM:
            self.enum(value, field, path)
        elif cpp in _INT_RANGES:
            self.integer(value, field, path)
        else:
            self.floating(value, field, path)

    def integer(self, value: Any, field: FieldDescriptor, path: str) -> None:
        lo, hi = _INT_RANGES[field.cpp_type]
        number: int | float
        if isinstance(value, str):
            if len(value) > 32 or not _NUMBER.fullmatch(value):
                raise _invalid(path, "must be an integer")
            number = float(value) if any(c in value for c in ".eE") else int(value)
        elif isinstance(value, int | float) and not isinstance(value, bool):
            number = value
        else:
            raise _invalid(path, "must be an integer")
        if isinstance(number, float) and not (math.isfinite(number) and number.is_integer()):
            raise _invalid(path, "must be an integer")
        if not lo <= number <= hi:
            raise _invalid(path, f"is out of range ({lo} to {hi})")

    def floating(self, value: Any, field: FieldDescriptor, path: str) -> None:
        if isinstance(value, str):
            if value in ("NaN", "Infinity", "-Infinity"):
                return
            if len(value) > 32 or not _NUMBER.fullmatch(value):
                raise _invalid(path, "must be a number")
            value = float(value)
        if not isinstance(value, int | float) or isinstance(value, bool):
            raise _invalid(path, "must be a number")
        limit = _FLOAT32_MAX if field.cpp_type == FieldDescriptor.CPPTYPE_FLOAT else math.inf
        if not (math.isfinite(value) and abs(value) <= limit):
            raise _invalid(path, "is out of range (quote \"Infinity\" or \"NaN\" if meant)")

    def enum(self, value: Any, field: FieldDescriptor, path: str) -> None:
        enum = _enum_type(field)
        if isinstance(value, str):
            if value not in enum.values_by_name:
                raise _invalid(path, f"{_quote(value)} is not a {enum.name} name")
            return
        if not isinstance(value, int) or isinstance(value, bool):
            raise _invalid(path, f"must be a {enum.name} name")
        lo, hi = _INT_RANGES[FieldDescriptor.CPPTYPE_INT32]
        if not lo <= value <= hi or (enum.is_closed and value not in enum.values_by_number):
            raise _invalid(path, f"{value} is not a {enum.name} value")

    def string_wkt(self, value: Any, descriptor: Descriptor, path: str) -> None:
        what = _STRING_WKT[descriptor.full_name]
        if not isinstance(value, str) or len(value) > 1024:
            raise _invalid(path, f"must be {what}")
        message = message_factory.GetMessageClass(descriptor)()
        try:
            message.FromJsonString(value)  # type: ignore[attr-defined]
        except ValueError:
            raise _invalid(path, f"must be {what}, not {_quote(value)}") from None

    def generic(self, value: Any, path: str, depth: int) -> None:
        """Any JSON (google.protobuf.Value and friends), within the same bounds."""
        if depth > MAX_DEPTH:
            raise _invalid(path, "is nested too deeply")
        if isinstance(value, list | dict) and len(value) > MAX_ITEMS:
            raise _invalid(path, f"{len(value)} items given; at most {MAX_ITEMS} per request")
        if isinstance(value, list):
            for i, item in enumerate(value):
                self.generic(item, f"{path}[{i}]", depth + 1)
        elif isinstance(value, dict):
            for key, item in value.items():
                self.generic(item, f"{path}.{key[:MAX_SHOWN]}", depth + 1)
        elif isinstance(value, float) and not math.isfinite(value):
            raise _invalid(path, "is out of range")
        elif isinstance(value, str) and not _is_unicode(value):
            raise _invalid(path, "is not valid Unicode (it has an unpaired surrogate)")


_SHAPE = _Shape()


def _wrong(field: FieldDescriptor, path: str) -> ConnectError:
    return _invalid(path, f"must be {_noun(field)[0]}")


def _all_text(values: list[Any]) -> bool:
    """Whether every item is a str that is valid Unicode (no unpaired surrogate)."""
    if not all(type(v) is str for v in values):
        return False
    try:
        "".join(values).encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def _is_unicode(text: str) -> bool:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


class ProtoJSONCodec:
    """Google protobuf JSON (unknown fields refused), with readable decode errors."""

    def __init__(self) -> None:
        # Unknown JSON fields are refused, not skipped: a misspelled "maxPrize" must
        # not quietly buy without the cap the agent meant to set.
        self._inner: Codec[Message, Any] = google_protobuf_json_codec(ignore_unknown_fields=False)

    def name(self) -> str:
        return self._inner.name()

    def encode(self, message: Message) -> bytes:
        return self._inner.encode(message)

    def decode(self, data: bytes | bytearray, message_class: type[M]) -> M:
        tree = _loads(data)
        _SHAPE.message(tree, _descriptor(message_class), "", 0)
        message = message_class()
        try:
            json_format.ParseDict(tree, message, ignore_unknown_fields=False)
        except Exception as exc:
            # The shape check should have caught it; the details are for the log only.
            log.debug("JSON body passed the shape check but not ParseDict: %s", exc)
            raise _refuse(f"body is not a valid {message_class.DESCRIPTOR.full_name} message") from None
        return message


# --- compression -----------------------------------------------------------------


class Gzip:
    """connectrpc's gzip (which stops inflating past the size limit, so a gzip bomb costs
    at most MAX_BODY_BYTES + 1 bytes), with a readable error for a corrupt stream."""

    def __init__(self) -> None:
        self._inner = GzipCompression()

    def name(self) -> str:
        return self._inner.name()

    def compress(self, data: bytes | bytearray | memoryview) -> bytes:
        return self._inner.compress(data)

    def decompress(self, data: bytes | bytearray | memoryview, read_max_bytes: int | None = None) -> bytes:
        # Without a limit connectrpc inflates everything (gzip.decompress): never do that.
        limit = MAX_BODY_BYTES if read_max_bytes is None else read_max_bytes
        try:
            return self._inner.decompress(data, limit)
        except ConnectError:
            raise  # RESOURCE_EXHAUSTED: "message is larger than configured max N"
        except Exception:
            raise _refuse("body is not valid gzip") from None


def server_codecs() -> list[Codec[Message, Any]]:
    return [ProtoBinaryCodec(), ProtoJSONCodec()]


def server_compressions() -> list[Compression]:
    return [Gzip()]
