"""A corpus of hostile requests against one real broker process and one real Exchange.

One reference Exchange and one broker (`ramp-broker serve`: period budgets on the embedded
SQLite store, agents alice and carol in two accounts, an admin token from the environment, a
5.00 USD default session limit) run as processes on loopback for the whole module. Each
corpus test sends its requests one after another (amounts, currencies, ids, scopes, batches,
chosen offers, constraints, credentials, admin calls; then protocol abuse) over Connect JSON,
Connect protobuf, gRPC (raw HTTP/2 and grpcio) and gRPC-Web, and checks every answer and what
it left behind:

- the right refusal: a 4xx Connect status with the right code, or a gRPC status with the
  right code; never 5xx, UNKNOWN or INTERNAL. Documented exceptions: a gRPC message flagged
  compressed on a stream without grpc-encoding is INTERNAL (as in grpc-go); Connect maps
  UNIMPLEMENTED to HTTP 501 itself; gRPC on HTTP/1.1 is UNIMPLEMENTED with HTTP 505; an
  unknown gRPC method or service is a plain HTTP 404, which gRPC clients read as UNIMPLEMENTED;
- a short message (at most 300 characters: nothing huge is echoed) free of Python internals,
  file paths, SQL and Lua;
- nothing reached the Exchange (no execute call, no charge; no discovery either, unless the
  case legitimately gets as far as pricing) and no session was created; the store (every
  agent's budget status, every scope's status and ledger, open holds, every row of the SQLite
  file) is the same after the corpus as before;
- the broker stays responsive: a separate process polls GET /healthz on its own connection
  for the whole corpus; every probe must be answered, and none may take 100 ms or more
  because of a request: a slow probe's case is replayed, and fails the test if every replay
  holds the broker up as long too (on a loaded machine any process can wait that long for a
  CPU; see REPLAYS); a probe of a second or more fails it outright;
- the broker logged no traceback and no internal error.

Redeclaring another agent's session id is allowed (it creates the caller's own session) and
is checked on its own. The last tests hold what this corpus found the broker doing wrong.
"""

from __future__ import annotations

import asyncio
import base64
import bisect
import contextlib
import functools
import gzip
import hashlib
import json
import math
import re
import sqlite3
import struct
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import unquote

import grpc
import httpx
import pytest
import pytest_asyncio
from google.protobuf import json_format
from google.protobuf.message import Message
from h2.exceptions import ProtocolError as H2ProtocolError
from h2.exceptions import StreamClosedError

from ramp.broker.v1 import broker_pb2 as bpb
from tests.h2client import H2Client, Stream
from tests.processes import Child, broker_tree, catalog_tree, start_broker, start_exchange

pytestmark = pytest.mark.asyncio(loop_scope="module")
# Sends a case again (a suspect's replay): a fresh call, on a fresh connection.
Resend = Callable[[], Awaitable[object]]

ALICE, CAROL = "hostile-alice-key", "hostile-carol-key"
ADMIN_ENV, ADMIN = "RAMP_HOSTILE_TEST_ADMIN_TOKEN", "hostile-admin-token"
A, B = "https://x.test/a", "https://x.test/b"  # 1.00 and 2.00 USD flat (catalog_tree)
SESSION, TINY, CAROL_SESSION = "alice-s", "alice-tiny", "carol-s"  # declared before any corpus
SETUP_KEY = "setup-buy-1"  # alice bought A under it in SESSION before any corpus
MiB = 1 << 20
TRANSACT_PATH = "/ramp.broker.v1.BrokerService/Transact"
AUTH = ("authorization", f"Bearer {ALICE}")
WRONG = ("authorization", "Bearer wrong-key")

TRANSACT, RESOLVE = "BrokerService/Transact", "BrokerService/Resolve"
DECLARE, STATUS = "BudgetService/DeclareSessionBudget", "BudgetService/GetBudgetStatus"
SET_LIMIT, ADD_CREDIT = "BudgetAdminService/SetPeriodLimit", "BudgetAdminService/AddCredit"
SCOPE_STATUS, HISTORY = "BudgetAdminService/GetScopeStatus", "BudgetAdminService/GetScopeHistory"
LIST_HOLDS, SETTLE = "BudgetAdminService/ListHolds", "BudgetAdminService/SettleHold"
REQUESTS: dict[str, type[Message]] = {
    TRANSACT: bpb.TransactRequest, RESOLVE: bpb.ResolveRequest,
    DECLARE: bpb.DeclareSessionBudgetRequest, STATUS: bpb.GetBudgetStatusRequest,
    SET_LIMIT: bpb.SetPeriodLimitRequest, ADD_CREDIT: bpb.AddCreditRequest,
    SCOPE_STATUS: bpb.GetScopeStatusRequest, HISTORY: bpb.GetScopeHistoryRequest,
    LIST_HOLDS: bpb.ListHoldsRequest, SETTLE: bpb.SettleHoldRequest,
}
# Every scope the broker's configuration knows (their status and ledger must not move).
SCOPES = ("user:alice", "team:eng", "billing:alice", "user:carol")

INVALID, UNAUTHENTICATED, DENIED = "invalid_argument", "unauthenticated", "permission_denied"
NOT_FOUND, EXHAUSTED, PRECONDITION = "not_found", "resource_exhausted", "failed_precondition"
UNIMPLEMENTED, INTERNAL = "unimplemented", "internal"
GRPC_CODES = {INVALID: 3, NOT_FOUND: 5, DENIED: 7, EXHAUSTED: 8, PRECONDITION: 9,
              UNIMPLEMENTED: 12, INTERNAL: 13, UNAUTHENTICATED: 16}
# Connect's HTTP status per code. UNIMPLEMENTED is 501 by the Connect protocol itself (only
# an unknown compression gets it over Connect here); INTERNAL is never expected over Connect.
CONNECT_HTTP = {INVALID: 400, PRECONDITION: 400, UNAUTHENTICATED: 401, DENIED: 403,
                NOT_FOUND: 404, EXHAUSTED: 429, UNIMPLEMENTED: 501}

MAX_MESSAGE = 300
LEAKS = re.compile(
    r"[A-Za-z]*(?:Error|Exception)\b|Traceback|object is not|codec can't|invalid literal"
    r"|maximum recursion|int_max_str_digits|while decompressing|NoneType|unexpected keyword"
    r"|\.py\b|/usr/|site-packages|/tmp/|\bSELECT\b|\bINSERT\b|(?i:sqlite)|\.lua\b|redis\.call")
# Fields of a budget reading that move by themselves (the reading's time, the forecast).
VOLATILE = frozenset({"asOf", "spendRatePerHour", "projectedExhaustion"})
HEALTHZ_MAX_SECONDS = 0.100


