"""Setting types for money in configuration files, parsed as strictly as the wire's amounts.

A bad value raises ValueError with the problem only: pydantic puts the setting's path in front.
"""

from __future__ import annotations

from typing import Annotated

from pydantic import AfterValidator

from currency.money import MoneyError, parse_amount, parse_currency


def _amount(text: str) -> str:
    try:
        parse_amount(text, "amount")
    except MoneyError as exc:
        raise ValueError(exc.problem) from None  # the setting's path says where
    return text


def _currency(code: str) -> str:
    try:
        return parse_currency(code, "currency")
    except MoneyError as exc:
        raise ValueError(exc.problem) from None


Amount = Annotated[str, AfterValidator(_amount)]
CurrencyCode = Annotated[str, AfterValidator(_currency)]
