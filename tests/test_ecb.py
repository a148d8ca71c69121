"""ECB reference rates: strict parsing, exact cross rates, staleness, shared caching, failed refreshes."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from datetime import UTC, date, datetime, timedelta
from decimal import Decimal
from fractions import Fraction
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from common.clock import ManualClock
from currency.convert import ConversionError, convert
from currency.ecb import (
    CACHE_NAME,
    DEFAULT_MAX_AGE,
    DEFAULT_TIMEOUT_S,
    MAX_DOCUMENT_BYTES,
    BlobCache,
    EcbConverter,
    EcbRates,
    EcbSource,
    parse_ecb,
    run_refresher,
    unix_ms,
)
from currency.money import Money

SAMPLE_PATH = Path(__file__).parent / "data" / "eurofxref-daily.xml"
SAMPLE = SAMPLE_PATH.read_bytes()
SAMPLE_RATES = parse_ecb(SAMPLE)
REF_DAY = datetime(2026, 11, 20, tzinfo=UTC)
# Shortly after the ECB's 16:00 CET publication on the reference date.
PUBLISHED = REF_DAY + timedelta(hours=15, minutes=5)
CURRENCIES = sorted(SAMPLE_RATES.per_eur)


def ms(moment: datetime) -> int:
    return unix_ms(moment)


def doc(cubes: str, time_attr: str = " time='2026-11-20'", prolog: str = "") -> bytes:
    """A eurofxref document with the given rate entries."""
    return (
        f'<?xml version="1.0" encoding="UTF-8"?>\n{prolog}'
        '<gesmes:Envelope xmlns:gesmes="http://www.gesmes.org/xml/2002-08-01" '
        'xmlns="http://www.ecb.int/vocabulary/2002-08-01/eurofxref">'
        "<gesmes:subject>Reference rates</gesmes:subject>"
        f"<Cube><Cube{time_attr}>{cubes}</Cube></Cube></gesmes:Envelope>"
    ).encode()


ONE_RATE = doc("<Cube currency='USD' rate='1.05'/>")
WITH_DTD = doc("<Cube currency='USD' rate='1.05'/>", prolog="<!DOCTYPE gesmes:Envelope>\n")


def dated(day: str, usd: str = "1.0543") -> bytes:
    return doc(f"<Cube currency='USD' rate='{usd}'/><Cube currency='JPY' rate='162.87'/>", f" time='{day}'")


class MemoryCache:
    """The blob half of the store contract, in memory, with expiry by the caller's clock."""

    def __init__(self) -> None:
        self.blobs: dict[str, tuple[bytes, int]] = {}
        self.puts = 0

    async def put_blob(self, name: str, data: bytes, *, ttl_ms: int, now_ms: int) -> None:
        self.puts += 1
        self.blobs[name] = (data, now_ms + ttl_ms)

    async def get_blob(self, name: str, *, now_ms: int) -> bytes | None:
        entry = self.blobs.get(name)
        if entry is None or now_ms >= entry[1]:
            return None
        return entry[0]


class BrokenCache:
    async def put_blob(self, name: str, data: bytes, *, ttl_ms: int, now_ms: int) -> None:
        raise ConnectionError("cache down")

    async def get_blob(self, name: str, *, now_ms: int) -> bytes | None:
        raise ConnectionError("cache down")


@dataclass
class Reply:
    status: str = "200 OK"
    body: bytes = SAMPLE
    headers: dict[str, str] = field(default_factory=dict)
    send_length: bool = True
    stall: bool = False


class TinyHttp:
    """A minimal HTTP/1.1 server on 127.0.0.1 that counts requests and answers with `reply`."""

    def __init__(self) -> None:
        self.hits = 0
        self.reply = Reply()
        self.release = asyncio.Event()
        self.url = ""

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            await reader.readuntil(b"\r\n\r\n")
            self.hits += 1
            reply = self.reply
            if reply.stall:
                await self.release.wait()
                return
            head = [f"HTTP/1.1 {reply.status}", "Content-Type: text/xml", "Connection: close"]
            if reply.send_length:
                head.append(f"Content-Length: {len(reply.body)}")
            head += [f"{k}: {v}" for k, v in reply.headers.items()]
            writer.write(("\r\n".join(head) + "\r\n\r\n").encode() + reply.body)
            await writer.drain()
        except (ConnectionError, asyncio.IncompleteReadError):
            pass
        finally:
            writer.close()