def sha(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


def usd(amount: str) -> dict[str, str]:
    return {"amount": amount, "currency": "USD"}


def envelope(payload: bytes, flags: int = 0) -> bytes:
    return struct.pack(">BI", flags, len(payload)) + payload


# --- the corpus -------------------------------------------------------------------------------


@dataclass(frozen=True)
class Case:
    """One hostile RPC: `body` is a JSON value (bytes: JSON text as is) sent to `method` with
    `key` as `authorization: Bearer <key>` (None: no authorization header) plus `headers`.
    `discovers`: the request legitimately gets as far as asking the Exchange for quotes."""

    name: str
    method: str
    body: Any
    code: str
    key: str | None = ALICE
    headers: tuple[tuple[str, str], ...] = ()
    discovers: bool = False

    def json_bytes(self) -> bytes:
        if isinstance(self.body, bytes):
            return self.body
        return json.dumps(self.body, ensure_ascii=False).encode()

    def proto_bytes(self) -> bytes | None:
        """The same request as binary protobuf; None when it has no protobuf form (a float
        for a string, an unknown field, raw JSON text...)."""
        if isinstance(self.body, bytes):
            return None
        try:
            message = json_format.ParseDict(self.body, REQUESTS[self.method]())
        except (json_format.ParseError, ValueError, TypeError, AttributeError):
            return None
        data: bytes = message.SerializeToString()
        return data

    def all_headers(self) -> list[tuple[str, str]]:
        auth = [("authorization", f"Bearer {self.key}")] if self.key is not None else []
        return [*auth, *self.headers]


def transact(name: str, code: str = INVALID, *, key: str | None = ALICE, discovers: bool = False,
             headers: tuple[tuple[str, str], ...] = (), **fields: Any) -> Case:
    body = {"sessionId": "hostile-s", "idempotencyKey": "hostile-k", "uris": [A], **fields}
    return Case(f"Transact {name}", TRANSACT, {k: v for k, v in body.items() if v is not None},
                code, key, headers, discovers)


def offer(offer_id: str = "a", exchange: str = "ref.test", uri: str = A, **more: Any) -> dict[str, Any]:
    return {"uri": uri, "offer": {"offerId": offer_id, "exchange": exchange, **more}}


def flat(rate: str, currency: str = "USD", model: str = "PRICING_MODEL_FLAT") -> dict[str, Any]:
    return {"pricing": {"model": model, "rate": rate, "currency": currency}}


BAD_AMOUNTS: list[tuple[str, Any]] = [
    ("negative", "-1.00"), ("negative zero", "-0"), ("plus sign", "+1.00"), ("exponent", "1e2"),
    ("capital exponent", "1E-2"), ("NaN", "NaN"), ("Infinity", "Infinity"), ("-Infinity", "-Infinity"),
    ("ten decimals", "0.0000000001"), ("10^9", "1000000000"), ("40 digits", "9" * 40),
    ("empty", ""), ("leading space", " 1.00"), ("trailing space", "1.00 "), ("inner space", "1 000"),
    ("arabic-indic digits", "\u0661\u0662"), ("fullwidth digits", "\uff11\uff12"), ("superscript", "\u00b2"),
    ("leading zero", "01.00"), ("bare point", "1."), ("leading point", ".5"), ("hex", "0x10"),
    ("comma decimal", "1,00"), ("underscore", "1_000"), ("NUL", "1\x00"), ("10k digits", "9" * 10_000),
    ("JSON float", 1.5), ("JSON integer", 1), ("JSON 1e308", 1e308), ("JSON NaN", math.nan),
    ("JSON bool", True), ("JSON object", {}),
]
BAD_CURRENCIES: list[tuple[str, Any]] = [
    ("lowercase", "usd"), ("mixed case", "Usd"), ("two letters", "US"), ("four letters", "USDD"),
    ("XXX (no currency)", "XXX"), ("XTS (testing)", "XTS"), ("XAU (gold)", "XAU"), ("XDR", "XDR"),
    ("fund code", "BOV"), ("unknown", "ZZZ"), ("empty", ""), ("symbol", "U$D"), ("non-ASCII", "\u00dcSD"),
    ("space", "US D"), ("NUL", "\x00SD"), ("5000 letters", "C" * 5000), ("JSON number", 840),
]
BAD_IDS: list[tuple[str, str]] = [
    ("empty", ""), ("129 characters", "s" * 129), ("NUL", "s\x00"), ("newline", "s\n1"), ("DEL", "s\x7f"),
    ("accented", "s\u00e9ssion"), ("CJK", "\u30bb\u30c3\u30b7\u30e7\u30f3"), ("space", "s 1"),
    ("owner separator", "s#1"), ("zero-width space", "s\u200b"), ("percent", "s%00"),
    ("quote", "s'1"), ("100k characters", "s" * 100_000),
]
MALFORMED_SCOPES: list[tuple[str, str]] = [
    ("braces", "user:{alice}"), ("braces in kind", "{acme}:alice"), ("second colon", "user:alice:x"),
    ("space after colon", "user: alice"), ("inner space", "user:al ice"),
    ("161 characters", "user:" + "a" * 156), ("non-ASCII", "user:al\u00efce"),
    ("zero-width space", "user:alice\u200b"), ("uppercase kind", "USER:alice"),
    ("no id", "user:"), ("no kind", ":alice"), ("key separator", "user|alice"), ("newline", "user:alice\n"),
    ("100k characters", "user:" + "a" * 100_000),
]
NOT_GRANTED_SCOPES: list[tuple[str, str]] = [
    ("another account's scope", "user:carol"), ("an unknown team", "team:other"),
    ("an unlisted project", "project:q5"), ("another billing ref", "billing:carol"),
]
BAD_URI_LISTS: list[tuple[str, list[str]]] = [
    ("no URIs", []),
    ("257 URIs", [f"https://x.test/{i}" for i in range(257)]),
    ("257 duplicates", [A] * 257),
    ("duplicates and an empty URI", [A, A, ""]),
    ("2049-character URI", [A, "https://x.test/" + "u" * 2034]),
    ("no scheme", ["x.test/a"]),
    ("relative", ["/relative"]),
    ("space", ["https://x.test/a b"]),
    ("NUL", ["https://x.test/\x00"]),
    ("line separator", ["https://x.test/\u2028"]),
    ("scheme only", ["mailto:"]),
    ("scheme starting with a digit", ["1http://x.test/a"]),
    # Big bodies, still under the 1 MiB limit: decoded and checked in full.
    ("255 long URIs then a bad one (~520 KB)",
     [f"https://x.test/{i}/" + "p" * 2020 for i in range(255)] + ["not a uri"]),
    ("256 URIs of 4000 characters (~1 MB)", [f"https://x.test/{i}/" + "q" * 3980 for i in range(256)]),
]


def _amount_cases() -> list[Case]:
    cases: list[Case] = []
    for name, amount in BAD_AMOUNTS:
        cases.append(Case(f"Declare amount {name}", DECLARE, {
            "sessionId": "hostile-d", "limit": {"amount": amount, "currency": "USD"}}, INVALID))
        cases.append(transact(f"maxPrice amount {name}",
                              constraints={"maxPrice": {"amount": amount, "currency": "USD"}}))
    for name, amount in BAD_AMOUNTS[::4]:
        cases.append(transact(f"periodBudget amount {name}", constraints={
            "periodBudget": {"amount": amount, "currency": "USD"}, "budgetPeriod": "3600s"}))
        cases.append(transact(f"maxUnitCost {name}", constraints={"maxUnitCost": amount}))
        cases.append(Case(f"SetPeriodLimit amount {name}", SET_LIMIT, {
            "scope": "user:alice", "period": "month", "limit": {"amount": amount, "currency": "USD"}},
            INVALID, ADMIN))
        cases.append(Case(f"AddCredit amount {name}", ADD_CREDIT, {
            "scope": "user:alice", "period": "month", "amount": {"amount": amount, "currency": "USD"}},
            INVALID, ADMIN))
    return cases


def _currency_cases() -> list[Case]:
    cases: list[Case] = []
    for name, currency in BAD_CURRENCIES:
        cases.append(Case(f"Declare currency {name}", DECLARE, {
            "sessionId": "hostile-d", "limit": {"amount": "1.00", "currency": currency}}, INVALID))
        cases.append(transact(f"maxPrice currency {name}",
                              constraints={"maxPrice": {"amount": "1.00", "currency": currency}}))
    for name, currency in BAD_CURRENCIES[::3]:
        cases.append(Case(f"SetPeriodLimit currency {name}", SET_LIMIT, {
            "scope": "user:alice", "period": "month", "limit": {"amount": "1.00", "currency": currency}},
            INVALID, ADMIN))
    return cases


def _id_cases() -> list[Case]:
    cases: list[Case] = []
    for name, value in BAD_IDS:
        cases.append(transact(f"sessionId {name}", sessionId=value))
        cases.append(transact(f"idempotencyKey {name}", idempotencyKey=value))
        cases.append(Case(f"Declare sessionId {name}", DECLARE,
                          {"sessionId": value, "limit": usd("1.00")}, INVALID))
        if value:  # an empty session id is "no session" for these two
            cases.append(Case(f"GetBudgetStatus sessionId {name}", STATUS, {"sessionId": value}, INVALID))
            cases.append(Case(f"Resolve sessionId {name}", RESOLVE, {"uris": [A], "sessionId": value},
                              INVALID))
    cases.append(transact("idempotencyKey reused for another request", sessionId=SESSION,
                          idempotencyKey=SETUP_KEY, uris=[B]))
    return cases


def _scope_cases() -> list[Case]:
    cases: list[Case] = []
    for name, scope in MALFORMED_SCOPES:
        cases.append(transact(f"budgetScope {name}", constraints={"budgetScope": scope}))
        cases.append(Case(f"GetBudgetStatus budgetScope {name}", STATUS, {"budgetScope": scope}, INVALID))
        cases.append(Case(f"Resolve budgetScope {name}", RESOLVE,
                          {"uris": [A], "constraints": {"budgetScope": scope}}, INVALID))
        cases.append(Case(f"GetScopeStatus scope {name}", SCOPE_STATUS, {"scope": scope}, INVALID, ADMIN))
        cases.append(Case(f"GetScopeHistory scope {name}", HISTORY, {"scope": scope}, INVALID, ADMIN))
        cases.append(Case(f"SetPeriodLimit scope {name}", SET_LIMIT,
                          {"scope": scope, "period": "month", "limit": usd("1.00")}, INVALID, ADMIN))
    for name, scope in NOT_GRANTED_SCOPES:
        cases.append(transact(f"budgetScope {name}", DENIED, constraints={"budgetScope": scope}))
        cases.append(Case(f"GetBudgetStatus budgetScope {name}", STATUS, {"budgetScope": scope}, DENIED))
        cases.append(Case(f"Resolve budgetScope {name}", RESOLVE,
                          {"uris": [A], "constraints": {"budgetScope": scope}}, DENIED))
        cases.append(transact(f"periodBudget on {name}", DENIED, constraints={
            "budgetScope": scope, "periodBudget": usd("0.01"), "budgetPeriod": "3600s"}))
    cases.append(Case("GetBudgetStatus budgetScope of alice's account, by carol", STATUS,
                      {"sessionId": CAROL_SESSION, "budgetScope": "user:alice"}, DENIED, CAROL))
    for scope in ("team:other", "project:q5", "user:nobody"):  # not in any configured account
        cases.append(Case(f"GetScopeStatus unknown scope {scope}", SCOPE_STATUS, {"scope": scope},
                          NOT_FOUND, ADMIN))
        cases.append(Case(f"GetScopeHistory unknown scope {scope}", HISTORY, {"scope": scope},
                          NOT_FOUND, ADMIN))
        cases.append(Case(f"SetPeriodLimit unknown scope {scope}", SET_LIMIT,
                          {"scope": scope, "period": "month", "limit": usd("1.00")}, NOT_FOUND, ADMIN))
    return cases


def _batch_cases() -> list[Case]:
    cases: list[Case] = []
    for name, uris in BAD_URI_LISTS:
        cases.append(transact(f"uris {name}", uris=uris))
        cases.append(Case(f"Resolve uris {name}", RESOLVE, {"uris": uris}, INVALID))
    cases.append(transact("uris and offers both", offers=[offer()]))
    cases.append(transact("257 offers", uris=None, offers=[offer()] * 257))
    return cases


def _offer_cases() -> list[Case]:
    cases = [
        # Priced by the Exchange, never by the agent: refused once the quote is known.
        transact("forged flat rate", uris=None, offers=[offer(**flat("0.01"))], discovers=True),
        transact("forged zero rate", uris=None, offers=[offer(**flat("0"))], discovers=True),
        transact("forged pricing model", uris=None, discovers=True,
                 offers=[offer(**flat("1.00", model="PRICING_MODEL_FREE"))]),
        transact("forged pricing currency", uris=None, offers=[offer(**flat("1.00", "EUR"))], discovers=True),
        # Offers the Exchange does not quote.
        transact("offer id not quoted", PRECONDITION, uris=None, offers=[offer("zzz")], discovers=True),
        transact("real offer id under another URI", PRECONDITION, uris=None, offers=[offer("b")],
                 discovers=True),
        # Malformed before anything is asked.
        transact("malformed rate", uris=None, offers=[offer(**flat("x"))]),
        transact("negative rate", uris=None, offers=[offer(**flat("-1.00"))]),
        transact("rate with exponent", uris=None, offers=[offer(**flat("1e-9"))]),
        transact("lowercase pricing currency", uris=None, offers=[offer(**flat("1.00", "usd"))]),
        transact("negative estimated quantity", uris=None, offers=[offer(pricing={
            "model": "PRICING_MODEL_PER_UNIT", "rate": "1.00", "currency": "USD", "estimatedQuantity": -5})]),
        transact("unknown exchange", uris=None, offers=[offer(exchange="nope.test")]),
        transact("empty exchange", uris=None, offers=[offer(exchange="")]),
        transact("10k-character exchange", uris=None, offers=[offer(exchange="e" * 10_000)]),
        transact("empty offer id", uris=None, offers=[offer("")]),
        transact("257-character offer id", uris=None, offers=[offer("o" * 257)]),
        transact("offer id with a NUL", uris=None, offers=[offer("a\x00")]),
        transact("offer id with a newline", uris=None, offers=[offer("a\nb")]),
        transact("offer without a URI", uris=None, offers=[offer(uri="")]),
        transact("offer with a relative URI", uris=None, offers=[offer(uri="/a")]),
        transact("offer with a 2049-character URI", uris=None,
                 offers=[offer(uri="https://x.test/" + "u" * 2034)]),
        transact("chosen offer without an offer", uris=None, offers=[{"uri": A}]),
        transact("offers an empty list", uris=None, offers=[]),
    ]
    return cases


def _constraint_cases() -> list[Case]:
    return [
        # Carol has no billing ref: a period budget with no scope has nothing to apply to.
        transact("periodBudget without a scope", DENIED, key=CAROL, sessionId=CAROL_SESSION,
                 constraints={"periodBudget": usd("0.01"), "budgetPeriod": "3600s"}),
        transact("budgetPeriod without periodBudget", constraints={"budgetPeriod": "3600s"}),
        *(transact(f"budgetPeriod {name}", constraints={"periodBudget": usd("1.00"), "budgetPeriod": period})
          for name, period in (("negative", "-60s"), ("zero", "0s"), ("with nanos", "3600.5s"),
                               ("under a minute", "59s"), ("over 366 days", "31622401s"),
                               ("not a duration", "a month"))),
        transact("deadline under 1 ms", deadline="0.0001s"),
        transact("deadline of 1 ns", deadline="0.000000001s"),
        transact("deadline over 120 s", deadline="121s"),
        transact("negative deadline", deadline="-1s"),
        transact("deadline out of the Duration range", deadline="315576000001s"),
        transact("deadline as a number", deadline=5),
        Case("Resolve deadline over 120 s", RESOLVE, {"uris": [A], "deadline": "121s"}, INVALID),
        transact("unknown exchange constraint", constraints={"exchanges": ["nope.test"]}),
        transact("10k-character exchange constraint", constraints={"exchanges": ["e" * 10_000]}),
        transact("unspecified delivery", constraints={"deliveryPreference": ["DELIVERY_METHOD_UNSPECIFIED"]}),
        transact("unknown delivery number", constraints={"deliveryPreference": [99]}),
        transact("unknown delivery name", constraints={"deliveryPreference": ["TELEPATHY"]}),
        transact("misspelled constraint", constraints={"maxPrize": usd("0.01")}),
        transact("unknown top-level field", dryRun=True),
        # Budget refusals: they get as far as pricing, and must stop there (existing sessions:
        # see test_a_denied_transact_on_a_new_session_id_creates_no_session for new ones).
        transact("maxPrice below every offer", EXHAUSTED, sessionId=SESSION, discovers=True,
                 constraints={"maxPrice": usd("0.50")}),
        transact("session budget too small", EXHAUSTED, sessionId=TINY, discovers=True),
        transact("periodBudget below the cost", EXHAUSTED, sessionId=SESSION, discovers=True,
                 constraints={"periodBudget": usd("0.10"), "budgetPeriod": "2592000s"}),
        transact("periodBudget on a named scope below the cost", EXHAUSTED, sessionId=SESSION,
                 discovers=True, constraints={"budgetScope": "team:eng", "periodBudget": usd("0.10"),
                                              "budgetPeriod": "86400s"}),
        transact("maxPrice in a currency without rates", PRECONDITION, sessionId=SESSION, discovers=True,
                 constraints={"maxPrice": {"amount": "0.50", "currency": "EUR"}}),
        transact("URI nobody offers", NOT_FOUND, sessionId=SESSION, discovers=True,
                 uris=["https://x.test/zzz"]),
    ]


def _auth_cases() -> list[Case]:
    buy = {"sessionId": SESSION, "idempotencyKey": "auth-k", "uris": [A]}  # would buy with alice's key
    basic = "Basic " + base64.b64encode(f"alice:{ALICE}".encode()).decode()
    return [
        Case("Transact without a key", TRANSACT, buy, UNAUTHENTICATED, None),
        Case("Transact with a wrong key", TRANSACT, buy, UNAUTHENTICATED, "wrong-key"),
        Case("Transact with an 8000-character key", TRANSACT, buy, UNAUTHENTICATED, "k" * 8000),
        Case("Transact with the key as Basic", TRANSACT, buy, UNAUTHENTICATED, None,
             (("authorization", basic),)),
        Case("Transact with the key without a scheme", TRANSACT, buy, UNAUTHENTICATED, None,
             (("authorization", ALICE),)),
        Case("Transact with the key as a Token scheme", TRANSACT, buy, UNAUTHENTICATED, None,
             (("authorization", f"Token {ALICE}"),)),
        Case("Transact with an empty Bearer", TRANSACT, buy, UNAUTHENTICATED, None,
             (("authorization", "Bearer"),)),
        Case("Transact with the key and trailing text", TRANSACT, buy, UNAUTHENTICATED, f"{ALICE} extra"),
        Case("Transact with a wrong x-api-key", TRANSACT, buy, UNAUTHENTICATED, None,
             (("x-api-key", "wrong-key"),)),
        Case("Transact with the admin token as a key", TRANSACT, buy, UNAUTHENTICATED, ADMIN),
        Case("Transact with a wrong key and an unreadable body", TRANSACT, b"\xff{[", UNAUTHENTICATED,
             "wrong-key"),
        Case("Declare without a key", DECLARE, {"sessionId": "hostile-d", "limit": usd("1.00")},
             UNAUTHENTICATED, None),
        Case("GetBudgetStatus with a wrong key", STATUS, {"sessionId": SESSION}, UNAUTHENTICATED, "nope"),
        Case("Resolve without a key", RESOLVE, {"uris": [A]}, UNAUTHENTICATED, None),
        Case("GetScopeStatus with an agent key", SCOPE_STATUS, {}, UNAUTHENTICATED, ALICE),
        Case("GetScopeStatus without a token", SCOPE_STATUS, {}, UNAUTHENTICATED, None),
        Case("GetScopeHistory with a wrong token", HISTORY, {"scope": "user:alice"}, UNAUTHENTICATED, "nope"),
        Case("SetPeriodLimit with an agent key", SET_LIMIT,
             {"scope": "user:alice", "period": "month", "limit": usd("999.00")}, UNAUTHENTICATED, ALICE),
        Case("AddCredit without a token", ADD_CREDIT,
             {"scope": "user:alice", "period": "month", "amount": usd("999.00")}, UNAUTHENTICATED, None),
        Case("SettleHold with an agent key", SETTLE,
             {"account": "acme", "reservationId": "r", "action": "SETTLE_ACTION_CHARGED"},
             UNAUTHENTICATED, CAROL),
        Case("ListHolds with the token as Basic", LIST_HOLDS, {}, UNAUTHENTICATED, None,
             (("authorization", f"Basic {ADMIN}"),)),
        Case("GetScopeStatus with a wrong token and an unreadable body", SCOPE_STATUS, b"\xff{[",
             UNAUTHENTICATED, "nope"),
        # Another caller's session is not found, exactly like one that does not exist.
        Case("GetBudgetStatus of alice's session by carol", STATUS, {"sessionId": SESSION}, NOT_FOUND, CAROL),
        Case("GetBudgetStatus of carol's session by alice", STATUS, {"sessionId": CAROL_SESSION}, NOT_FOUND),
        Case("GetBudgetStatus of an undeclared session", STATUS, {"sessionId": "never-declared"}, NOT_FOUND),
    ]


def _admin_cases() -> list[Case]:
    return [
        Case("SetPeriodLimit unknown period", SET_LIMIT,
             {"scope": "user:alice", "period": "fortnight", "limit": usd("1.00")}, INVALID, ADMIN),
        Case("SetPeriodLimit empty period", SET_LIMIT,
             {"scope": "user:alice", "period": "", "limit": usd("1.00")}, INVALID, ADMIN),
        Case("SetPeriodLimit zero-second period", SET_LIMIT,
             {"scope": "user:alice", "period": "0s", "limit": usd("1.00")}, INVALID, ADMIN),
        Case("SetPeriodLimit negative period", SET_LIMIT,
             {"scope": "user:alice", "period": "-1h", "limit": usd("1.00")}, INVALID, ADMIN),
        Case("SetPeriodLimit 10k-character period", SET_LIMIT,
             {"scope": "user:alice", "period": "9" * 10_000 + "h", "limit": usd("1.00")}, INVALID, ADMIN),
        Case("SetPeriodLimit without a limit", SET_LIMIT, {"scope": "user:alice", "period": "month"},
             INVALID, ADMIN),
        Case("SetPeriodLimit another currency mid-window", SET_LIMIT, {
            "scope": "user:alice", "period": "month", "limit": {"amount": "100.00", "currency": "EUR"}},
            PRECONDITION, ADMIN),
        Case("AddCredit without an amount", ADD_CREDIT, {"scope": "user:alice", "period": "month"},
             INVALID, ADMIN),
        Case("AddCredit malformed scope", ADD_CREDIT,
             {"scope": "user:{a}", "period": "month", "amount": usd("1.00")}, INVALID, ADMIN),
        Case("GetScopeHistory limit 1001", HISTORY, {"scope": "user:alice", "limit": 1001}, INVALID, ADMIN),
        Case("GetScopeHistory limit -1", HISTORY, {"scope": "user:alice", "limit": -1}, INVALID, ADMIN),
        Case("GetScopeHistory limit 2^31-1", HISTORY, {"scope": "user:alice", "limit": 2**31 - 1},
             INVALID, ADMIN),
        Case("GetScopeHistory limit 2^31", HISTORY, {"scope": "user:alice", "limit": 2**31}, INVALID, ADMIN),
        Case("GetScopeHistory unknown period", HISTORY, {"scope": "user:alice", "period": "eon"},
             INVALID, ADMIN),
        Case("ListHolds malformed account", LIST_HOLDS, {"account": "{acme}"}, INVALID, ADMIN),
        Case("ListHolds unknown account", LIST_HOLDS, {"account": "nope"}, NOT_FOUND, ADMIN),
        Case("ListHolds scope of another account", LIST_HOLDS, {"account": "other", "scope": "user:alice"},
             INVALID, ADMIN),
        *(Case(f"SettleHold {name}", SETTLE,
               {"account": "acme", "reservationId": rid, "action": "SETTLE_ACTION_REFUNDED"}, INVALID, ADMIN)
          for name, rid in (("empty reservation id", ""), ("129-character reservation id", "r" * 129),
                            ("reservation id with a newline", "r\n1"))),
        Case("SettleHold without an action", SETTLE, {"account": "acme", "reservationId": "r"},
             INVALID, ADMIN),
        Case("SettleHold unknown action number", SETTLE,
             {"account": "acme", "reservationId": "r", "action": 42}, INVALID, ADMIN),
        Case("SettleHold unknown account", SETTLE,
             {"account": "nope", "reservationId": "r", "action": "SETTLE_ACTION_CHARGED"}, NOT_FOUND, ADMIN),
        Case("SettleHold malformed account", SETTLE,
             {"account": "a b", "reservationId": "r", "action": "SETTLE_ACTION_CHARGED"}, INVALID, ADMIN),
    ]


CORPUS: list[Case] = [
    *_amount_cases(), *_currency_cases(), *_id_cases(), *_scope_cases(), *_batch_cases(),
    *_offer_cases(), *_constraint_cases(), *_auth_cases(), *_admin_cases(),
]
# Cases that also have a binary protobuf form, for Connect protobuf, gRPC and gRPC-Web.
BINARY: list[tuple[Case, bytes]] = [(c, data) for c in CORPUS if (data := c.proto_bytes()) is not None]
# A few for grpcio, a real gRPC client: one of each kind of refusal.
GRPCIO_NAMES = (
    "Declare amount negative", "Transact maxPrice currency XTS (testing)", "Transact sessionId NUL",
    "Transact budgetScope braces", "Transact budgetScope another account's scope",
    "Transact uris 257 URIs", "Transact offer id not quoted", "Transact forged flat rate",
    "Transact maxPrice below every offer", "Transact without a key", "Transact with the key as Basic",
    "GetScopeStatus with an agent key", "GetBudgetStatus of alice's session by carol",
    "Transact uris 256 URIs of 4000 characters (~1 MB)",
)


async def test_the_corpus_is_large_and_well_formed() -> None:
    names = [c.name for c in CORPUS]
    assert len(names) == len(set(names)), [n for n in names if names.count(n) > 1]
    assert len(CORPUS) >= 100, len(CORPUS)
    assert len(BINARY) >= 100, len(BINARY)
    assert all(c.code in GRPC_CODES for c in CORPUS)
    assert {n for n in GRPCIO_NAMES} <= {c.name for c, _ in BINARY}
    biggest = max(len(c.json_bytes()) for c in CORPUS)
    assert 1_000_000 < biggest < MiB, biggest  # near the limit, never over it (those are below)


# --- the processes ----------------------------------------------------------------------------


@dataclass
class Env:
    exchange: Child
    broker: Child
    store_path: Path
    client: httpx.AsyncClient
    probes: list[Probe] = field(default_factory=list)  # every /healthz probe of the module
    controls: list[Probe] = field(default_factory=list)  # and of the control server
    replayed: list[str] = field(default_factory=list)  # suspects replayed, and what the replays showed
    timeline: list[tuple[float, str]] = field(default_factory=list)  # (monotonic, case in flight)

    @property
    def port(self) -> int:
        return int(self.broker.url.rsplit(":", 1)[1])

    async def call(self, method: str, body: Any, key: str | None) -> httpx.Response:
        headers = {"content-type": "application/json"}
        if key is not None:
            headers["authorization"] = f"Bearer {key}"
        return await self.client.post(f"{self.broker.url}/ramp.broker.v1.{method}", json=body,
                                      headers=headers)

    async def ok(self, method: str, body: Any, key: str | None) -> dict[str, Any]:
        r = await self.call(method, body, key)
        assert r.status_code == 200, f"{method}: {r.status_code} {r.text[:500]}"
        answer: dict[str, Any] = r.json()
        return answer

    async def exchange_counts(self) -> tuple[int, int, int]:
        r = await self.client.get(f"{self.exchange.url}/admin/state")
        assert r.status_code == 200, r.text
        s = r.json()
        return int(s["discover_calls"]), int(s["execute_calls"]), int(s["charges"])

    async def sessions(self) -> int:
        r = await self.client.get(f"{self.broker.url}/healthz")
        assert r.status_code == 200, r.text
        return int(r.json()["sessions"])


def broker_config(exchange: Child, directory: Path) -> dict[str, Any]:
    return broker_tree(
        exchange,
        session={"default_limit": usd("5.00")},
        period_budgets={
            "store": {"kind": "embedded", "path": str(directory / "budget.sqlite3")},
            "journal_path": str(directory / "journal.jsonl"),
            "memory_path": str(directory / "memory.json"),
            "accounts": {
                "acme": {"scopes": {
                    "user:alice": {"limits": [{"period": "month", **usd("100.00")}]},
                    "team:eng": {"limits": [{"period": "day", **usd("50.00")}]},
                }},
                "other": {"scopes": {"user:carol": {"limits": [{"period": "month", **usd("50.00")}]}}},
            },
        },
        agents=[
            {"id": "alice", "key_sha256": sha(ALICE), "account": "acme", "billing_ref": "alice",
             "charged_to": ["user:alice", "team:eng"], "may_name": ["project:q4"]},
            {"id": "carol", "key_sha256": sha(CAROL), "account": "other", "charged_to": ["user:carol"]},
        ],
        admin={"token_env": ADMIN_ENV},
    )


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def env(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[Env]:
    directory = tmp_path_factory.mktemp("hostile")
    environ = {ADMIN_ENV: ADMIN, "XDG_STATE_HOME": str(directory / "state")}
    async with start_exchange(directory, catalog_tree()) as exchange, \
            start_broker(directory, broker_config(exchange, directory), env=environ) as broker, \
            httpx.AsyncClient(timeout=20.0, limits=httpx.Limits(max_keepalive_connections=0)) as client:
        # A connection per request: the broker closes an HTTP/1.1 connection after an early
        # refusal without saying so, which fails the next call on it; that is tested apart, in
        # test_a_connection_stays_usable_after_an_early_refusal.
        e = Env(exchange, broker, directory / "budget.sqlite3", client)
        # Something in every budget and in the ledger before the corpus: it must not move.
        await e.ok(DECLARE, {"sessionId": SESSION, "limit": usd("5.00")}, ALICE)
        await e.ok(DECLARE, {"sessionId": TINY, "limit": usd("0.10")}, ALICE)
        await e.ok(DECLARE, {"sessionId": CAROL_SESSION, "limit": usd("5.00")}, CAROL)
        bought = await e.ok(TRANSACT, {"sessionId": SESSION, "idempotencyKey": SETUP_KEY, "uris": [A]}, ALICE)
        assert bought["totalCost"] == usd("1.00"), bought
        yield e
        if e.probes:
            slowest = max(p.seconds for p in e.probes) * 1000
            control = max((p.seconds for p in e.controls), default=0) * 1000
            print(f"\n/healthz probes: {len(e.probes)}, slowest {slowest:.1f} ms (the control server's "
                  f"slowest: {control:.1f} ms); suspects replayed: {e.replayed or 'none'}")


# --- what must not move -----------------------------------------------------------------------


def _stable(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _stable(v) for k, v in value.items() if k not in VOLATILE}
    if isinstance(value, list):
        return [_stable(v) for v in value]
    return value


def _sqlite_rows(path: Path) -> dict[str, list[tuple[Any, ...]]]:
    """Every row of every table of the embedded store, read-only."""
    with contextlib.closing(sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=5)) as db:
        tables = [t for (t,) in db.execute("SELECT name FROM sqlite_master WHERE type = 'table'")]
        return {t: sorted(db.execute(f'SELECT * FROM "{t}"').fetchall(), key=repr) for t in tables}


async def store_view(e: Env) -> dict[str, Any]:
    view: dict[str, Any] = {
        "alice": await e.ok(STATUS, {}, ALICE),
        "alice session": await e.ok(STATUS, {"sessionId": SESSION}, ALICE),
        "alice tiny": await e.ok(STATUS, {"sessionId": TINY}, ALICE),
        "carol session": await e.ok(STATUS, {"sessionId": CAROL_SESSION}, CAROL),
        "scopes": await e.ok(SCOPE_STATUS, {}, ADMIN),
        "holds": await e.ok(LIST_HOLDS, {}, ADMIN),
        "sessions": await e.sessions(),
        # execute calls and charges (discovery is checked case by case)
        "exchange": (await e.exchange_counts())[1:],
    }
    for scope in SCOPES:
        view[f"ledger {scope}"] = await e.ok(HISTORY, {"scope": scope, "limit": 1000}, ADMIN)
    view["sqlite"] = _sqlite_rows(e.store_path)
    stable: dict[str, Any] = _stable(view)
    return stable


def _diff(before: dict[str, Any], after: dict[str, Any]) -> list[str]:
    return [f"{k}: {str(before.get(k))[:400]} -> {str(after.get(k))[:400]}"
            for k in sorted(before.keys() | after.keys()) if before.get(k) != after.get(k)]


# The health probe runs in a process of its own, so that nothing the test process does (encoding
# a megabyte, reading answers) delays it. It polls the broker's /healthz on its own keep-alive
# connection and, as a control, the reference Exchange's /admin/state (the same HTTP stack, in a
# process no hostile request reaches), and reports each probe at once: its start on the
# system-wide monotonic clock (to name the case in flight) and its wall time. Bounded: it stops
# when told (a line on stdin), after PROBE_MAX probes, or after PROBE_SECONDS.
PROBE_INTERVAL, PROBE_MAX, PROBE_SECONDS = 0.01, 20_000, 120.0
PROBE_SCRIPT = r"""
import http.client, json, sys, threading, time
broker, control, interval, limit, seconds = sys.argv[1:6]
stop = threading.Event()
threading.Thread(target=lambda: (sys.stdin.readline(), stop.set()), daemon=True).start()
conns = {}
def probe(name, port, path):
    conn = conns.get(name) or http.client.HTTPConnection("127.0.0.1", int(port), timeout=2.0)
    conns[name] = conn
    started = time.monotonic()
    try:
        conn.request("GET", path)
        response = conn.getresponse()
        body = response.read()
        elapsed = time.monotonic() - started
        if response.status != 200:
            print(json.dumps(["failure", f"{name}: HTTP {response.status}: {body[:200]!r}"]), flush=True)
        else:
            print(json.dumps([name, started, elapsed]), flush=True)
    except Exception as exc:
        print(json.dumps(["failure", f"{name}: {type(exc).__name__}: {exc}"]), flush=True)
        conn.close()
        conns.pop(name, None)
print("ready", flush=True)
deadline = time.monotonic() + float(seconds)
for _ in range(int(limit)):
    if stop.is_set() or time.monotonic() > deadline:
        break
    probe("broker", broker, "/healthz")
    probe("control", control, "/admin/state")
    stop.wait(float(interval))
"""
# A probe that waited HEALTHZ_MAX_SECONDS or more names a suspect: the case in flight. On a
# loaded machine any process can wait that long for a CPU, so each suspect (at most
# MAX_SUSPECTS) is sent again REPLAYS times with the probe running: it fails the test only if
# every replay holds the broker up as long. A probe of a second or more fails it outright.
REPLAYS, MAX_SUSPECTS, HEALTHZ_HANG_SECONDS = 3, 5, 1.0


@dataclass
class Probe:
    started: float  # time.monotonic()
    seconds: float  # wall time to the answer


@dataclass
class Probed:
    broker: list[Probe] = field(default_factory=list)
    control: list[Probe] = field(default_factory=list)
    failures: list[str] = field(default_factory=list)

    def slowest(self, start: float, end: float) -> float:
        """The slowest broker probe sent between `start` and `end`."""
        return max((p.seconds for p in self.broker if start <= p.started <= end), default=0.0)


@contextlib.asynccontextmanager
async def health_probe(e: Env) -> AsyncIterator[Probed]:
    """Runs the probe process for the block; its reports arrive in the Probed as they come."""
    result = Probed()
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-c", PROBE_SCRIPT, str(e.port), e.exchange.url.rsplit(":", 1)[1],
        str(PROBE_INTERVAL), str(PROBE_MAX), str(PROBE_SECONDS),
        stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE)
    assert proc.stdin is not None
    assert proc.stdout is not None
    stdout = proc.stdout

    async def read() -> None:
        while line := await stdout.readline():
            kind, *rest = json.loads(line)
            if kind == "failure":
                result.failures.append(str(rest[0]))
            else:
                (result.broker if kind == "broker" else result.control).append(Probe(*map(float, rest)))

    reader: asyncio.Task[None] | None = None
    try:
        ready = await asyncio.wait_for(stdout.readline(), 10)
        assert ready.strip() == b"ready", ready
        reader = asyncio.create_task(read())
        yield result
        proc.stdin.write(b"stop\n")
        await proc.stdin.drain()
        await asyncio.wait_for(proc.wait(), 10)
        await asyncio.wait_for(reader, 10)
    finally:
        if reader is not None:
            reader.cancel()
        if proc.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                proc.kill()
        await asyncio.wait_for(proc.wait(), 10)


