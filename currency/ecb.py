"""Euro foreign exchange reference rates from the European Central Bank.

The ECB publishes one rate per currency against the euro ("eurofxref", e.g.
https://www.ecb.europa.eu/stats/eurofxref/eurofxref-daily.xml) on TARGET
business days at around 16:00 CET. Rates are kept exact: "1.0543" is
Fraction(10543, 10000), and a cross rate such as USD->GBP is the exact ratio
per_eur[GBP] / per_eur[USD], never a rounded intermediate.

Staleness policy (EcbConverter):

* The loaded rates are usable while ``clock.now() < reference date 00:00 UTC +
  max_age`` (``max_age`` is a setting, default 4 days). At that instant and
  after, every conversion is refused with a ConversionError naming the
  reference date and the limit, e.g. "ECB reference rates of 2026-11-13 are
  older than 4 days; refusing to convert USD to JPY".
  Four days bridges an ordinary weekend (Friday's rates last until Tuesday
  00:00 UTC; Monday's arrive Monday afternoon). It does not bridge a TARGET
  holiday next to a weekend (Good Friday + Easter Monday, 25/26 December on
  Thursday/Friday or Monday/Tuesday, 1 May on a Monday): there the publications
  are up to 5 days apart and conversions are refused for up to ~39 hours until
  the next one. That fails closed; set max_age to 6 days to bridge them too.
* Rates dated more than one day after the clock's UTC date are refused (a
  wrong clock or a forged document must not stay "fresh" for ever).
* A currency the ECB does not quote, or no rates loaded yet, is a
  ConversionError naming it. Nothing is ever guessed and no older rate is used
  silently: a failed refresh keeps the previous rates, which then go stale by
  the rule above, and a document older than the one held is not swapped in.

Loading (EcbSource): a file path or an http(s) URL. The raw document is
shared between brokers through the store's blob cache (``ecb-rates``, TTL 1
hour by default) so a fleet fetches it once an hour, not once per broker. Every
document, fetched or cached, is parsed and validated before it is used, and
only a valid fetched one is cached.

Parsing refuses anything with a DTD or entity declaration (defusedxml is not a
dependency), anything not UTF-8, and any date, currency or rate that is not
plainly valid, naming what was wrong.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import re
import xml.etree.ElementTree as ET
from dataclasses import dataclass
from datetime import UTC, date, datetime, time, timedelta
from decimal import Decimal
from fractions import Fraction
from pathlib import Path
from typing import Protocol

import httpx

from common.clock import Clock
from currency.convert import ConversionError
from currency.money import is_currency

log = logging.getLogger(__name__)

DEFAULT_MAX_AGE = timedelta(days=4)
DEFAULT_CACHE_TTL = timedelta(hours=1)
DEFAULT_TIMEOUT_S = 10.0
# The daily file is about 1.5 kB; anything near this limit is not it.
MAX_DOCUMENT_BYTES = 1_000_000
CACHE_NAME = "ecb-rates"
# Clock skew and time zones tolerated before a reference date counts as "in the future".
FUTURE_TOLERANCE = timedelta(days=1)

_GESMES = "http://www.gesmes.org/xml/2002-08-01"
_EUROFXREF = "http://www.ecb.int/vocabulary/2002-08-01/eurofxref"
_NS = {"gesmes": _GESMES, "ref": _EUROFXREF}

_DATE = re.compile(r"[0-9]{4}-[0-9]{2}-[0-9]{2}")
# A plain positive decimal as the ECB writes it ("1.0543", "17215.42"): no sign,
# exponent, comma, spaces or leading zeros, and bounded so no absurd value passes.
_RATE = re.compile(r"(0|[1-9][0-9]{0,9})(\.[0-9]{1,10})?")
_XML_DECL = re.compile(r"""<\?xml[^>]*?\sencoding\s*=\s*["']([^"']*)["']""")
_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)


@dataclass(frozen=True, slots=True)
class EcbRates:
    """One day's reference rates: units of each currency per 1 EUR (EUR itself = 1)."""

    date: date
    per_eur: dict[str, Fraction]