@pytest.fixture
async def http() -> AsyncIterator[TinyHttp]:
    server = TinyHttp()
    srv = await asyncio.start_server(server.handle, "127.0.0.1", 0)
    port = srv.sockets[0].getsockname()[1]
    server.url = f"http://127.0.0.1:{port}/stats/eurofxref/eurofxref-daily.xml"
    try:
        yield server
    finally:
        server.release.set()
        srv.close()
        await srv.wait_closed()


def url_source(
    server: TinyHttp, *, max_bytes: int = MAX_DOCUMENT_BYTES, timeout_s: float = DEFAULT_TIMEOUT_S
) -> EcbSource:
    # No proxies from the environment: the server is on 127.0.0.1.
    return EcbSource(server.url, trust_env=False, max_bytes=max_bytes, timeout_s=timeout_s)


def converter(
    rates: EcbRates | None = SAMPLE_RATES, at: datetime = PUBLISHED, max_age: timedelta = DEFAULT_MAX_AGE
) -> EcbConverter:
    return EcbConverter(None, ManualClock(at), rates=rates, max_age=max_age)


# --------------------------------------------------------------------------- parsing


def test_parse_sample() -> None:
    rates = SAMPLE_RATES
    assert rates.date == date(2026, 11, 20)
    assert len(rates.per_eur) == 30  # 29 quoted currencies and EUR itself
    assert rates.per_eur["EUR"] == 1
    assert rates.per_eur["USD"] == Fraction(10543, 10000)
    assert rates.per_eur["JPY"] == Fraction(16287, 100)
    assert rates.per_eur["IDR"] == Fraction(Decimal("17215.42"))
    assert {"GBP", "CHF", "JPY", "AUD", "CAD", "CNY", "SEK", "NOK"} <= set(rates.per_eur)
    assert all(type(r) is Fraction for r in rates.per_eur.values())


@pytest.mark.parametrize(
    ("document", "fragment"),
    [
        (doc("<Cube currency='USD' rate='1.0543'/>", time_attr=""), "no reference date"),
        (doc("<Cube currency='USD' rate='1.0543'/>", time_attr=" time=''"), "is not a YYYY-MM-DD date"),
        (doc("<Cube currency='USD' rate='1.0543'/>", time_attr=" time='20.11.2026'"), "YYYY-MM-DD"),
        (doc("<Cube currency='USD' rate='1.0543'/>", time_attr=" time='2026-02-30'"), "YYYY-MM-DD"),
        (doc(""), "no rates"),
        (doc("<Cube currency='USD' rate='1,05'/>"), "rate '1,05' for USD is not a positive decimal"),
        (doc("<Cube currency='USD' rate='-1.05'/>"), "rate '-1.05' for USD"),
        (doc("<Cube currency='USD' rate='+1.05'/>"), "not a positive decimal"),
        (doc("<Cube currency='USD' rate='NaN'/>"), "rate 'NaN' for USD"),
        (doc("<Cube currency='USD' rate='Infinity'/>"), "not a positive decimal"),
        (doc("<Cube currency='USD' rate='1e3'/>"), "rate '1e3' for USD"),
        (doc("<Cube currency='USD' rate='0'/>"), "not a positive decimal"),
        (doc("<Cube currency='USD' rate='0.0000'/>"), "not a positive decimal"),
        (doc("<Cube currency='USD' rate=' 1.05'/>"), "not a positive decimal"),
        (doc("<Cube currency='USD' rate=''/>"), "not a positive decimal"),
        (doc("<Cube currency='USD' rate='01.05'/>"), "not a positive decimal"),
        (doc("<Cube currency='USD'/>"), "lacks its currency or rate"),
        (doc("<Cube rate='1.05'/>"), "lacks its currency or rate"),
        (doc("<Cube currency='usd' rate='1.05'/>"), "'usd' is not an ISO 4217 currency code"),
        (doc("<Cube currency='XYZ' rate='1.05'/>"), "'XYZ' is not an ISO 4217"),
        (doc("<Cube currency='EUR' rate='1'/>"), "EUR is the base currency"),
        (doc("<Cube currency='USD' rate='1.05'/><Cube currency='USD' rate='1.06'/>"), "USD appears more"),
        (
            doc(
                "<Cube currency='USD' rate='1.05'/></Cube><Cube time='2026-11-19'>"
                "<Cube currency='USD' rate='1.06'/>"
            ),
            "2 reference dates",
        ),
        (
            doc("<Cube currency='USD' rate='1.05'/>", prolog="<!DOCTYPE gesmes:Envelope>\n"),
            "DTD or entity",
        ),
        (
            doc(
                "<Cube currency='USD' rate='&r;'/>",
                prolog='<!DOCTYPE x [<!ENTITY r "1.05">]>\n',
            ),
            "DTD or entity",
        ),
        (b"<x/><!ENTITY lol 'lol'>", "DTD or entity"),
        # UTF-16 (with or without a byte order mark) would let "<!DOCTYPE" hide from a byte search.
        (WITH_DTD.decode().replace("UTF-8", "UTF-16").encode("utf-16"), "UTF-8"),
        (WITH_DTD.decode().replace("UTF-8", "UTF-16").encode("utf-16-le"), "UTF-8"),
        (ONE_RATE.decode().replace("UTF-8", "ISO-8859-1").encode(), "declares encoding 'ISO-8859-1'"),
        (b"\xff\xfe<\x00x\x00/\x00>\x00", "UTF-8"),
        (b"not xml at all", "not well-formed XML"),
        (b"<Envelope><Cube/></Envelope>", "not an ECB gesmes:Envelope"),
        (b"<a" + b" " * 1_000_001 + b"/>", "larger than"),
    ],
)
def test_malformed_documents_are_refused(document: bytes, fragment: str) -> None:
    with pytest.raises(ConversionError) as info:
        parse_ecb(document)
    assert fragment in str(info.value)