def in_flight(e: Env, at: float) -> str:
    """The case that was being sent at monotonic time `at` ("" between cases)."""
    when = [t for t, _ in e.timeline]
    i = bisect.bisect_right(when, at) - 1
    return e.timeline[i][1] if i >= 0 else ""


# --- checking one answer ----------------------------------------------------------------------


def clean(message: str) -> str | None:
    """What is wrong with a refusal's message, or None."""
    if len(message) > MAX_MESSAGE:
        return f"{len(message)} characters: {message[:200]!r}..."
    leak = LEAKS.search(message)
    if leak is not None:
        return f"{leak.group(0)!r} in {message[:300]!r}"
    return None


@dataclass
class Checker:
    """Runs cases one after another, checking each answer and what it left behind.

    After every `every` cases (1: each case) the Exchange's counters and the broker's session
    count are read: no execute call, no charge, no new session, and no more discovery calls
    than the cases that may legitimately ask for quotes (one each)."""

    e: Env
    every: int = 1
    failures: list[str] = field(default_factory=list)
    count: int = 0
    _last: tuple[tuple[int, int, int], int] | None = None
    _pending: list[tuple[str, bool]] = field(default_factory=list)
    resends: dict[str, Resend] = field(default_factory=dict)

    async def start(self) -> None:
        self._last = (await self.e.exchange_counts(), await self.e.sessions())

    def sending(self, where: str, resend: Resend) -> None:
        """`where` is being sent now; `resend` sends it again (a suspect's replay)."""
        self.resends[where] = resend
        self.e.timeline.append((time.monotonic(), where))

    async def after(self, where: str, discovers: bool) -> None:
        self.e.timeline.append((time.monotonic(), ""))
        self.count += 1
        self._pending.append((where, discovers))
        if len(self._pending) >= self.every:
            await self.flush()

    async def flush(self) -> None:
        """Nothing the pending cases did reached the Exchange (beyond discovery where allowed)
        or created a session."""
        if not self._pending:
            return
        assert self._last is not None
        (d0, x0, c0), s0 = self._last
        (d1, x1, c1), s1 = counts = (await self.e.exchange_counts(), await self.e.sessions())
        self._last = counts
        cases, self._pending = self._pending, []
        where = cases[0][0] if len(cases) == 1 else f"one of {[w for w, _ in cases]}"
        if (x1, c1) != (x0, c0):
            self.failures.append(f"{where}: reached the Exchange: execute_calls {x0}->{x1}, "
                                 f"charges {c0}->{c1}")
        if d1 - d0 > sum(discovers for _, discovers in cases):
            self.failures.append(f"{where}: asked the Exchange for quotes ({d0}->{d1}) before refusing")
        if s1 != s0:
            self.failures.append(f"{where}: sessions {s0}->{s1}")

    def connect(self, where: str, code: str, r: httpx.Response, http_status: int | None = None) -> None:
        """A Connect error body with `code`, under its HTTP status (or `http_status`)."""
        expected = CONNECT_HTTP[code] if http_status is None else http_status
        try:
            body = r.json()
        except ValueError:
            self.failures.append(f"{where}: HTTP {r.status_code}, not a Connect error: {r.text[:200]!r}")
            return
        got = body.get("code") if isinstance(body, dict) else None
        if got != code or r.status_code != expected:
            message = str(body.get("message", "")) if isinstance(body, dict) else ""
            self.failures.append(f"{where}: expected {code} (HTTP {expected}), got {got} "
                                 f"(HTTP {r.status_code}): {message[:300]!r}")
            return
        problem = clean(str(body.get("message", "")))
        if problem:
            self.failures.append(f"{where}: {problem}")

    def grpc(self, where: str, code: str, http_status: int, status: int | None, message: str) -> None:
        if http_status != 200 or status != GRPC_CODES[code]:
            self.failures.append(f"{where}: expected gRPC {GRPC_CODES[code]} ({code}), got HTTP "
                                 f"{http_status} grpc-status {status}: {message[:300]!r}")
            return
        problem = clean(message)
        if problem:
            self.failures.append(f"{where}: {problem}")