def _shown(text: str) -> str:
    return repr(text if len(text) <= 32 else text[:32] + "...")


def parse_ecb(xml: bytes, *, field: str = "ecb") -> EcbRates:
    """Parse and validate an ECB eurofxref document; ConversionError(field, ...) if it is not one."""
    if len(xml) > MAX_DOCUMENT_BYTES:
        raise ConversionError(field, f"document is larger than {MAX_DOCUMENT_BYTES} bytes")
    # Expat reads the bytes in whatever encoding they declare, so the DTD check
    # below is only sound on text we know it will see identically: UTF-8, no NULs
    # (which would let it auto-detect UTF-16 and hide "<!DOCTYPE" from us).
    if b"\x00" in xml:
        raise ConversionError(field, "document is not UTF-8 XML (contains NUL bytes)")
    try:
        text = xml.decode("utf-8-sig")
    except UnicodeDecodeError:
        raise ConversionError(field, "document is not UTF-8") from None
    declared = _XML_DECL.match(text.lstrip())
    if declared and declared.group(1).lower().replace("_", "-") not in ("utf-8", "utf8"):
        raise ConversionError(field, f"document declares encoding {_shown(declared.group(1))}, not UTF-8")
    if "<!DOCTYPE" in text or "<!ENTITY" in text:
        raise ConversionError(field, "document contains a DTD or entity declaration, which is refused")

    try:
        root = ET.fromstring(xml)
    except ET.ParseError as exc:
        raise ConversionError(field, f"document is not well-formed XML ({exc})") from None
    if root.tag != f"{{{_GESMES}}}Envelope":
        raise ConversionError(field, f"document root is {_shown(root.tag)}, not an ECB gesmes:Envelope")

    outer = root.find("ref:Cube", _NS)
    days = [] if outer is None else outer.findall("ref:Cube[@time]", _NS)
    if not days:
        raise ConversionError(field, "document has no reference date (Cube time=...)")
    if len(days) > 1:
        # The 90-day and full histories carry many dates; one day at a time keeps the meaning plain.
        raise ConversionError(
            field, f"document has {len(days)} reference dates; use the daily file (eurofxref-daily.xml)"
        )
    day = days[0]
    time_text = day.get("time", "")
    try:
        if not _DATE.fullmatch(time_text):
            raise ValueError
        ref_date = date.fromisoformat(time_text)
    except ValueError:
        raise ConversionError(field, f"reference date {_shown(time_text)} is not a YYYY-MM-DD date") from None

    per_eur: dict[str, Fraction] = {"EUR": Fraction(1)}
    for cube in day.findall("ref:Cube", _NS):
        code = cube.get("currency")
        rate_text = cube.get("rate")
        if code is None or rate_text is None:
            raise ConversionError(field, f"{ref_date}: a rate entry lacks its currency or rate attribute")
        if not is_currency(code):
            raise ConversionError(field, f"{ref_date}: {_shown(code)} is not an ISO 4217 currency code")
        if code in per_eur:
            what = "is the base currency" if code == "EUR" else "appears more than once"
            raise ConversionError(field, f"{ref_date}: {code} {what}")
        if not _RATE.fullmatch(rate_text) or Decimal(rate_text) <= 0:
            raise ConversionError(
                field, f"{ref_date}: rate {_shown(rate_text)} for {code} is not a positive decimal"
            )
        per_eur[code] = Fraction(Decimal(rate_text))
    if len(per_eur) == 1:
        raise ConversionError(field, f"{ref_date}: document has no rates")
    return EcbRates(ref_date, per_eur)


class BlobCache(Protocol):
    """The part of budget.stores.contract.Store that caches small shared documents (times in Unix ms)."""

    async def put_blob(self, name: str, data: bytes, *, ttl_ms: int, now_ms: int) -> None: ...

    async def get_blob(self, name: str, *, now_ms: int) -> bytes | None: ...


def _is_url(source: str) -> bool:
    return source.lower().startswith(("http://", "https://"))


def _to_ms(delta: timedelta) -> int:
    return delta // timedelta(milliseconds=1)