def test_parse_error_names_the_given_field() -> None:
    with pytest.raises(ConversionError) as info:
        parse_ecb(doc(""), field="https://example.test/rates.xml")
    assert info.value.field == "https://example.test/rates.xml"


def test_minimal_valid_document() -> None:
    rates = parse_ecb(doc("<Cube currency='USD' rate='1.05'/>"))
    assert rates.per_eur == {"EUR": Fraction(1), "USD": Fraction(21, 20)}


# --------------------------------------------------------------------------- conversion


def test_cross_rates_are_exact() -> None:
    conv = converter()
    usd, gbp = Fraction(Decimal("1.0543")), Fraction(Decimal("0.83215"))
    assert conv.rate("USD", "GBP") == gbp / usd == Fraction(16643, 21086)
    assert conv.rate("GBP", "USD") == usd / gbp
    assert conv.rate("USD", "GBP") * conv.rate("GBP", "USD") == 1
    assert conv.rate("EUR", "USD") == usd
    assert conv.rate("USD", "EUR") == 1 / usd
    assert conv.rate("JPY", "JPY") == 1
    # 100 USD -> GBP: exact is 78.929147... ; reserving rounds up at the nano-unit.
    exact = 100 * gbp / usd
    up = convert(Money(Decimal(100), "USD"), "GBP", conv)
    down = convert(Money(Decimal(100), "USD"), "GBP", conv, round_up=False)
    assert up.currency == "GBP"
    assert Fraction(up.amount) >= exact >= Fraction(down.amount)
    assert up.amount - down.amount == Decimal("0.000000001")


def test_fresh_until_one_millisecond_before_max_age() -> None:
    conv = converter(at=REF_DAY + DEFAULT_MAX_AGE - timedelta(milliseconds=1))
    assert conv.rate("USD", "JPY") == Fraction(16287, 100) / Fraction(10543, 10000)
    assert conv.usable_until() == REF_DAY + DEFAULT_MAX_AGE


def test_stale_at_max_age_is_refused_with_date_and_limit() -> None:
    conv = converter(at=REF_DAY + DEFAULT_MAX_AGE)
    with pytest.raises(ConversionError) as info:
        conv.rate("USD", "JPY")
    assert info.value.problem == (
        "ECB reference rates of 2026-11-20 are older than 4 days; refusing to convert USD to JPY"
    )
    with pytest.raises(ConversionError):
        convert(Money(Decimal(1), "USD"), "JPY", conv)