@contextlib.asynccontextmanager
async def corpus(e: Env, what: str, every: int = 1) -> AsyncIterator[Checker]:
    """Runs a corpus: the block sends cases through the Checker it gets. On the way out, besides
    every case's own failures: the store, the sessions and the Exchange's purchases are the same
    as before; every /healthz probe was answered, none held up 100 ms or more by a case (as its
    replays confirm) nor a second in all; the broker logged no traceback and no internal error."""
    check = Checker(e, every)
    before = await store_view(e)
    logged = len(e.broker.stderr)
    e.timeline.clear()
    async with health_probe(e) as probed:
        await check.start()
        yield check
        await check.flush()
        await asyncio.sleep(0.05)  # the last probes report
        problems = await _replay_suspects(e, check, probed)
    problems = check.failures + problems
    problems += [f"state changed: {d}" for d in _diff(before, await store_view(e))]
    problems += [f"/healthz probe failed: {f}" for f in probed.failures[:5]]
    e.probes.extend(probed.broker)
    e.controls.extend(probed.control)
    if not probed.broker:
        problems.append("no /healthz probe was answered")
    elif (hang := max(probed.broker, key=lambda p: p.seconds)).seconds >= HEALTHZ_HANG_SECONDS:
        problems.append(f"/healthz took {hang.seconds * 1000:.0f} ms during {in_flight(e, hang.started)!r}")
    log = e.broker.stderr[logged:]
    for bad in ("Traceback", "internal error"):
        if bad in log:
            problems.append(f"the broker logged: {log[log.index(bad):][:1500]}")
    assert check.count, f"{what}: no case ran"
    assert not problems, f"{what}: {len(check.failures)} of {check.count} cases failed; " \
        f"{len(problems)} problems:\n" + "\n".join(problems)


