"""Configuration that would start a broker that quietly misbehaves is refused at start.

Currencies one cannot spend, repeated YAML keys, agents sharing a key or the anonymous
identity, a taken listen address, and a reservation TTL shorter than a purchase can take.
"""

from __future__ import annotations

import hashlib
import socket
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pycountry
import pytest
from pydantic import BaseModel

from broker.config import (
    ENV_PREFIX,
    EXECUTE_GUARD_MS,
    BrokerConfig,
    min_reservation_ttl_seconds,
)
from common.configfile import ConfigError, load
from currency import money
from currency.money import MoneyError, is_currency, parse_currency, set_extra_currencies
from exchange_client.ramp import _GUARD_S
from reference_exchange.catalog import ENV_PREFIX as CATALOG_PREFIX
from reference_exchange.catalog import Catalog
from tests.harness import free_port
from tests.processes import broker_tree, run_cli, write_yaml

ROOT = Path(__file__).resolve().parent.parent
EXAMPLE_BROKER = ROOT / "examples" / "broker.yaml"
EXAMPLE_CATALOG = ROOT / "examples" / "catalog.yaml"

NOT_SPENDABLE = [
    "XXX", "XTS",  # no currency; testing
    "XAU", "XAG", "XPT", "XPD",  # precious metals
    "XBA", "XBB", "XBC", "XBD", "XDR", "XSU", "XUA", "XAD",  # units of account
    "CLF", "COU", "MXV", "UYI", "UYW", "BOV", "USN", "CHE", "CHW",  # fund codes
]
REAL_X = [c for c in ("XAF", "XOF", "XPF", "XCD", "XCG") if pycountry.currencies.get(alpha_3=c)]


@pytest.fixture(autouse=True)
def _no_extra_currencies() -> Iterator[None]:
    """extra_currencies is process-wide: every test starts and ends without any."""
    set_extra_currencies(())
    yield
    set_extra_currencies(())