def test_max_age_is_a_setting() -> None:
    six = timedelta(days=6)
    assert converter(at=REF_DAY + timedelta(days=5), max_age=six).rate("EUR", "USD") > 0
    with pytest.raises(ConversionError, match="older than 6 days"):
        converter(at=REF_DAY + six, max_age=six).rate("EUR", "USD")
    with pytest.raises(ConversionError, match="older than 36 hours"):
        converter(at=REF_DAY + timedelta(hours=36), max_age=timedelta(hours=36)).rate("EUR", "USD")
    with pytest.raises(ConversionError, match="max_age"):
        converter(max_age=timedelta(0))


def test_missing_currency_is_named() -> None:
    with pytest.raises(ConversionError) as info:
        converter().rate("USD", "VND")
    assert "no rate for VND" in info.value.problem
    assert "2026-11-20" in info.value.problem
    with pytest.raises(ConversionError, match="no rate for ARS or VND"):
        converter().rate("ARS", "VND")


def test_nothing_loaded_is_refused() -> None:
    message = "no ECB reference rates loaded; refusing to convert USD to JPY"
    with pytest.raises(ConversionError, match=message):
        converter(rates=None).rate("USD", "JPY")
    assert converter(rates=None).usable_until() is None


def test_rates_dated_in_the_future_are_refused() -> None:
    with pytest.raises(ConversionError, match="dated after today"):
        converter(at=REF_DAY - timedelta(days=2)).rate("USD", "JPY")
    # The previous UTC day is tolerated (time zones, small clock skew).
    assert converter(at=REF_DAY - timedelta(hours=20)).rate("USD", "JPY") > 0


# --------------------------------------------------------------------------- loading


async def test_load_from_file_path() -> None:
    rates = await EcbSource(str(SAMPLE_PATH)).load(None, ms(PUBLISHED))
    assert rates == SAMPLE_RATES


async def test_load_from_file_uses_and_fills_the_cache(tmp_path: Path) -> None:
    path = tmp_path / "rates.xml"
    path.write_bytes(SAMPLE)
    cache = MemoryCache()
    source = EcbSource(str(path))
    assert await source.load(cache, ms(PUBLISHED)) == SAMPLE_RATES
    assert cache.blobs[CACHE_NAME] == (SAMPLE, ms(PUBLISHED) + 3_600_000)
    path.unlink()  # the second load must not touch the file
    assert await source.load(cache, ms(PUBLISHED) + 1000) == SAMPLE_RATES


async def test_missing_file_is_named() -> None:
    with pytest.raises(ConversionError) as info:
        await EcbSource("/nonexistent/eurofxref.xml").load(None, ms(PUBLISHED))
    assert info.value.field == "/nonexistent/eurofxref.xml"
    assert "cannot read file" in info.value.problem


async def test_oversized_file_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "big.xml"
    path.write_bytes(SAMPLE)
    with pytest.raises(ConversionError, match="larger than 100 bytes"):
        await EcbSource(str(path), max_bytes=100).load(None, ms(PUBLISHED))


def test_source_settings_are_checked() -> None:
    with pytest.raises(ConversionError, match="only http"):
        EcbSource("ftp://example.test/rates.xml")
    with pytest.raises(ConversionError, match="required"):
        EcbSource("")
    with pytest.raises(ConversionError, match="cache_ttl"):
        EcbSource("rates.xml", cache_ttl=timedelta(0))


async def test_load_from_url_then_from_cache(http: TinyHttp) -> None:
    cache = MemoryCache()
    source = url_source(http)
    assert await source.load(cache, ms(PUBLISHED)) == SAMPLE_RATES
    assert http.hits == 1
    assert await source.load(cache, ms(PUBLISHED) + 59 * 60_000) == SAMPLE_RATES
    assert http.hits == 1  # a second broker (same cache) does not fetch again
    assert cache.puts == 1


async def test_expired_cache_entry_is_refetched(http: TinyHttp) -> None:
    cache = MemoryCache()
    source = url_source(http)
    await source.load(cache, ms(PUBLISHED))
    http.reply = Reply(body=dated("2026-11-20", usd="1.0600"))
    again = await source.load(cache, ms(PUBLISHED + timedelta(hours=1)))
    assert http.hits == 2
    assert again.per_eur["USD"] == Fraction(53, 50)
    assert cache.blobs[CACHE_NAME][0] == http.reply.body


async def test_load_without_content_length(http: TinyHttp) -> None:
    http.reply = Reply(send_length=False)
    assert await url_source(http).load(None, ms(PUBLISHED)) == SAMPLE_RATES