async def _replay_suspects(e: Env, check: Checker, probed: Probed) -> list[str]:
    """Sends each suspect again REPLAYS times; a problem for each that held the broker up every time."""
    slow = sorted((p for p in probed.broker if p.seconds >= HEALTHZ_MAX_SECONDS), key=lambda p: -p.seconds)
    suspects = list(dict.fromkeys(w for p in slow if (w := in_flight(e, p.started)) in check.resends))
    problems: list[str] = []
    for where in suspects[:MAX_SUSPECTS]:
        first = max(p.seconds for p in slow if in_flight(e, p.started) == where)
        windows: list[tuple[float, float]] = []
        for i in range(REPLAYS):
            started = time.monotonic()
            e.timeline.append((started, f"replay {i + 1} of {where}"))
            with contextlib.suppress(Exception):  # only its effect on /healthz matters here
                await check.resends[where]()
            await asyncio.sleep(0.03)  # a probe sent during the replay reports
            windows.append((started, time.monotonic()))
            e.timeline.append((time.monotonic(), ""))
        again = [probed.slowest(start, end) for start, end in windows]
        shown = ", ".join(f"{t * 1000:.0f}" for t in again)
        e.replayed.append(f"{where}: {first * 1000:.0f} ms, replays {shown} ms")
        if min(again) >= HEALTHZ_MAX_SECONDS:
            problems.append(f"/healthz took {first * 1000:.0f} ms during {where!r}, and {shown} ms in each "
                            "of its replays")
    return problems


