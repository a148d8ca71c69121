"""Budget periods and the window an instant falls in.

A calendar period (hour, day, week, month) runs in the operator's time zone;
a duration (`720h`, `30d`, from config or a request's `budget_period`) is a
fixed window aligned to the Unix epoch. A window's identity comes only from
the event's timestamp, so 23:59:59.999 and 00:00:00.000 land in different
windows, and every broker computes the same window for the same instant.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from datetime import UTC, date, datetime, time, timedelta
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

CALENDAR = ("hour", "day", "week", "month")
MIN_DURATION_S = 60
MAX_DURATION_S = 366 * 86400
_DURATION = re.compile(r"([1-9][0-9]{0,8})(s|m|h|d)")
_UNIT_S = {"s": 1, "m": 60, "h": 3600, "d": 86400}
_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)


class PeriodError(ValueError):
    def __init__(self, field: str, problem: str) -> None:
        super().__init__(f"{field}: {problem}")
        self.field = field
        self.problem = problem


@dataclass(frozen=True, slots=True)
class Window:
    """One period's window: its id (part of the store key), start and end (exclusive)."""

    id: str
    start: datetime
    end: datetime

    @property
    def start_ms(self) -> int:
        return _ms(self.start)

    @property
    def end_ms(self) -> int:
        return _ms(self.end)


@dataclass(frozen=True, slots=True)
class Period:
    """`spec` is canonical: "month", "day", ..., or a duration in its largest whole unit ("30d")."""

    spec: str
    seconds: int = 0  # durations only

    @classmethod
    def parse(cls, text: str, field: str) -> Period:
        if text in CALENDAR:
            return cls(text)
        m = _DURATION.fullmatch(text)
        if not m:
            raise PeriodError(field, f"{text[:32]!r} is not hour, day, week, month or a duration "
                                     "such as 720h (units s, m, h, d)")
        return cls.of_seconds(int(m.group(1)) * _UNIT_S[m.group(2)], field)

    @classmethod
    def of_seconds(cls, seconds: int, field: str) -> Period:
        if not MIN_DURATION_S <= seconds <= MAX_DURATION_S:
            raise PeriodError(field, f"must be between {MIN_DURATION_S} s and 366 days")
        for unit in ("d", "h", "m", "s"):
            if seconds % _UNIT_S[unit] == 0:
                return cls(f"{seconds // _UNIT_S[unit]}{unit}", seconds)
        raise AssertionError("unreachable")

    def window(self, at: datetime, tz: ZoneInfo) -> Window:
        if self.seconds:
            index = _ms(at) // (self.seconds * 1000)
            start = _EPOCH + timedelta(seconds=index * self.seconds)
            return Window(f"{self.spec}.{index}", start, start + timedelta(seconds=self.seconds))
        local = at.astimezone(tz)
        if self.spec == "hour":
            # Absolute hours: the repeated hour of a DST change is two windows.
            start = local.replace(minute=0, second=0, microsecond=0)
            return Window(start.astimezone(UTC).strftime("%Y-%m-%dT%HZ"), start.astimezone(UTC),
                          start.astimezone(UTC) + timedelta(hours=1))
        day = local.date()
        if self.spec == "day":
            first, nxt, wid = day, day + timedelta(days=1), day.isoformat()
        elif self.spec == "week":
            first = day - timedelta(days=day.weekday())
            iso = first.isocalendar()
            nxt, wid = first + timedelta(days=7), f"{iso.year}-W{iso.week:02d}"
        else:
            first = day.replace(day=1)
            nxt = (first + timedelta(days=32)).replace(day=1)
            wid = f"{first:%Y-%m}"
        return Window(wid, _midnight(first, tz), _midnight(nxt, tz))


def _midnight(day: date, tz: ZoneInfo) -> datetime:
    return datetime.combine(day, time(0), tz).astimezone(UTC)


def _ms(at: datetime) -> int:
    delta = at - _EPOCH
    return (delta.days * 86400 + delta.seconds) * 1000 + delta.microseconds // 1000


def time_zone(name: str, field: str) -> ZoneInfo:
    try:
        return ZoneInfo(name)
    except (ZoneInfoNotFoundError, ValueError):
        raise PeriodError(field, f"{name[:64]!r} is not an IANA time zone") from None


def to_ms(at: datetime) -> int:
    return _ms(at)


def from_ms(ms: int) -> datetime:
    return _EPOCH + timedelta(milliseconds=ms)