async def test_invalid_fetched_document_is_not_cached(http: TinyHttp) -> None:
    http.reply = Reply(body=doc("<Cube currency='USD' rate='1,05'/>"))
    cache = MemoryCache()
    with pytest.raises(ConversionError) as info:
        await url_source(http).load(cache, ms(PUBLISHED))
    assert info.value.field == http.url
    assert cache.blobs == {}


async def test_invalid_cached_document_is_ignored_and_replaced(http: TinyHttp) -> None:
    cache = MemoryCache()
    await cache.put_blob(CACHE_NAME, b"<garbage", ttl_ms=3_600_000, now_ms=ms(PUBLISHED))
    assert await url_source(http).load(cache, ms(PUBLISHED)) == SAMPLE_RATES
    assert http.hits == 1
    assert cache.blobs[CACHE_NAME][0] == SAMPLE


async def test_broken_cache_does_not_stop_loading(http: TinyHttp) -> None:
    cache: BlobCache = BrokenCache()
    assert await url_source(http).load(cache, ms(PUBLISHED)) == SAMPLE_RATES


async def test_future_dated_document_is_not_cached(http: TinyHttp) -> None:
    http.reply = Reply(body=dated("2026-12-24"))
    cache = MemoryCache()
    with pytest.raises(ConversionError, match="dated after today"):
        await url_source(http).load(cache, ms(PUBLISHED))
    assert cache.blobs == {}


@pytest.mark.parametrize(
    ("reply", "fragment"),
    [
        (Reply(status="500 Internal Server Error", body=b"oops"), "HTTP 500"),
        (Reply(status="404 Not Found", body=b""), "HTTP 404"),
        # Redirects are not followed: only the configured URL is trusted.
        (Reply(status="302 Found", body=b"", headers={"Location": "http://127.0.0.1:1/x"}), "HTTP 302"),
        (Reply(body=b"x" * 2000), "larger than 1000 bytes"),
        (Reply(body=b"x" * 2000, send_length=False), "larger than 1000 bytes"),
    ],
)
async def test_bad_http_answers_are_refused(http: TinyHttp, reply: Reply, fragment: str) -> None:
    http.reply = reply
    with pytest.raises(ConversionError, match=fragment):
        await url_source(http, max_bytes=1000).load(None, ms(PUBLISHED))


async def test_a_silent_server_times_out(http: TinyHttp) -> None:
    http.reply = Reply(stall=True)
    with pytest.raises(ConversionError, match=r"within 0\.2 s|ReadTimeout"):
        await url_source(http, timeout_s=0.2).load(None, ms(PUBLISHED))


async def test_unreachable_url_is_a_conversion_error() -> None:
    with pytest.raises(ConversionError, match="fetch failed"):
        await EcbSource("http://127.0.0.1:1/rates.xml", trust_env=False, timeout_s=2).load(None, 0)


# --------------------------------------------------------------------------- refreshing


async def test_refresh_loads_and_swaps(http: TinyHttp) -> None:
    clock = ManualClock(PUBLISHED)
    conv = EcbConverter(url_source(http), clock, store=MemoryCache())
    with pytest.raises(ConversionError, match="no ECB reference rates loaded"):
        conv.rate("USD", "GBP")
    assert await conv.refresh() == SAMPLE_RATES
    assert conv.rates is not None
    assert conv.rate("USD", "GBP") == Fraction(16643, 21086)


async def test_failed_refresh_keeps_previous_rates_until_they_go_stale(http: TinyHttp) -> None:
    clock = ManualClock(PUBLISHED)
    conv = EcbConverter(url_source(http), clock, store=MemoryCache())
    await conv.refresh()
    before = conv.rates
    http.reply = Reply(status="503 Service Unavailable", body=b"")
    clock.advance(2 * 3600)  # past the cache TTL, so the source is asked
    with pytest.raises(ConversionError, match="HTTP 503"):
        await conv.refresh()
    assert conv.rates is before
    assert conv.rate("USD", "GBP") == Fraction(16643, 21086)
    # And a bad document does not replace them either.
    http.reply = Reply(body=dated("2026-11-21", usd="NaN"))
    with pytest.raises(ConversionError, match="'NaN'"):
        await conv.refresh()
    assert conv.rates is before
    # The kept rates are never used past the limit.
    clock.advance((REF_DAY + DEFAULT_MAX_AGE - clock.now()).total_seconds())
    with pytest.raises(ConversionError, match="ECB reference rates of 2026-11-20 are older than 4 days"):
        conv.rate("USD", "GBP")