def grpc_headers(case: Case, web: bool) -> list[tuple[str, str]]:
    if web:
        return [("content-type", "application/grpc-web+proto"), ("x-grpc-web", "1"), *case.all_headers()]
    return [("content-type", "application/grpc+proto"), ("te", "trailers"), *case.all_headers()]


def web_status(response: httpx.Response) -> tuple[int | None, str]:
    """gRPC-Web status: in the headers (trailers-only) or in the body's trailer frame."""
    if "grpc-status" in response.headers:
        return int(response.headers["grpc-status"]), unquote(response.headers.get("grpc-message", ""))
    body, trailers = response.content, {}
    while len(body) >= 5:
        flags, size = struct.unpack(">BI", body[:5])
        if flags & 0x80:
            for line in body[5:5 + size].decode("utf-8", "replace").split("\r\n"):
                key, _, value = line.partition(":")
                trailers[key.strip().lower()] = value.strip()
        body = body[5 + size:]
    status = trailers.get("grpc-status")
    return (int(status) if status is not None else None), unquote(trailers.get("grpc-message", ""))


def h2_status(answer: Stream) -> tuple[int, int | None, str]:
    status = int(dict(answer.headers).get(":status", "0")) if answer.headers else 0
    return status, answer.grpc_status, answer.grpc_message


async def h2_send(conn: H2Client, path: str, headers: Sequence[tuple[str, str]], body: bytes,
                  verb: str = "POST") -> Stream:
    """One request on an HTTP/2 connection; the broker may refuse (and reset the stream) before
    it has read the whole body."""
    stream_id = await conn.start(path, list(headers), verb)
    with contextlib.suppress(StreamClosedError, H2ProtocolError, TimeoutError, OSError):
        await conn.send(stream_id, body)
    return await conn.response(stream_id)


async def h2_once(port: int, path: str, headers: Sequence[tuple[str, str]], body: bytes,
                  verb: str = "POST") -> Stream:
    """The same on a connection of its own (a replay)."""
    async with H2Client.connect("127.0.0.1", port, patience=20) as conn:
        return await h2_send(conn, path, headers, body, verb)


async def grpcio_once(port: int, path: str, data: bytes, metadata: Sequence[tuple[str, str]]) -> None:
    """One call with a real gRPC client on a channel of its own (a replay)."""
    async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
        call = channel.unary_unary(path, request_serializer=None, response_deserializer=None)
        with contextlib.suppress(grpc.aio.AioRpcError):
            await call(data, metadata=tuple(metadata), timeout=20)


# --- the corpus, per protocol -----------------------------------------------------------------

# Connect JSON checks the Exchange and the sessions after every case; the binary protocols
# (the same handlers, after decoding) after every BATCH cases, to keep the module quick.
BATCH = 25


async def test_connect_json(env: Env) -> None:
    requests = [(c, c.json_bytes()) for c in CORPUS]  # encoded before the probe starts
    async with corpus(env, "Connect JSON") as check:
        for case, data in requests:
            where = f"Connect JSON {case.name}"
            headers = {"content-type": "application/json", **dict(case.all_headers())}
            send = functools.partial(env.client.post, f"{env.broker.url}/ramp.broker.v1.{case.method}",
                                     content=data, headers=headers)
            check.sending(where, send)
            r = await send()
            check.connect(where, case.code, r)
            await check.after(where, case.discovers)


async def test_connect_protobuf(env: Env) -> None:
    async with corpus(env, "Connect protobuf", every=BATCH) as check:
        for case, data in BINARY:
            where = f"Connect protobuf {case.name}"
            headers = {"content-type": "application/proto", **dict(case.all_headers())}
            send = functools.partial(env.client.post, f"{env.broker.url}/ramp.broker.v1.{case.method}",
                                     content=data, headers=headers)
            check.sending(where, send)
            r = await send()
            check.connect(where, case.code, r)
            await check.after(where, case.discovers)


async def test_grpc(env: Env) -> None:
    """Raw HTTP/2, every case on one connection: a refusal must not disturb the next call."""
    requests = [(c, grpc_headers(c, web=False), envelope(data)) for c, data in BINARY]
    async with corpus(env, "gRPC", every=BATCH) as check, \
            H2Client.connect("127.0.0.1", env.port, patience=20) as h2:
        for case, headers, body in requests:
            where, path = f"gRPC {case.name}", f"/ramp.broker.v1.{case.method}"
            check.sending(where, functools.partial(h2_once, env.port, path, headers, body))
            answer = await h2_send(h2, path, headers, body)
            check.grpc(where, case.code, *h2_status(answer))
            await check.after(where, case.discovers)


async def test_grpc_web(env: Env) -> None:
    requests = [(c, dict(grpc_headers(c, web=True)), envelope(data)) for c, data in BINARY]
    async with corpus(env, "gRPC-Web", every=BATCH) as check:
        for case, headers, body in requests:
            where = f"gRPC-Web {case.name}"
            send = functools.partial(env.client.post, f"{env.broker.url}/ramp.broker.v1.{case.method}",
                                     content=body, headers=headers)
            check.sending(where, send)
            r = await send()
            status, message = web_status(r)
            check.grpc(where, case.code, r.status_code, status, message)
            await check.after(where, case.discovers)


async def test_grpcio(env: Env) -> None:
    """A real gRPC client, raw bytes as the request message; plus an unknown method and service."""
    chosen = [(c, data) for c, data in BINARY if c.name in GRPCIO_NAMES]
    async with corpus(env, "grpcio") as check, grpc.aio.insecure_channel(f"127.0.0.1:{env.port}") as channel:
        calls: list[tuple[str, str, bytes, Sequence[tuple[str, str]], str, bool]] = [
            (c.name, f"/ramp.broker.v1.{c.method}", data, c.all_headers(), c.code, c.discovers)
            for c, data in chosen]
        calls += [
            ("unknown method", "/ramp.broker.v1.BrokerService/Buy", b"", [AUTH], UNIMPLEMENTED, False),
            ("unknown service", "/ramp.broker.v1.ShopService/Buy", b"", [AUTH], UNIMPLEMENTED, False),
        ]
        for name, path, data, metadata, code, discovers in calls:
            where = f"grpcio {name}"
            check.sending(where, functools.partial(grpcio_once, env.port, path, data, metadata))
            call = channel.unary_unary(path, request_serializer=None, response_deserializer=None)
            try:
                await call(data, metadata=tuple(metadata), timeout=20)
            except grpc.aio.AioRpcError as err:
                number = err.code().value[0]
                if number != GRPC_CODES[code]:
                    check.failures.append(f"{where}: expected {code}, got {err.code()}: {err.details()!r}")
                elif problem := clean(err.details() or ""):
                    check.failures.append(f"{where}: {problem}")
            else:
                check.failures.append(f"{where}: succeeded")
            await check.after(where, discovers)


# --- protocol abuse ---------------------------------------------------------------------------


@dataclass(frozen=True)
class Raw:
    """A request as bytes on the wire, over HTTP/1.1 (httpx) or cleartext HTTP/2 (`kind` "grpc").

    `kind` says how the answer reads: "connect" (a Connect JSON error body, or no body),
    "web" (gRPC-Web: status in headers or a trailer frame), "grpc" (HTTP/2 trailers), or
    "grpc-h1" (gRPC refused on HTTP/1.1: a Connect body and grpc-status headers both).
    `status` is the HTTP status it must get; `code` its Connect code or gRPC status (None:
    the HTTP status alone says it, as for a 404 or 415 without a Connect body)."""

    name: str
    kind: str
    path: str
    headers: tuple[tuple[str, str], ...]
    body: bytes
    status: int
    code: str | None
    verb: str = "POST"


