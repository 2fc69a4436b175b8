"""One progress bar with an ETA for a long command made of named steps.

Export, calibration and the benchmarks' set-up are a handful of steps of very different cost
(tracing a graph, checking it, writing it). A bar per step would restart its ETA at every step;
one bar over the whole command, whose units are each step's expected share of the work, gives an
ETA from the first finished step on. A step that loops (calibration clips, benchmark rounds) moves
its share in parts, so the bar also moves inside it. A step that is itself made of named steps
(an engine export inside a benchmark's set-up) is a `part`: its sub-steps share the step's part
of the bar, so a library routine drives whichever bar it is handed. Everything goes to stderr and
nothing is drawn when disabled (`--quiet`, `--json`).
"""
from __future__ import annotations

import sys
from contextlib import contextmanager
from typing import Callable, Iterator, Mapping

from tqdm import tqdm

_FORMAT = "{desc}: {percentage:3.0f}%|{bar}| [{elapsed}<{remaining}{postfix}]"

Advance = Callable[[float], None]


def _check(weights: Mapping[str, float]) -> dict[str, float]:
    if not weights or min(weights.values()) <= 0:
        raise ValueError("every step needs a positive weight")
    return dict(weights)


@contextmanager
def _moving(weight: float, total: float | None, move: Advance) -> Iterator[Advance]:
    """Hands `weight` units to `move`: with `total`, n/total of them per `advance(n)` (never more
    than `weight` in all), and at the end whatever the loop did not report."""
    moved = 0.0

    def advance(n: float = 1) -> None:
        nonlocal moved
        if not total:
            return
        part = min(weight * n / total, weight - moved)
        moved += part
        move(part)

    yield advance
    move(weight - moved)


class StepBar:
    """A bar over `weights` (step name -> relative cost); `step(name)` runs one of them."""

    def __init__(self, weights: Mapping[str, float], *, desc: str, enabled: bool = True):
        self._weights = _check(weights)
        self._desc = desc
        self.enabled = enabled
        self._total = float(sum(self._weights.values()))
        self._done = 0.0  # kept here too: a disabled tqdm counts nothing
        self._bar = tqdm(total=self._total, desc=desc, disable=not enabled,
                         bar_format=_FORMAT, dynamic_ncols=True, file=sys.stderr)

    @contextmanager
    def step(self, name: str, total: float | None = None) -> Iterator[Advance]:
        """Run step `name`; with `total`, the yielded `advance(n)` moves n/total of its share."""
        with self._share(name, total, name) as advance:
            yield advance

    @contextmanager
    def part(self, name: str, weights: Mapping[str, float]) -> Iterator["PartBar"]:
        """Run step `name` as named sub-steps (`weights`, relative costs among themselves): the
        yielded bar has `step`, `part`, `note` and `write` like this one and moves `name`'s share."""
        sub = _check(weights)
        with self._share(name, sum(sub.values()), name) as advance:
            yield PartBar(self, name, sub, advance)

    @contextmanager
    def _share(self, name: str, total: float | None, label: str) -> Iterator[Advance]:
        self._bar.set_description_str(f"{self._desc} ({label})", refresh=True)
        with _moving(self._weights[name], total, self._move) as advance:
            yield advance

    def _move(self, units: float) -> None:
        left = self._total - self._done
        if units > left or left - units < 1e-9 * self._total:  # float sums are off by a rounding error
            units = left
        if units > 0:
            self._done += units
            self._bar.update(units)

    @property
    def fraction(self) -> float:
        """How much of the work is done, 0..1."""
        return self._done / self._total

    def add(self, weights: Mapping[str, float]) -> None:
        """More steps, known only once the first ones ran (the model's size, read after the heavy
        imports that a first step covers)."""
        new = _check(weights)
        if set(new) & set(self._weights):
            raise ValueError(f"steps already on the bar: {', '.join(sorted(set(new) & set(self._weights)))}")
        self._weights.update(new)
        self._total += sum(new.values())
        self._bar.total = self._total
        self._bar.refresh()

    def label(self, text: str) -> None:
        """The step shown beside the bar (what a part's sub-step sets)."""
        self._bar.set_description_str(f"{self._desc} ({text})", refresh=True)

    def note(self, text: str) -> None:
        """A short status after the ETA (which repeat, which budget)."""
        self._bar.set_postfix_str(text, refresh=True)

    def write(self, message: str) -> None:
        """A log line that does not tear the bar."""
        tqdm.write(message, file=sys.stderr)

    def close(self) -> None:
        self._bar.close()

    def __enter__(self) -> "StepBar":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class PartBar:
    """The sub-steps of one step of a StepBar (see `StepBar.part`); parts nest."""

    def __init__(self, root: StepBar, name: str, weights: dict[str, float], advance: Advance):
        self._root, self._name, self._weights, self._advance = root, name, weights, advance
        self.enabled = root.enabled

    @contextmanager
    def step(self, name: str, total: float | None = None) -> Iterator[Advance]:
        self._root.label(f"{self._name}: {name}")
        with _moving(self._weights[name], total, self._advance) as advance:
            yield advance

    @contextmanager
    def part(self, name: str, weights: Mapping[str, float]) -> Iterator["PartBar"]:
        sub = _check(weights)
        with self.step(name, total=sum(sub.values())) as advance:
            yield PartBar(self._root, f"{self._name}: {name}", sub, advance)

    def note(self, text: str) -> None:
        self._root.note(text)

    def write(self, message: str) -> None:
        self._root.write(message)


def null_bar(weights: Mapping[str, float]) -> StepBar:
    """A bar that draws nothing, for library code called without one."""
    return StepBar(weights, desc="", enabled=False)
