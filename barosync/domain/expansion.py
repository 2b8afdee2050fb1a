"""Recurrence expansion with bounds: no request makes the server expand without limit.

Plain functions, no IO and no trio: callers run them in a worker thread (app.expand).

What bounds the work, whatever a client sent:
- a stored rule is checked when it is written (``check_rule``, ``check_span``), with
  the engine that later expands it (dateutil, under ``recurring-ical-events``):
  INTERVAL of at least 1, every BY* part in RFC 5545's range, at most
  ``MAX_RULE_INSTANCES`` occurrences counted from DTSTART to the rule's end (its
  COUNT, its UNTIL, or ``MAX_DATE``), and a first occurrence found within a fixed
  amount of work;
- an expansion is clipped to ``[MIN_DATE, MAX_DATE)``, yields at most
  ``MAX_INSTANCES`` occurrences per event (CalDAV's max-instances), and runs under a
  guard that stops it at a deadline or after a number of steps (``guarded``), so a
  rule stored by an older release, or one in an imported file, cannot hang the server
  either.

The guard is a profile function on the worker thread (``sys.setprofile``): dateutil
can loop for seconds inside one call without yielding an occurrence (a sub-daily rule
whose BY* parts never match steps day by day to the year 9999), and a thread cannot
otherwise be interrupted. It is on only while the rule engine steps (``stepping``),
the deadline checked between steps: an expansion costs about 1.35x, where profiling
all of it cost 3.6x.
"""

from __future__ import annotations

import contextlib
import functools
import math
import sys
import threading
import time
from datetime import date, datetime, timezone
from typing import Any, Callable, Iterator, TypeVar

from dateutil.rrule import rrulestr

T = TypeVar("T")

# The dates barosync expands between (CalDAV's min-date-time and max-date-time).
MIN_DATE = datetime(1900, 1, 1, tzinfo=timezone.utc)
MAX_DATE = datetime(2200, 1, 1, tzinfo=timezone.utc)
# Occurrences a stored rule may have over its whole life, from DTSTART.
MAX_RULE_INSTANCES = 200_000
# Occurrences of one event in one answer (CalDAV max-instances): each costs about
# 150 us to build here, so this many fit well inside the deadline.
MAX_INSTANCES = 5_000
# Wall-clock time one request may spend expanding (all its events together).
DEADLINE = 2.0
# Profile events the write-time probe may spend looking for a rule's first
# occurrence: a deterministic budget, so whether a rule is accepted does not depend
# on how busy the machine is (a few milliseconds of work; valid rules need hundreds).
PROBE_STEPS = 200_000
MAX_INTERVAL = 10_000
# How often the guard looks at the clock, in profile events.
_CHECK_EVERY = 1024

_FREQ_DAYS = {"YEARLY": 365.25, "MONTHLY": 30.44, "WEEKLY": 7.0, "DAILY": 1.0, "HOURLY": 1 / 24,
              "MINUTELY": 1 / 1440, "SECONDLY": 1 / 86400}
_RANGES = {"BYSECOND": (0, 60, False), "BYMINUTE": (0, 59, False), "BYHOUR": (0, 23, False),
           "BYMONTHDAY": (1, 31, True), "BYYEARDAY": (1, 366, True), "BYWEEKNO": (1, 53, True),
           "BYMONTH": (1, 12, False), "BYSETPOS": (1, 366, True)}


class ExpansionLimit(Exception):
    """An expansion stopped at a limit; ``limit`` names which ("deadline", "steps",
    "instances", "range") and the message says it for a person."""

    def __init__(self, limit: str, message: str) -> None:
        super().__init__(message)
        self.limit = limit
        self.message = message


class RuleError(ValueError):
    """A rule barosync will not store: the message says why, for a person."""


# -- the guard --------------------------------------------------------------------------


@contextlib.contextmanager
def guarded(*, seconds: float | None = None, steps: int | None = None, shown: float | None = None) -> Iterator[None]:
    """Run the body under a budget: ``seconds`` of wall-clock time and/or ``steps``
    (profile events). Past either, the body is interrupted with ExpansionLimit. Only
    the calling thread is affected. (``shown``: the deadline to name, if not ``seconds``.)"""
    count = 0
    shown = seconds if shown is None else shown
    deadline = time.monotonic() + seconds if seconds is not None else None
    previous = sys.getprofile()

    def watch(frame: Any, event: str, arg: Any) -> None:
        nonlocal count
        count += 1
        if steps is not None and count > steps:
            raise ExpansionLimit("steps", f"stopped after {steps} steps")
        if deadline is not None and count % _CHECK_EVERY == 0 and time.monotonic() > deadline:
            raise ExpansionLimit("deadline", f"took longer than {shown:g} s")

    sys.setprofile(watch)
    try:
        yield
    finally:
        sys.setprofile(previous)