JSON_CT, PROTO_CT = ("content-type", "application/json"), ("content-type", "application/proto")
GRPC_CT, WEB_CT = ("content-type", "application/grpc+proto"), ("content-type", "application/grpc-web+proto")
TE = ("te", "trailers")
# A request alice's key could buy with: every raw case below must still refuse it.
VALID_BUY = bpb.TransactRequest(session_id=SESSION, idempotency_key="raw-k", uris=[A]).SerializeToString()
OVER_LIMIT_PROTO = b"\x0a\x80\x80\x40" + b"a" * MiB  # session_id of 1 MiB: 1 MiB + 4 bytes
BOMB = gzip.compress(bytes(4 * MiB), compresslevel=9)  # inflates past the 1 MiB limit


def _connect_raws() -> list[Raw]:
    def c(name: str, headers: tuple[tuple[str, str], ...], body: bytes, status: int, code: str | None,
          path: str = TRANSACT_PATH, verb: str = "POST") -> Raw:
        return Raw(name, "connect", path, headers, body, status, code, verb)

    return [
        c("wrong content type", (("content-type", "text/plain"), AUTH), b"{}", 415, None),
        c("XML content type", (("content-type", "application/xml"), AUTH), b"<a/>", 415, None),
        c("no content type", (AUTH,), b"{}", 415, None),
        c("streaming content type on a unary RPC", (("content-type", "application/connect+json"), AUTH),
          b"{}", 415, None),
        c("GET on a POST-only RPC", (AUTH,), b"", 405, None,
          TRANSACT_PATH + "?encoding=json&message=%7B%7D", "GET"),
        c("PUT", (JSON_CT, AUTH), b"{}", 405, None, verb="PUT"),
        c("DELETE", (JSON_CT, AUTH), b"", 405, None, verb="DELETE"),
        c("unknown method of a known service", (JSON_CT, AUTH), b"{}", 404, None,
          "/ramp.broker.v1.BrokerService/Buy"),
        c("extra path segment", (JSON_CT, AUTH), b"{}", 404, None, TRANSACT_PATH + "/more"),
        c("unknown service", (JSON_CT, AUTH), b"{}", 404, None, "/ramp.broker.v1.ShopService/Buy"),
        c("unknown package", (JSON_CT, AUTH), b"{}", 404, None, "/evil.v1.BrokerService/Transact"),
        c("Connect protocol version 2", (JSON_CT, AUTH, ("connect-protocol-version", "2")), b"{}",
          400, INVALID),
        c("negative Connect timeout", (JSON_CT, AUTH, ("connect-timeout-ms", "-5")), b"{}", 400, INVALID),
        c("gzip garbage", (JSON_CT, AUTH, ("content-encoding", "gzip")), b"this is not gzip", 400, INVALID),
        c("gzip bomb", (JSON_CT, AUTH, ("content-encoding", "gzip")), BOMB, 429, EXHAUSTED),
        # Connect maps UNIMPLEMENTED to HTTP 501 itself.
        c("unknown compression", (JSON_CT, AUTH, ("content-encoding", "br")), b"{}", 501, UNIMPLEMENTED),
        c("JSON body over 1 MiB", (JSON_CT, AUTH), b'{"sessionId": "' + b"a" * MiB + b'"}', 429, EXHAUSTED),
        c("protobuf body over 1 MiB", (PROTO_CT, AUTH), OVER_LIMIT_PROTO, 429, EXHAUSTED),
        c("truncated protobuf", (PROTO_CT, AUTH), VALID_BUY[:-3], 400, INVALID),
        c("protobuf sent as JSON", (JSON_CT, AUTH), VALID_BUY, 400, INVALID),
        c("JSON sent as protobuf", (PROTO_CT, AUTH),
          json.dumps({"sessionId": SESSION, "idempotencyKey": "raw-k", "uris": [A]}).encode(), 400, INVALID),
        c("a valid purchase with a wrong key", (PROTO_CT, WRONG), VALID_BUY, 401, UNAUTHENTICATED),
    ]


def _web_raws() -> list[Raw]:
    def w(name: str, body: bytes, code: str, extra: tuple[tuple[str, str], ...] = (),
          auth: tuple[str, str] = AUTH) -> Raw:
        return Raw(f"gRPC-Web {name}", "web", TRANSACT_PATH, (WEB_CT, auth, *extra), body, 200, code)

    return [
        w("truncated envelope", b"\x00\x00\x00", INVALID),
        w("envelope promising more", b"\x00\x00\x00\x10\x00" + VALID_BUY[:8], INVALID),
        w("unknown flag", envelope(VALID_BUY, 0x02), INVALID),
        w("trailer flag on the request", envelope(VALID_BUY, 0x80), INVALID),
        w("trailing bytes", envelope(VALID_BUY) + b"\x00", INVALID),
        w("gzip garbage", envelope(b"not gzip", 0x01), INVALID, (("grpc-encoding", "gzip"),)),
        w("gzip bomb", envelope(BOMB, 0x01), EXHAUSTED, (("grpc-encoding", "gzip"),)),
        w("announced length over the limit", b"\x00\xff\xff\xff\xff" + b"x" * 1000, EXHAUSTED),
        w("message over 1 MiB", envelope(OVER_LIMIT_PROTO), EXHAUSTED),
        w("bad timeout", envelope(VALID_BUY), INVALID, (("grpc-timeout", "xyz"),)),
        w("with a wrong key and a broken envelope", b"\x00\x00", UNAUTHENTICATED, auth=WRONG),
        # The documented exception: INTERNAL, a fixed and clean message.
        w("compressed flag without an encoding", envelope(VALID_BUY, 0x01), INTERNAL),
        # gRPC proper needs HTTP/2: UNIMPLEMENTED, with HTTP 505 (rpc_server/serving.py).
        Raw("gRPC over HTTP/1.1", "grpc-h1", TRANSACT_PATH, (GRPC_CT, AUTH), envelope(VALID_BUY), 505,
            UNIMPLEMENTED),
    ]


def _grpc_raws() -> list[Raw]:
    def g(name: str, body: bytes, code: str | None, extra: tuple[tuple[str, str], ...] = (),
          auth: tuple[str, str] = AUTH, path: str = TRANSACT_PATH, ct: tuple[str, str] = GRPC_CT,
          status: int = 200) -> Raw:
        return Raw(f"gRPC {name}", "grpc", path, (ct, TE, auth, *extra), body, status, code)

    return [
        # No such method or service: a plain 404 (connectrpc's answer, and the Router's), which
        # gRPC clients read as UNIMPLEMENTED (test_grpcio).
        g("unknown method", envelope(b""), None, path="/ramp.broker.v1.BrokerService/Buy", status=404),
        g("unknown service", envelope(b""), None, path="/ramp.broker.v1.ShopService/Buy", status=404),
        g("gzip garbage", envelope(b"not gzip at all", 0x01), INVALID, (("grpc-encoding", "gzip"),)),
        g("gzip bomb", envelope(BOMB, 0x01), EXHAUSTED, (("grpc-encoding", "gzip"),)),
        g("unknown compression", envelope(VALID_BUY, 0x01), UNIMPLEMENTED, (("grpc-encoding", "br"),)),
        g("message over 1 MiB", envelope(OVER_LIMIT_PROTO), EXHAUSTED),
        g("announced length over the limit", b"\x00\xff\xff\xff\xff" + b"x" * 1000, EXHAUSTED),
        g("truncated protobuf", envelope(VALID_BUY[:-3]), INVALID),
        g("truncated envelope", b"\x00\x00\x00", INVALID),
        g("envelope promising more", b"\x00\x00\x00\x10\x00ab", INVALID),
        g("no message", b"", UNIMPLEMENTED),
        g("two messages", envelope(VALID_BUY) * 2, UNIMPLEMENTED),
        g("JSON codec with protobuf bytes", envelope(VALID_BUY), INVALID,
          ct=("content-type", "application/grpc+json")),
        g("bad timeout", envelope(VALID_BUY), INVALID, (("grpc-timeout", "99999999999S"),)),
        # The documented exception (as grpc-go): INTERNAL "protocol error: sent compressed
        # message without compression support".
        g("compressed flag without an encoding", envelope(VALID_BUY, 0x01), INTERNAL),
        g("a valid purchase with a wrong key", envelope(VALID_BUY), UNAUTHENTICATED, auth=WRONG),
        g("a valid purchase with the key as Basic", envelope(VALID_BUY), UNAUTHENTICATED,
          auth=("authorization", f"Basic {ALICE}")),
        g("a wrong key and a message over 1 MiB", envelope(OVER_LIMIT_PROTO), UNAUTHENTICATED, auth=WRONG),
        g("admin RPC with an agent key", envelope(bpb.SetPeriodLimitRequest(
            scope="user:alice", period="month", clear=True).SerializeToString()), UNAUTHENTICATED,
          path="/ramp.broker.v1.BudgetAdminService/SetPeriodLimit"),
    ]


RAWS = [*_connect_raws(), *_web_raws(), *_grpc_raws()]


async def test_protocol_abuse(env: Env) -> None:
    async with corpus(env, "protocol abuse") as check, \
            H2Client.connect("127.0.0.1", env.port, patience=20) as h2:
        for raw in RAWS:
            where = f"{raw.kind} {raw.name}"
            if raw.kind == "grpc":
                check.sending(where, functools.partial(h2_once, env.port, raw.path, raw.headers, raw.body,
                                                       raw.verb))
                answer = await h2_send(h2, raw.path, raw.headers, raw.body, raw.verb)
                status, grpc_status, message = h2_status(answer)
                text = bytes(answer.body).decode("utf-8", "replace")
            else:
                send = functools.partial(env.client.request, raw.verb, f"{env.broker.url}{raw.path}",
                                         content=raw.body, headers=dict(raw.headers))
                check.sending(where, send)
                r = await send()
                status, text = r.status_code, r.text
                grpc_status, message = web_status(r)
            if status != raw.status:
                check.failures.append(f"{where}: HTTP {status}, expected {raw.status}: {text[:200]!r}")
            elif raw.code is None:
                if problem := clean(text):
                    check.failures.append(f"{where}: {problem}")
            elif raw.kind in ("grpc", "web"):
                check.grpc(where, raw.code, 200, grpc_status, message)
            else:
                check.connect(where, raw.code, r, raw.status)
                if raw.kind == "grpc-h1":
                    check.grpc(where, raw.code, 200, grpc_status, message)
            await check.after(where, False)