async def test_older_document_does_not_replace_newer_rates(http: TinyHttp) -> None:
    conv = EcbConverter(url_source(http), ManualClock(PUBLISHED), rates=SAMPLE_RATES)
    http.reply = Reply(body=dated("2026-11-19", usd="2.0"))
    assert await conv.refresh() is SAMPLE_RATES
    assert conv.rates is SAMPLE_RATES


async def test_refresh_without_source_is_an_error() -> None:
    with pytest.raises(ConversionError, match="no ECB source"):
        await converter().refresh()


async def test_run_refresher_logs_failures_and_stops(
    caplog: pytest.LogCaptureFixture, tmp_path: Path
) -> None:
    path = tmp_path / "rates.xml"
    conv = EcbConverter(EcbSource(str(path)), ManualClock(PUBLISHED))
    stop = asyncio.Event()
    with caplog.at_level(logging.ERROR, logger="currency.ecb"):
        task = asyncio.create_task(run_refresher(conv, 0.01, stop))
        await asyncio.sleep(0.1)
        assert not task.done()  # a missing file does not end the loop
        path.write_bytes(SAMPLE)
        for _ in range(100):
            if conv.rates is not None:
                break
            await asyncio.sleep(0.01)
        stop.set()
        await asyncio.wait_for(task, 1)
    assert conv.rates == SAMPLE_RATES
    failures = [r for r in caplog.records if "ECB rates refresh failed" in r.getMessage()]
    assert failures
    assert "cannot read file" in failures[0].getMessage()
    assert "conversions are refused" in failures[0].getMessage()
    assert not failures[0].exc_info  # an expected failure, not a traceback


async def test_run_refresher_survives_unexpected_errors(caplog: pytest.LogCaptureFixture) -> None:
    class Flaky(EcbSource):
        calls = 0

        async def load(self, store: BlobCache | None, now_ms: int) -> EcbRates:
            type(self).calls += 1
            if type(self).calls == 1:
                raise RuntimeError("boom")
            return await super().load(store, now_ms)

    conv = EcbConverter(Flaky(str(SAMPLE_PATH)), ManualClock(PUBLISHED))
    stop = asyncio.Event()
    stop.set()
    await run_refresher(conv, 3600, stop)  # returns at once when already stopped
    assert Flaky.calls == 0
    stop.clear()
    with caplog.at_level(logging.ERROR, logger="currency.ecb"):
        task = asyncio.create_task(run_refresher(conv, 0.01, stop))
        for _ in range(100):
            if conv.rates is not None:
                break
            await asyncio.sleep(0.01)
        stop.set()
        await asyncio.wait_for(task, 1)
    assert conv.rates == SAMPLE_RATES
    [failure] = [r for r in caplog.records if "ECB rates refresh failed" in r.getMessage()]
    assert "boom" in failure.getMessage()
    assert failure.exc_info  # a bug gets its traceback


# --------------------------------------------------------------------------- properties

PROPS = settings(max_examples=300, deadline=None)
FRESH = converter()
units = st.integers(min_value=0, max_value=10**18 - 1)
currencies = st.sampled_from(CURRENCIES)


@PROPS
@given(units, currencies, currencies)
def test_rounding_brackets_the_exact_value(n: int, source: str, target: str) -> None:
    money = Money.from_units(n, source)
    exact = n * SAMPLE_RATES.per_eur[target] / SAMPLE_RATES.per_eur[source]
    up = convert(money, target, FRESH)
    down = convert(money, target, FRESH, round_up=False)
    # A reservation is never smaller than the true cost, a payout never larger.
    assert up.units() >= exact >= down.units()
    assert up.units() - down.units() == (0 if exact.denominator == 1 else 1)


@PROPS
@given(units, currencies, currencies)
def test_round_trips_never_gain_against_the_direction(n: int, source: str, target: str) -> None:
    money = Money.from_units(n, source)
    up_and_back = convert(convert(money, target, FRESH), source, FRESH)
    down_and_back = convert(convert(money, target, FRESH, round_up=False), source, FRESH, round_up=False)
    assert down_and_back.units() <= n <= up_and_back.units()