_local = threading.local()


def run_guarded(fn: Callable[..., T], *args: Any, seconds: float = DEADLINE) -> T:
    """``fn(*args)`` stopped with ExpansionLimit after ``seconds``: what a worker
    thread runs for one request. The guard is on only inside ``stepping()`` (the
    rule engine's steps, which may loop long without returning) and the deadline is
    checked between them: profiling everything would make expansion 3.6x slower."""
    previous = getattr(_local, "deadline", None)
    _local.deadline = (time.monotonic() + seconds, seconds)
    try:
        return fn(*args)
    finally:
        _local.deadline = previous


@contextlib.contextmanager
def stepping() -> Iterator[None]:
    """One step of an expansion: under the guard of the run_guarded call around it
    (if any), and only after checking that its deadline has not passed."""
    found = getattr(_local, "deadline", None)
    if found is None:
        yield
        return
    deadline, seconds = found
    if time.monotonic() > deadline:
        raise ExpansionLimit("deadline", f"took longer than {seconds:g} s")
    with guarded(seconds=deadline - time.monotonic(), shown=seconds):
        yield


# -- write time -------------------------------------------------------------------------


def _parts(text: str) -> dict[str, str]:
    out = {}
    for part in text.split(";"):
        name, _, value = part.partition("=")
        out[name.strip().upper()] = value.strip()
    return out


def _numbers(value: str, name: str) -> list[int]:
    try:
        return [int(v) for v in value.split(",") if v]
    except ValueError:
        raise RuleError(f"{name} must be a list of numbers") from None


def check_rule(text: str) -> None:
    """Refuse a rule the expander could not honour or bound (RuleError)."""
    parts = _parts(text)
    freq = parts.get("FREQ", "").upper()
    if freq not in _FREQ_DAYS:
        raise RuleError(f"FREQ must be one of {', '.join(_FREQ_DAYS)}")
    interval = parts.get("INTERVAL", "1")
    if not interval.isdigit() or not 1 <= int(interval) <= MAX_INTERVAL:
        raise RuleError(f"INTERVAL must be a whole number from 1 to {MAX_INTERVAL}")
    if "COUNT" in parts and (not parts["COUNT"].isdigit() or int(parts["COUNT"]) < 1):
        raise RuleError("COUNT must be a whole number of at least 1")
    for name, (low, high, signed) in _RANGES.items():
        if name in parts:
            for n in _numbers(parts[name], name):
                if not (low <= n <= high or (signed and -high <= n <= -low)):
                    span = f"{low}..{high}" + (f" or -{high}..-{low}" if signed else "")
                    raise RuleError(f"{name} values must be in {span}")
    if "BYSETPOS" in parts and not any(p in parts for p in ("BYDAY", "BYMONTHDAY", "BYYEARDAY", "BYWEEKNO",
                                                            "BYMONTH", "BYHOUR", "BYMINUTE", "BYSECOND")):
        raise RuleError("BYSETPOS needs another BY* part to select from")
    # The engine that expands it must accept it too (dateutil refuses combinations
    # that yield nothing, like BYHOUR outside what INTERVAL reaches).
    start = datetime(2000, 1, 1, tzinfo=timezone.utc) if parts.get("UNTIL", "").upper().endswith("Z") \
        else datetime(2000, 1, 1)
    try:
        rrulestr(text, dtstart=start, cache=False)
    except (ValueError, TypeError, KeyError, OverflowError) as e:
        raise RuleError(f"cannot be expanded: {e}"[:300]) from None


def _per_period(parts: dict[str, str], freq: str) -> int:
    """At most how many occurrences one period of the rule yields."""
    n = {name: len([v for v in parts[name].split(",") if v]) for name in parts if name.startswith("BY")}
    days = 1
    if freq == "YEARLY":
        if "BYYEARDAY" in n:
            days = n["BYYEARDAY"]
        elif "BYMONTHDAY" in n:
            days = n.get("BYMONTH", 12) * n["BYMONTHDAY"]
        elif "BYWEEKNO" in n:
            days = n["BYWEEKNO"] * n.get("BYDAY", 7)
        elif "BYDAY" in n:
            days = (n["BYMONTH"] * 5 if "BYMONTH" in n else 53) * n["BYDAY"]
        elif "BYMONTH" in n:
            days = n["BYMONTH"]
        days = min(days, 366)
    elif freq == "MONTHLY":
        days = min(n.get("BYMONTHDAY", 0) or 5 * n.get("BYDAY", 0) or 1, 31)
    elif freq == "WEEKLY":
        days = min(n.get("BYDAY", 1), 7)
    finer = {"YEARLY": ("BYHOUR", "BYMINUTE", "BYSECOND"), "MONTHLY": ("BYHOUR", "BYMINUTE", "BYSECOND"),
             "WEEKLY": ("BYHOUR", "BYMINUTE", "BYSECOND"), "DAILY": ("BYHOUR", "BYMINUTE", "BYSECOND"),
             "HOURLY": ("BYMINUTE", "BYSECOND"), "MINUTELY": ("BYSECOND",), "SECONDLY": ()}[freq]
    times = math.prod(n.get(name, 1) for name in finer)
    total = days * times
    if "BYSETPOS" in n:
        total = min(total, n["BYSETPOS"])
    return max(total, 1)