# --- sessions belong to their caller ----------------------------------------------------------


async def test_redeclaring_another_agents_session_creates_the_callers_own(env: Env) -> None:
    """Allowed, not refused: carol's "alice-s" is carol's, and alice's is untouched."""
    alice_before = _stable(await env.ok(STATUS, {"sessionId": SESSION}, ALICE))
    sessions = await env.sessions()
    counts = await env.exchange_counts()
    declared = await env.ok(DECLARE, {"sessionId": SESSION, "limit": usd("700.00")}, CAROL)
    assert declared["budget"]["limit"] == usd("700.00")
    assert declared["budget"]["spent"]["amount"] in ("0", "0.00")
    assert await env.sessions() == sessions + 1
    assert _stable(await env.ok(STATUS, {"sessionId": SESSION}, ALICE)) == alice_before
    (mine,) = [b for b in (await env.ok(STATUS, {"sessionId": SESSION}, CAROL))["budgets"]
               if b["layer"] == "BUDGET_LAYER_SESSION"]
    assert mine["limit"] == usd("700.00")
    assert await env.exchange_counts() == counts


# --- found by this corpus ---------------------------------------------------------------------


DENIED_ON_A_NEW_SESSION: list[tuple[str, dict[str, Any], str]] = [
    ("maxPrice below every offer", {"constraints": {"maxPrice": usd("0.50")}}, EXHAUSTED),
    ("periodBudget below the cost",
     {"constraints": {"periodBudget": usd("0.10"), "budgetPeriod": "2592000s"}}, EXHAUSTED),
    ("maxPrice in a currency without rates",
     {"constraints": {"maxPrice": {"amount": "0.50", "currency": "EUR"}}}, PRECONDITION),
    ("a URI nobody offers", {"uris": ["https://x.test/zzz"]}, NOT_FOUND),
]


async def test_a_denied_transact_on_a_new_session_id_creates_no_session(env: Env) -> None:
    """A refused request creates no session (README: "A session is created only by a request
    that passed every check"), however far it got: otherwise every denied request with a new
    session id leaves a default-limit session in the broker's memory, at no cost to the caller."""
    async with corpus(env, "denied on a new session") as check:
        for i, (name, fields, code) in enumerate(DENIED_ON_A_NEW_SESSION):
            where = f"Transact on a new session, {name}"
            body = {"sessionId": f"never-declared-{i}", "idempotencyKey": f"denied-{i}", "uris": [A],
                    **fields}
            send = functools.partial(env.call, TRANSACT, body, ALICE)
            check.sending(where, send)
            r = await send()
            check.connect(where, code, r)
            await check.after(where, True)


LONG = "v" * 4000
JSON_AUTH = {"content-type": "application/json", "authorization": f"Bearer {ALICE}"}


@dataclass(frozen=True)
class Plain:
    """A request whose answer must be a short, clean refusal: `code` a Connect code (its JSON
    body), "grpc:<code>" a gRPC-Web status, or None for any 4xx without a Connect body."""

    name: str
    path: str
    headers: dict[str, str]
    body: bytes
    code: str | None


METADATA = [
    Plain("huge connect-timeout-ms", TRANSACT_PATH, {**JSON_AUTH, "connect-timeout-ms": "9" * 4000}, b"{}",
          INVALID),
    Plain("huge connect-protocol-version", TRANSACT_PATH, {**JSON_AUTH, "connect-protocol-version": LONG},
          b"{}", INVALID),
    # Over-long protocol headers are refused as bad input before connectrpc reads them.
    Plain("huge content-encoding", TRANSACT_PATH, {**JSON_AUTH, "content-encoding": LONG}, b"{}",
          INVALID),
    Plain("huge grpc-encoding (gRPC-Web)", TRANSACT_PATH,
          {**JSON_AUTH, "content-type": "application/grpc-web+proto", "grpc-encoding": LONG}, envelope(b""),
          f"grpc:{INVALID}"),
    Plain("3000-character unknown path", "/" + "x" * 3000, {"content-type": "application/json"}, b"{}", None),
    Plain("POST /healthz with invalid UTF-8", "/healthz", {}, b"\xff\xfe{", None),
    Plain("POST /healthz with 100k nested arrays", "/healthz", {}, b"[" * 100_000, None),
    Plain("POST /healthz with a 5000-digit number", "/healthz", {}, b"1" * 5000, None),
]


async def test_request_metadata_is_never_echoed_at_length_nor_leaks_internals(env: Env) -> None:
    """Headers and paths are caller input too: an answer quotes at most a little of them. The
    plain JSON routes (POST /healthz) refuse a bad body with a clean 4xx, never a 500."""
    async with corpus(env, "request metadata") as check:
        for plain in METADATA:
            send = functools.partial(env.client.post, f"{env.broker.url}{plain.path}", headers=plain.headers,
                                     content=plain.body)
            check.sending(plain.name, send)
            r = await send()
            if plain.code is None:
                if not 400 <= r.status_code < 500:
                    check.failures.append(f"{plain.name}: HTTP {r.status_code} {r.text[:200]!r}")
                elif problem := clean(r.text):
                    check.failures.append(f"{plain.name}: HTTP {r.status_code}, {problem}")
            elif plain.code.startswith("grpc:"):
                check.grpc(plain.name, plain.code[5:], r.status_code, *web_status(r))
            else:
                check.connect(plain.name, plain.code, r)
            await check.after(plain.name, False)


EARLY_REFUSALS = [
    ("a wrong key", TRANSACT_PATH, "application/json", "wrong-key"),
    ("a wrong admin token", "/ramp.broker.v1.BudgetAdminService/GetScopeStatus", "application/json", "wrong"),
    ("a wrong content type", TRANSACT_PATH, "text/plain", ALICE),
    ("an unknown method", "/ramp.broker.v1.BrokerService/Buy", "application/json", ALICE),
]


async def test_a_connection_stays_usable_after_an_early_refusal(env: Env) -> None:
    """The broker refuses some requests from their headers alone, before it reads the body (a
    wrong key, a wrong content type, an unknown method). An HTTP/1.1 client whose body arrives a
    moment later (any client streaming a body, or a busy one) must still be able to use its
    keep-alive connection for the next call, or be told `connection: close` with the refusal."""
    body = json.dumps({"sessionId": "keepalive", "idempotencyKey": "k", "uris": ["not a uri"]}).encode()
    failures: list[str] = []
    for name, path, content_type, key in EARLY_REFUSALS:
        head = (f"POST {path} HTTP/1.1\r\nhost: 127.0.0.1\r\ncontent-type: {content_type}\r\n"
                f"authorization: Bearer {key}\r\ncontent-length: {len(body)}\r\n\r\n").encode()
        reader, writer = await asyncio.wait_for(asyncio.open_connection("127.0.0.1", env.port), 5)
        try:
            writer.write(head)
            await writer.drain()
            refusal = await asyncio.wait_for(_http1_response(reader), 5)  # answered from the headers
            status = refusal.split(b"\r\n", 1)[0].decode().strip()
            if b"\r\nconnection: close" in refusal.lower():
                continue  # the client was told
            try:
                writer.write(body)  # the body, a moment later
                writer.write(b"GET /healthz HTTP/1.1\r\nhost: 127.0.0.1\r\n\r\n")
                await writer.drain()
                following = await asyncio.wait_for(_http1_response(reader), 5)
            except (OSError, TimeoutError, asyncio.IncompleteReadError) as exc:
                failures.append(f"after {name} ({status}, without connection: close) the broker closed the "
                                f"connection: the next request on it got {type(exc).__name__}")
                continue
            if not following.startswith(b"HTTP/1.1 200"):
                failures.append(f"after {name} ({status}), the next request got {following[:100]!r}")
        finally:
            writer.close()
            with contextlib.suppress(OSError):
                await asyncio.wait_for(writer.wait_closed(), 5)
    # The same with a large body, as httpx sends it on a keep-alive connection.
    big = b'{"sessionId": "' + b"a" * (MiB - 64) + b'"}'
    async with httpx.AsyncClient(timeout=10.0, limits=httpx.Limits(max_connections=1)) as client:
        for name, data in (("a wrong key and a 1 MiB body", big), ("the next request", b"{}")):
            try:
                r = await client.post(f"{env.broker.url}{TRANSACT_PATH}", content=data,
                                      headers={"content-type": "application/json",
                                               "authorization": "Bearer wrong-key"})
            except httpx.TransportError as exc:
                failures.append(f"httpx, {name}: {type(exc).__name__}: {exc}".rstrip(": "))
                continue
            if r.status_code != 401:
                failures.append(f"httpx, {name}: HTTP {r.status_code}")
    assert not failures, "\n".join(failures)


async def _http1_response(reader: asyncio.StreamReader) -> bytes:
    """One HTTP/1.1 response (headers, and a content-length or chunked body) as bytes."""
    head = await reader.readuntil(b"\r\n\r\n")
    lines = head.decode("latin-1").lower().split("\r\n")
    length = next((int(line.split(":", 1)[1]) for line in lines if line.startswith("content-length:")), None)
    if length is not None:
        return head + await reader.readexactly(length)
    body = b""
    if any(line.startswith("transfer-encoding:") and "chunked" in line for line in lines):
        for _ in range(10_000):  # bounded: the answers here are a few chunks at most
            size = int((await reader.readuntil(b"\r\n")).strip(), 16)
            chunk = await reader.readexactly(size + 2)
            if size == 0:
                break
            body += chunk[:-2]
    return head + body