def sha(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


def load_text(tmp_path: Path, text: str, model: type[Any] = BrokerConfig) -> Any:
    """Load YAML `text` as the broker's (or another model's) file, ignoring the environment."""
    path = tmp_path / "config.yaml"
    path.write_text(text, encoding="utf-8")
    return load(model, path, ENV_PREFIX, environ={})


def validate(tree: dict[str, Any]) -> BrokerConfig:
    return BrokerConfig.model_validate(tree)


def refused(tree: dict[str, Any], tmp_path: Path) -> str:
    """The ConfigError message for `tree`, loaded the way `serve --config` loads it."""
    path = write_yaml(tmp_path / "broker.yaml", tree)
    with pytest.raises(ConfigError) as info:
        load(BrokerConfig, path, ENV_PREFIX, environ={})
    return str(info.value)


def scoped(**overrides: Any) -> dict[str, Any]:
    """A config with one period scope, so reservations are made."""
    tree: dict[str, Any] = {
        "period_budgets": {"accounts": {"acme": {"scopes": {"team:a": {"limits": [
            {"period": "day", "amount": "5.00", "currency": "USD"}]}}}}},
    }
    tree.update(overrides)
    return tree


# --- 1: currencies ------------------------------------------------------------------------------


@pytest.mark.parametrize("code", NOT_SPENDABLE)
def test_non_spendable_iso_codes_are_refused(code: str) -> None:
    assert pycountry.currencies.get(alpha_3=code) is not None, code  # ISO knows it...
    assert not is_currency(code)  # ...but it is not money one can spend
    with pytest.raises(MoneyError) as info:
        parse_currency(code, "limit.currency")
    assert info.value.field == "limit.currency"
    assert "is not a spendable currency" in str(info.value)
    assert str(info.value).startswith(f"limit.currency: '{code}' (")


@pytest.mark.parametrize("code", [*REAL_X, "USD", "EUR", "JPY", "ZWG", "VES"])
def test_real_currencies_are_accepted(code: str) -> None:
    assert parse_currency(code, "c") == code


def test_spendable_codes_are_iso_minus_the_non_spendable_ones() -> None:
    iso = {c.alpha_3 for c in pycountry.currencies}
    spendable = {c for c in iso if is_currency(c)}
    refused_x = {c for c in iso if c.startswith("X")} - set(REAL_X)
    assert spendable == iso - set(NOT_SPENDABLE) - refused_x
    assert refused_x <= set(NOT_SPENDABLE), refused_x - set(NOT_SPENDABLE)


def test_unknown_codes_keep_their_message() -> None:
    with pytest.raises(MoneyError, match="'XYZ' is not an ISO 4217 currency code"):
        parse_currency("XYZ", "c")


def test_extra_currencies_are_allowed_process_wide_and_revocable() -> None:
    assert not is_currency("XAU")  # cached as refused
    assert set_extra_currencies(["XAU", "XDR"]) == frozenset()
    assert parse_currency("XAU", "c") == "XAU"
    assert parse_currency("XDR", "c") == "XDR"
    assert set_extra_currencies([]) == frozenset({"XAU", "XDR"})
    assert not is_currency("XAU")


@pytest.mark.parametrize("code", ["XYZ", "xau", "GOLD", ""])
def test_extra_currencies_must_be_iso_codes(code: str) -> None:
    with pytest.raises(MoneyError) as info:
        set_extra_currencies(["XAU", code])
    assert info.value.field == "extra_currencies"
    assert not is_currency("XAU")  # nothing was allowed


def test_currency_cache_holds_only_well_formed_codes() -> None:
    before = money._spendable.cache_info().currsize
    for i in range(500):
        is_currency(f"X{i:05d}")  # what a caller could send on the wire
        is_currency(f"{i:03d}")
    assert money._spendable.cache_info().currsize == before


@pytest.mark.parametrize(("tree", "where"), [
    ({"session": {"default_limit": {"amount": "1.00", "currency": "XAU"}}},
     "session.default_limit.currency: 'XAU' (Gold) is not a spendable currency"),
    ({"default_currency": "XTS"}, "default_currency: 'XTS' ("),
    ({"rates": {"XAU": {"USD": "2000"}}}, "rates.XAU: 'XAU' (Gold) is not a spendable currency"),
    (scoped(period_budgets={"accounts": {"acme": {"scopes": {"team:a": {"limits": [
        {"period": "day", "amount": "5.00", "currency": "XXX"}]}}}}}),
     "period_budgets.accounts.acme.scopes.team:a.limits.0.currency: 'XXX' ("),
])
def test_config_refuses_non_spendable_currencies(tree: dict[str, Any], where: str,
                                                 tmp_path: Path) -> None:
    message = refused(tree, tmp_path)
    assert where in message, message
    assert "is not a spendable currency" in message


def test_extra_currencies_setting_allows_them(tmp_path: Path) -> None:
    config = load_text(tmp_path, """
extra_currencies: [XAU]
default_currency: XAU
session: {default_limit: {amount: "1.00", currency: XAU}}
rates: {XAU: {USD: "2000"}}
""")
    assert config.extra_currencies == ["XAU"]
    assert config.session.default_limit.currency == "XAU"
    # The broker parses requests in the same process: XAU is accepted there too.
    assert parse_currency("XAU", "limit.currency") == "XAU"
    # A config without it (a reload, another test) is back to the default.
    validate({})
    assert not is_currency("XAU")


@pytest.mark.parametrize(("codes", "expect"), [
    (["XYZ"], "extra_currencies.0: 'XYZ' is not an ISO 4217 currency code"),
    (["USD", "xau"], "extra_currencies.1: 'xau' is not three uppercase letters"),
    ("XAU", "extra_currencies: Input should be a valid list"),
])
def test_extra_currencies_setting_is_validated(codes: Any, expect: str, tmp_path: Path) -> None:
    message = refused({"extra_currencies": codes}, tmp_path)
    assert expect in message, message


def test_a_refused_config_allows_no_extra_currency(tmp_path: Path) -> None:
    message = refused({"extra_currencies": ["XAU"], "listen": "nowhere"}, tmp_path)
    assert "listen:" in message
    assert not is_currency("XAU")


def test_reference_catalog_still_loads_and_refuses_metals(tmp_path: Path) -> None:
    catalog = load(Catalog, EXAMPLE_CATALOG, CATALOG_PREFIX, environ={})
    assert catalog.offers
    xaf = load_text(tmp_path, "offers: [{uri: u, offer_id: o, rate: '1', currency: XAF}]\n", Catalog)
    assert xaf.offers[0].currency == "XAF"
    with pytest.raises(ConfigError) as info:
        load_text(tmp_path, "offers: [{uri: u, offer_id: o, rate: '1', currency: XAU}]\n", Catalog)
    assert "offers.0.currency: 'XAU' (Gold) is not a spendable currency" in str(info.value)
    with pytest.raises(ConfigError) as info:
        load_text(tmp_path, "accounts: {ramp-broker: {XTS: '10'}}\n", Catalog)
    assert "accounts: accounts.ramp-broker: 'XTS' (" in str(info.value)


# --- 2: repeated YAML keys ----------------------------------------------------------------------


def test_repeated_top_level_key_is_refused(tmp_path: Path) -> None:
    text = """\
listen: 127.0.0.1:9090
period_budgets:
  accounts:
    acme:
      scopes:
        "team:a": {limits: [{period: day, amount: "5.00", currency: USD}]}
logging: {level: INFO}
period_budgets: {}
"""
    with pytest.raises(ConfigError) as info:
        load_text(tmp_path, text)
    message = str(info.value)
    assert "key 'period_budgets' appears twice (lines 2 and 8)" in message, message
    assert str(tmp_path / "config.yaml") in message


@pytest.mark.parametrize(("text", "expect"), [
    ("fanout:\n  execute_timeout_ms: 1000\n  discover_timeout_ms: 10\n  execute_timeout_ms: 9000\n",
     "key 'execute_timeout_ms' appears twice (lines 2 and 4)"),
    ("period_budgets:\n  accounts:\n    acme:\n      scopes:\n"
     "        'team:a': {limits: []}\n        team:a: {failure: open}\n",
     "key 'team:a' appears twice (lines 5 and 6)"),
    ("agents:\n  - id: a\n    key_env: A\n    account: acme\n  - id: b\n    key_env: B\n"
     "    account: acme\n    account: other\n",
     "key 'account' appears twice (lines 7 and 8)"),
    ("rates: {EUR: {USD: '1.08', USD: '0.01'}}\n", "key 'USD' appears twice (lines 1 and 1)"),
])
def test_repeated_key_at_any_depth_is_refused(text: str, expect: str, tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as info:
        load_text(tmp_path, text)
    assert expect in str(info.value), str(info.value)


def test_catalog_refuses_repeated_keys_too(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="key 'USD' appears twice"):
        load_text(tmp_path, "accounts:\n  ramp-broker:\n    USD: '10'\n    USD: '99999'\n", Catalog)


def test_merge_keys_still_work_own_keys_win(tmp_path: Path) -> None:
    config = load_text(tmp_path, """
fanout: &fast {discover_timeout_ms: 100, overall_timeout_ms: 200}
session: &idle
  idle_seconds: 60
anonymous:
  account: acme
period_budgets:
  accounts:
    acme:
      scopes:
        "team:a": &std
          limits: [{period: day, amount: "5.00", currency: USD}]
          failure: closed
        "team:b":
          <<: *std
          failure: open
          open_allowance: {amount: "1.00", currency: USD}
        "team:c":
          <<: [*std]
""")
    scopes = config.period_budgets.accounts["acme"].scopes
    assert scopes["team:a"].failure == "closed"
    assert scopes["team:b"].failure == "open"
    assert scopes["team:b"].limits == scopes["team:a"].limits
    assert scopes["team:c"] == scopes["team:a"]


def test_merging_a_mapping_that_overrides_a_merged_key_takes_its_value(tmp_path: Path) -> None:
    config = load_text(tmp_path, """
anonymous: {account: acme}
period_budgets:
  accounts:
    acme:
      scopes:
        "team:a": &a
          failure: open
          open_allowance: {amount: "1.00", currency: USD}
        "team:b": &b
          <<: *a
          open_allowance: {amount: "2.00", currency: USD}
        "team:c":
          <<: *b
""")
    scopes = config.period_budgets.accounts["acme"].scopes
    assert scopes["team:b"].open_allowance is not None
    assert scopes["team:b"].open_allowance.amount == "2.00"
    assert scopes["team:c"] == scopes["team:b"]


class _Tree(BaseModel):
    d: dict[str, dict[str, int]]


def test_a_merged_override_is_kept_whatever_the_key(tmp_path: Path) -> None:
    # PyYAML dedupes merged keys by string identity: one-letter keys (shared str objects)
    # made the mapping merged last take the value its own merge had overridden.
    tree = load_text(tmp_path, """
d:
  a: &a {x: 1, y: 1}
  b: &b
    <<: *a
    x: 2
  c:
    <<: *b
  e:
    <<: [*b, *a]
    y: 3
""", _Tree)
    assert tree.d == {"a": {"x": 1, "y": 1}, "b": {"x": 2, "y": 1}, "c": {"x": 2, "y": 1},
                      "e": {"x": 2, "y": 3}}


def test_two_merge_keys_in_one_mapping_are_refused(tmp_path: Path) -> None:
    text = "a: &a {idle_seconds: 5}\nsession:\n  <<: *a\n  <<: {idle_seconds: 7}\n"
    with pytest.raises(ConfigError, match="key '<<' appears twice \\(lines 3 and 4\\)"):
        load_text(tmp_path, text)


def test_serve_refuses_a_repeated_key(tmp_path: Path) -> None:
    config = tmp_path / "broker.yaml"
    config.write_text(f"listen: 127.0.0.1:{free_port()}\nmetrics: {{enabled: false}}\n"
                      "listen: 127.0.0.1:1\n", encoding="utf-8")
    result = run_cli(["serve", "--config", str(config)], tmp_path)
    assert result.returncode == 2, result.stderr
    assert "configuration error" in result.stderr
    assert "key 'listen' appears twice (lines 1 and 3)" in result.stderr
    assert "Traceback" not in result.stderr


# --- 3: agent identities ------------------------------------------------------------------------


def agent(agent_id: str, **fields: Any) -> dict[str, Any]:
    return {"id": agent_id, "account": "acme", **fields}


def test_two_agents_with_one_key_sha256_are_refused(tmp_path: Path) -> None:
    tree = {"agents": [agent("alice", key_sha256=sha("k1")), agent("bob", key_sha256=sha("k2")),
                       agent("mallory", key_sha256=sha("k1"))]}
    message = refused(tree, tmp_path)
    assert "agents: agents alice and mallory have the same key_sha256" in message, message


def test_an_agent_named_anonymous_is_refused(tmp_path: Path) -> None:
    message = refused({"agents": [agent("anonymous", key_sha256=sha("k"))]}, tmp_path)
    assert "agents.0.id: 'anonymous' is reserved for callers without a key" in message, message
    # Other ids are fine, including ones merely containing the word.
    validate({"agents": [agent("anonymous-bot", key_sha256=sha("k"))]})


@pytest.mark.parametrize("how", ["key_sha256", "key_env"])
def test_serve_refuses_two_agents_with_one_key(how: str, tmp_path: Path) -> None:
    if how == "key_sha256":
        agents = [agent("alice", key_sha256=sha("same")), agent("bob", key_sha256=sha("same"))]
    else:
        agents = [agent("alice", key_env="RAMP_TEST_KEY_A"), agent("bob", key_env="RAMP_TEST_KEY_B")]
    tree = broker_tree(listen=f"127.0.0.1:{free_port()}", metrics={"enabled": False}, agents=agents)
    config = write_yaml(tmp_path / "broker.yaml", tree)
    result = run_cli(["serve", "--config", str(config)], tmp_path,
                     {"RAMP_TEST_KEY_A": "same", "RAMP_TEST_KEY_B": "same"})
    assert result.returncode == 2, result.stderr
    assert "configuration error" in result.stderr
    assert "alice and bob have the same" in result.stderr, result.stderr
    assert "Traceback" not in result.stderr


# --- 4: a listen address that is taken ----------------------------------------------------------


@pytest.fixture
def taken_port() -> Iterator[int]:
    """A 127.0.0.1 port something else is listening on."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        yield int(s.getsockname()[1])


@pytest.mark.parametrize("setting", ["listen", "metrics.listen"])
def test_serve_on_a_taken_port_is_a_configuration_error(setting: str, taken_port: int,
                                                        tmp_path: Path) -> None:
    taken, free = f"127.0.0.1:{taken_port}", f"127.0.0.1:{free_port()}"
    if setting == "listen":
        tree = broker_tree(listen=taken, metrics={"listen": free})
    else:
        tree = broker_tree(listen=free, metrics={"listen": taken})
    config = write_yaml(tmp_path / "broker.yaml", tree)
    result = run_cli(["serve", "--config", str(config)], tmp_path)
    assert result.returncode == 2, result.stderr
    lines = [ln for ln in result.stderr.splitlines() if ln.startswith("ramp-broker:")]
    assert lines == [f"ramp-broker: configuration error: {setting} {taken}: cannot listen "
                     "(Address already in use)"], result.stderr
    assert "Traceback" not in result.stderr


def test_reference_exchange_on_a_taken_port_exits_2(taken_port: int, tmp_path: Path) -> None:
    catalog = write_yaml(tmp_path / "catalog.yaml", {"listen": f"127.0.0.1:{taken_port}"})
    result = run_cli(["exchange", "--catalog", str(catalog)], tmp_path)
    assert result.returncode == 2, result.stderr
    assert f"listen 127.0.0.1:{taken_port}: cannot listen" in result.stderr
    assert "Traceback" not in result.stderr


# --- 5: reservation TTL against the Exchange's execute timeout ----------------------------------


def test_the_guard_matches_the_connect_adapter() -> None:
    assert round(_GUARD_S * 1000) == EXECUTE_GUARD_MS


@pytest.mark.parametrize(("timeout_ms", "least"), [
    (5000, 21), (2000, 9), (250, 2), (500, 3), (14000, 57), (1, 2), (120000, 481),
])
def test_min_reservation_ttl(timeout_ms: int, least: int) -> None:
    assert min_reservation_ttl_seconds(timeout_ms) == least
    # Twice the worst case of a call and its retry, each with the guard, rounded up.
    assert least == -(-4 * (timeout_ms / 1000 + 0.25) // 1)


def test_ttl_below_the_execute_timeout_is_refused(tmp_path: Path) -> None:
    tree = scoped(fanout={"execute_timeout_ms": 5000})
    tree["period_budgets"]["reservation_ttl_seconds"] = 20
    message = refused(tree, tmp_path)
    assert "period_budgets.reservation_ttl_seconds 20 is too short for " \
           "fanout.execute_timeout_ms 5000: the minimum is 21" in message, message
    assert "(top)" not in message
    tree["period_budgets"]["reservation_ttl_seconds"] = 21
    validate(tree)
    tree["period_budgets"]["reservation_ttl_seconds"] = 2
    tree["fanout"]["execute_timeout_ms"] = 250
    validate(tree)


@pytest.mark.parametrize("caller", [
    {"agents": [agent("a", key_sha256=sha("k"), charged_to=["team:x"])]},
    {"anonymous": {"account": "acme", "billing_ref": "acme"}},
    {"anonymous": {"account": "acme", "may_name": ["team:x"]}},
])
def test_ttl_is_checked_when_only_callers_name_scopes(caller: dict[str, Any], tmp_path: Path) -> None:
    tree = {"period_budgets": {"reservation_ttl_seconds": 5}, **caller}
    assert "the minimum is 21" in refused(tree, tmp_path)


def test_ttl_is_not_checked_without_period_budgets() -> None:
    # Nothing is ever reserved: a long execute timeout needs no longer TTL.
    config = validate({"fanout": {"execute_timeout_ms": 120000}, "anonymous": {"account": "acme"},
                       "agents": [agent("a", key_sha256=sha("k"))],
                       "period_budgets": {"accounts": {"acme": {}}}})
    assert not config.uses_period_budgets()


def test_example_config_satisfies_the_rule() -> None:
    config = load(BrokerConfig, EXAMPLE_BROKER, ENV_PREFIX, environ={})
    assert config.uses_period_budgets()
    assert config.period_budgets.reservation_ttl_seconds >= min_reservation_ttl_seconds(
        config.fanout.execute_timeout_ms)


def test_serve_refuses_a_short_ttl(tmp_path: Path) -> None:
    tree = broker_tree(listen=f"127.0.0.1:{free_port()}", metrics={"enabled": False},
                       **scoped(period_budgets={"reservation_ttl_seconds": 10,
                                                "accounts": {"acme": {"scopes": {"team:a": {}}}}}))
    config = write_yaml(tmp_path / "broker.yaml", tree)
    result = run_cli(["serve", "--config", str(config)], tmp_path)
    assert result.returncode == 2, result.stderr
    assert "period_budgets.reservation_ttl_seconds 10 is too short for fanout.execute_timeout_ms " \
           "5000: the minimum is 21" in result.stderr, result.stderr
    assert "Traceback" not in result.stderr