def _as_utc(value: date | datetime) -> datetime:
    if isinstance(value, datetime):
        return value.astimezone(timezone.utc) if value.tzinfo else value.replace(tzinfo=timezone.utc)
    return datetime(value.year, value.month, value.day, tzinfo=timezone.utc)


def _until(text: str) -> datetime | None:
    raw = _parts(text).get("UNTIL")
    if not raw:
        return None
    raw = raw.upper().rstrip("Z")
    try:
        found = datetime.strptime(raw, "%Y%m%dT%H%M%S") if "T" in raw else datetime.strptime(raw, "%Y%m%d")
    except ValueError:
        raise RuleError("UNTIL must be a date (YYYYMMDD) or a date-time (YYYYMMDDTHHMMSSZ)") from None
    return found.replace(tzinfo=timezone.utc)


def instances_bound(text: str, start: date | datetime) -> int:
    """At most how many occurrences the rule has from ``start`` to its end (its COUNT,
    UNTIL or MAX_DATE): the number of periods times what one period may yield."""
    parts = _parts(text)
    freq = parts["FREQ"].upper()
    interval = int(parts.get("INTERVAL", "1"))
    begin = max(_as_utc(start), MIN_DATE)
    end = min(_until(text) or MAX_DATE, MAX_DATE)
    days = max((end - begin).total_seconds() / 86400, 0.0)
    periods = math.floor(days / (_FREQ_DAYS[freq] * interval)) + 1
    bound = periods * _per_period(parts, freq)
    if "COUNT" in parts:
        bound = min(bound, int(parts["COUNT"]))
    return bound


def check_span(text: str, start: date | datetime) -> None:
    """Refuse a rule (already through check_rule) that repeats more than
    MAX_RULE_INSTANCES times from ``start``, or whose first occurrence cannot be found
    within PROBE_STEPS (a rule whose BY* parts never meet)."""
    if instances_bound(text, start) > MAX_RULE_INSTANCES:
        raise RuleError(f"repeats more than {MAX_RULE_INSTANCES} times from the event's start (barosync expands "
                        f"up to {MAX_DATE.year}); give it a COUNT or an UNTIL, or repeat less often")
    # dateutil wants UNTIL and DTSTART alike (both UTC or both floating); the
    # expander reconciles them, and the probe needs only the first occurrence.
    utc_until = _parts(text).get("UNTIL", "").upper().endswith("Z")
    if isinstance(start, datetime) and (start.tzinfo is None) == utc_until:
        start = start.replace(tzinfo=timezone.utc) if utc_until else start.replace(tzinfo=None)
    try:
        rule = rrulestr(text, dtstart=start, cache=False)
        with guarded(steps=PROBE_STEPS):
            next(iter(rule), None)
    except ExpansionLimit:
        raise RuleError("finds no occurrence within the work barosync allows for one (do its BY* parts "
                        "ever meet?)") from None
    except (ValueError, TypeError, OverflowError) as e:
        raise RuleError(f"cannot be expanded from this start: {e}"[:300]) from None


@functools.lru_cache(maxsize=4096)
def unexpandable(text: str, start: date | datetime) -> str | None:
    """Why a stored rule is not one barosync would accept today (None: it is). Read
    paths expand such a rule, stored by an older release, as its first occurrence
    only: one event must not make every query of its calendar fail or time out."""
    try:
        check_rule(text)
        check_span(text, start)
    except RuleError as e:
        return str(e)
    return None


# -- expansion --------------------------------------------------------------------------


def clip(start: datetime | None, end: datetime | None) -> tuple[datetime, datetime]:
    """A query's window inside what barosync expands (an open end means the limit)."""
    lo = min(max(_as_utc(start), MIN_DATE), MAX_DATE) if start is not None else MIN_DATE
    hi = min(_as_utc(end), MAX_DATE) if end is not None else MAX_DATE
    return lo, max(lo, hi)


def bounded(occurrences: Iterator[T], *, what: str, limit: int = MAX_INSTANCES) -> list[T]:
    """At most ``limit`` items of an expansion, or ExpansionLimit("instances")."""
    out: list[T] = []
    for item in occurrences:
        if len(out) >= limit:
            raise ExpansionLimit("instances", f"{what} has more than {limit} occurrences in this range; "
                                              "ask for a shorter one")
        out.append(item)
    return out