def unix_ms(moment: datetime) -> int:
    """Integer Unix milliseconds of an aware datetime (no float round trip)."""
    return _to_ms(moment - _EPOCH)


def _read_file(path: str, limit: int) -> bytes:
    with Path(path).open("rb") as f:
        data = f.read(limit + 1)
    if len(data) > limit:
        raise ConversionError(path, f"file is larger than {limit} bytes")
    return data


def _future_problem(rates: EcbRates, now: datetime) -> str | None:
    if rates.date > (now + FUTURE_TOLERANCE).date():
        return f"ECB reference rates of {rates.date} are dated after today ({now.date()} UTC)"
    return None


def _check_not_future(rates: EcbRates, now: datetime, field: str) -> None:
    problem = _future_problem(rates, now)
    if problem:
        raise ConversionError(field, problem)


@dataclass(frozen=True, slots=True)
class EcbSource:
    """Where the rates come from: a file path or an http(s) URL."""

    source: str
    cache_ttl: timedelta = DEFAULT_CACHE_TTL
    timeout_s: float = DEFAULT_TIMEOUT_S
    max_bytes: int = MAX_DOCUMENT_BYTES
    cache_name: str = CACHE_NAME
    # Proxy settings from the environment; off in tests that talk to 127.0.0.1.
    trust_env: bool = True

    def __post_init__(self) -> None:
        if not self.source:
            raise ConversionError("source", "is required (a file path or an http(s) URL)")
        if "://" in self.source and not _is_url(self.source):
            raise ConversionError("source", f"{_shown(self.source)}: only http(s) URLs and file paths")
        if self.cache_ttl <= timedelta(0):
            raise ConversionError("cache_ttl", "must be positive")

    async def load(self, store: BlobCache | None, now_ms: int) -> EcbRates:
        """Rates from the shared cache if fresh there, else fetched, validated and cached."""
        now = _EPOCH + timedelta(milliseconds=now_ms)
        if store is not None:
            cached: bytes | None = None
            try:
                cached = await store.get_blob(self.cache_name, now_ms=now_ms)
            except Exception as exc:
                # The cache is an optimisation; the source is the authority.
                log.warning("ECB rates: cache read failed, fetching %s: %s", self.source, exc)
            if cached is not None:
                try:
                    rates = parse_ecb(cached, field=f"cached {self.cache_name}")
                    _check_not_future(rates, now, f"cached {self.cache_name}")
                    return rates
                except ConversionError as exc:
                    log.warning("ECB rates: ignoring invalid cached document: %s", exc)

        data = await self.fetch()
        rates = parse_ecb(data, field=self.source)
        _check_not_future(rates, now, self.source)
        if store is not None:
            try:
                await store.put_blob(self.cache_name, data, ttl_ms=_to_ms(self.cache_ttl), now_ms=now_ms)
            except Exception as exc:
                log.warning("ECB rates: cache write failed: %s", exc)
        return rates

    async def fetch(self) -> bytes:
        """The raw document, at most max_bytes; ConversionError(source, ...) on any failure."""
        if not _is_url(self.source):
            try:
                return await asyncio.to_thread(_read_file, self.source, self.max_bytes)
            except OSError as exc:
                raise ConversionError(self.source, f"cannot read file: {exc.strerror or exc}") from None
        try:
            # httpx's timeout is per operation; this bounds the whole exchange.
            async with asyncio.timeout(self.timeout_s):
                return await self._get()
        except TimeoutError:
            raise ConversionError(self.source, f"no complete answer within {self.timeout_s} s") from None
        except httpx.HTTPError as exc:
            raise ConversionError(self.source, f"fetch failed: {type(exc).__name__}: {exc}") from None

    async def _get(self) -> bytes:
        async with (
            httpx.AsyncClient(
                timeout=self.timeout_s, follow_redirects=False, trust_env=self.trust_env
            ) as client,
            client.stream("GET", self.source, headers={"Accept": "application/xml, text/xml"}) as response,
        ):
            if response.status_code != 200:
                # A redirect is refused too: the configured URL is the one trusted.
                raise ConversionError(self.source, f"HTTP {response.status_code} {response.reason_phrase}")
            length = response.headers.get("content-length", "")
            if length.isdigit() and int(length) > self.max_bytes:
                raise ConversionError(self.source, f"response is larger than {self.max_bytes} bytes")
            chunks: list[bytes] = []
            size = 0
            # Counted after decompression, so a small gzip bomb is caught too.
            async for chunk in response.aiter_bytes():
                size += len(chunk)
                if size > self.max_bytes:
                    raise ConversionError(self.source, f"response is larger than {self.max_bytes} bytes")
                chunks.append(chunk)
            return b"".join(chunks)


def _age_text(age: timedelta) -> str:
    units = ((timedelta(days=1), "day"), (timedelta(hours=1), "hour"), (timedelta(minutes=1), "minute"))
    for unit, name in units:
        if age % unit == timedelta(0):
            n = age // unit
            return f"{n} {name}" + ("" if n == 1 else "s")
    return str(age)


class EcbConverter:
    """A Converter over the latest ECB reference rates; refuses stale, future or missing rates."""

    def __init__(
        self,
        source: EcbSource | None,
        clock: Clock,
        *,
        store: BlobCache | None = None,
        max_age: timedelta = DEFAULT_MAX_AGE,
        rates: EcbRates | None = None,
    ) -> None:
        if max_age <= timedelta(0):
            raise ConversionError("max_age", "must be positive")
        self.source = source
        self.clock = clock
        self.store = store
        self.max_age = max_age
        # Replaced whole, never mutated: a reader sees the old or the new day, never a mix.
        self._rates = rates

    @property
    def rates(self) -> EcbRates | None:
        return self._rates

    def usable_until(self) -> datetime | None:
        """The instant the held rates go stale (exclusive), or None when nothing is loaded."""
        if self._rates is None:
            return None
        return datetime.combine(self._rates.date, time(0), UTC) + self.max_age

    def rate(self, source: str, target: str) -> Fraction:
        if source == target:
            return Fraction(1)
        refusing = f"refusing to convert {source} to {target}"
        rates = self._rates
        if rates is None:
            raise ConversionError("currency", f"no ECB reference rates loaded; {refusing}")
        now = self.clock.now()
        if now >= datetime.combine(rates.date, time(0), UTC) + self.max_age:
            raise ConversionError(
                "currency",
                f"ECB reference rates of {rates.date} are older than {_age_text(self.max_age)}; {refusing}",
            )
        future = _future_problem(rates, now)
        if future:
            raise ConversionError("currency", f"{future}; {refusing}")
        missing = [c for c in (source, target) if c not in rates.per_eur]
        if missing:
            raise ConversionError(
                "currency",
                f"ECB reference rates of {rates.date} have no rate for {' or '.join(missing)}; {refusing}",
            )
        return rates.per_eur[target] / rates.per_eur[source]

    async def refresh(self, now_ms: int | None = None) -> EcbRates:
        """Load the latest rates and swap them in; on failure raise and keep the previous ones."""
        if self.source is None:
            raise ConversionError("source", "no ECB source is configured")
        if now_ms is None:
            now_ms = unix_ms(self.clock.now())
        fresh = await self.source.load(self.store, now_ms)
        # Re-read after the await: another refresh may have swapped meanwhile.
        held = self._rates
        if held is not None and fresh.date < held.date:
            log.warning("ECB rates: source returned %s, older than the held %s; keeping %s",
                        fresh.date, held.date, held.date)
            return held
        self._rates = fresh
        return fresh


async def run_refresher(converter: EcbConverter, interval_s: float, stop: asyncio.Event) -> None:
    """Refresh now and every interval_s seconds until `stop` is set; failures are logged, never raised."""
    while not stop.is_set():
        try:
            rates = await converter.refresh()
            log.debug("ECB rates of %s loaded", rates.date)
        except Exception as exc:
            until = converter.usable_until()
            held = f"usable until {until.isoformat()}" if until else "none: conversions are refused"
            # A ConversionError already says what went wrong; anything else is a bug worth a traceback.
            log.error("ECB rates refresh failed: %s (held rates: %s)", exc, held,
                      exc_info=not isinstance(exc, ConversionError))
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), interval_s)
