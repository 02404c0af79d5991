"""Batch runs that go on past a broken series: collect one line per failure, summarise, exit non-zero.

A series fails when reading it raises :class:`~asl_enhance.bids.ASLInputError` (the loader runs with
``on_error="skip"`` and marks the item with ``error``) or when writing its outputs is refused (they
exist and overwriting was not asked, or a needed sidecar field is missing). :class:`SeriesFailureReport`
collects them, prints a summary when the run completes and, from the config's ``finalize``, exits
with status 1 when any series failed. The exit happens outside the Ignite engine so that no
exception handler (e.g. ``StatsHandler``) prints a traceback for it.
"""

from __future__ import annotations

import logging
import sys
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any, TypeVar

from ignite.engine import Engine, Events

from .bids import ASLInputError, find_asl_series, load_asl_series, parse_num_pairs
from .items import batch_items
from .outputs import output_dir_problem, remove_stale_temporaries

logger = logging.getLogger("asl_enhance")

#: exit status of a run where some series failed, and of one that found nothing to do
EXIT_SERIES_FAILED = 1
EXIT_NO_INPUT = 2


def record_failure(engine: Engine, message: str) -> None:
    """Note that a series failed (``message`` names the file and the problem), for the summary."""
    failures = getattr(engine.state, "asl_failures", None)
    if failures is None:
        failures = []
        engine.state.asl_failures = failures
    message = " ".join(str(message).split())  # always one line
    failures.append(message)
    logger.warning("skipped series: %s", message)


def series_label(item: dict) -> str:
    """How progress lines and summaries name a series: ``sub-03/perf/sub-03`` (its folder and stem)."""
    if item.get("rel_dir") is not None and item.get("stem"):
        return (Path(item["rel_dir"]) / item["stem"]).as_posix()
    return str(item.get("asl", "<series>"))


def failure_line(item: dict, err: BaseException) -> str:
    """One line naming the series' input file and what went wrong while writing its outputs (an
    :class:`~asl_enhance.bids.ASLInputError` already names its own file)."""
    if isinstance(err, ASLInputError):
        return str(err)
    return f"{item.get('asl', series_label(item))}: outputs not written: {str(err) or type(err).__name__}"


def check_output_dir_or_exit(output_dir: str | Path, dataset_dir: str | Path | None = None) -> None:
    """Before any series runs: refuse an output folder that is (inside) the input data set, that
    holds another data set's description, or that cannot be written, in one line with exit status 2
    (see :func:`~asl_enhance.outputs.output_dir_problem`); then remove what killed runs left there."""
    started = time.time()
    problem = output_dir_problem(output_dir, dataset_dir)
    if problem:
        print(f"ERROR: {output_dir}: {problem}", file=sys.stderr, flush=True)
        raise SystemExit(EXIT_NO_INPUT)
    removed = remove_stale_temporaries(output_dir, started)
    if removed:
        logger.info("removed %d temporary files/folders left in %s by an interrupted run", removed, output_dir)


def num_pairs_or_exit(value: Any) -> int | None:
    """``--num_pairs`` of a command-line run, checked before any series runs: a whole number or all
    (None); anything else prints one line and exits with status 2 (no traceback, nothing written)."""
    try:
        return parse_num_pairs(value)
    except ValueError as err:
        print(f"ERROR: --num_pairs: {err}", file=sys.stderr, flush=True)
        raise SystemExit(EXIT_NO_INPUT) from None


class SeriesProgress:
    """A line per series as it finishes, ``[3/14] sub-03/perf/sub-03: written (2.1 s)``: the time
    runs from the moment its data began to load (Ignite's ``GET_BATCH_STARTED``)."""

    def __init__(self) -> None:
        self._started = time.monotonic()

    def attach(self, engine: Engine) -> None:
        engine.add_event_handler(Events.GET_BATCH_STARTED, self.start)

    def start(self, engine: Engine | None = None) -> None:
        self._started = time.monotonic()

    def report(self, engine: Engine, item: dict, outcome: str) -> None:
        state = engine.state
        position = f"[{getattr(state, 'iteration', 0) or '?'}/{getattr(state, 'epoch_length', None) or '?'}]"
        elapsed = time.monotonic() - self._started
        print(f"{position} {series_label(item)}: {outcome} ({elapsed:.1f} s)", flush=True)


Result = TypeVar("Result")


def process_each_series(
    items: Iterable[dict], process: Callable[[dict], Result], what: str = "failed"
) -> tuple[list[Result], list[str]]:
    """``process`` every item, going on past any exception: returns the results of those that worked
    and one line per failed series naming its input file (for apps without Ignite, e.g. the MONAI
    Deploy app, so one bad series never stops the others)."""
    results: list[Result] = []
    failures: list[str] = []
    for item in items:
        try:
            results.append(process(item))
        except Exception as err:  # whatever one series raises is reported and the batch goes on
            message = (
                str(err)
                if isinstance(err, ASLInputError)
                else f"{item.get('asl', series_label(item))}: {what}: {type(err).__name__}: {err}"
            )
            failures.append(" ".join(message.split()))
            logger.error("series %s", failures[-1])
    return results, failures


def exit_status(failures: list[Any]) -> int:
    """The process exit status of a batch: :data:`EXIT_SERIES_FAILED` when any series failed, else 0."""
    return EXIT_SERIES_FAILED if failures else 0


def find_series_or_exit(dataset_dir: str | Path, truth_dir: str | Path | None = None) -> list[dict[str, str]]:
    """:func:`find_asl_series` for command-line runs: a missing or empty data set folder prints one
    line naming it and exits with status 2 (no traceback). Series without an aslcontext are listed,
    so that they fail with a line naming the missing file instead of being passed over."""
    try:
        items = find_asl_series(dataset_dir, truth_dir, include_incomplete=True)
        if not items:
            raise ASLInputError(dataset_dir, "no ASL series found (*_asl.nii[.gz] with a sibling *_aslcontext.tsv)")
    except ASLInputError as err:
        print(f"ERROR: {err}", file=sys.stderr, flush=True)
        raise SystemExit(EXIT_NO_INPUT) from None
    return items


class SeriesFailureReport:
    """Ignite handler: collects failed series (items with a non-empty ``error`` and failures that
    writers record with :func:`record_failure`), prints a summary at ``COMPLETED`` and, in
    :meth:`finish` (the config's ``finalize``), raises ``SystemExit(1)`` when any series failed.

    Attach it after the writers so its summary comes last.
    """

    def __init__(self, exit_on_failure: bool = True):
        self.exit_on_failure = exit_on_failure
        self.failures: list[str] = []
        self.seen = 0

    def attach(self, engine: Engine) -> None:
        engine.add_event_handler(Events.STARTED, self._reset)
        engine.add_event_handler(Events.ITERATION_COMPLETED, self)
        engine.add_event_handler(Events.COMPLETED, self.summary)

    def _reset(self, engine: Engine) -> None:
        self.failures, self.seen = [], 0
        engine.state.asl_failures = []

    def __call__(self, engine: Engine) -> None:
        for item in batch_items(engine):
            self.seen += int(item.get("input_group", 0) or 0) == 0  # input groups of one series count once
            if item.get("error"):
                record_failure(engine, item["error"])

    def summary(self, engine: Engine) -> None:
        self.failures = list(getattr(engine.state, "asl_failures", []))
        if not self.failures:
            print(f"All {self.seen} series done.", flush=True)
            return
        lines = [f"{len(self.failures)} of {self.seen} series failed:"] + [f"  FAILED {f}" for f in self.failures]
        print("\n".join(lines), file=sys.stderr, flush=True)

    def finish(self) -> None:
        """Exit with status 1 when a series failed (call after the engine has finished)."""
        if self.failures and self.exit_on_failure:
            raise SystemExit(EXIT_SERIES_FAILED)


def usable_series(items: list[dict[str, str]], min_pairs: int = 2) -> list[dict[str, str]]:
    """The series of a training set that read cleanly and have at least ``min_pairs`` pairs; each
    one left out is named in a warning, so one broken series never stops a training run (none left:
    one line, exit status 2)."""
    usable = []
    for item in items:
        try:
            series = load_asl_series(item)
            if series.num_pairs < min_pairs:
                raise ASLInputError(item["asl"], f"has {series.num_pairs} pairs, training needs {min_pairs}")
        except ASLInputError as err:
            logger.warning("skipped series for training: %s", err)
            print(f"WARNING: skipped series for training: {err}", file=sys.stderr, flush=True)
            continue
        usable.append(item)
    if not usable:  # a command-line run: one line and status 2, not a traceback from the config parser
        where = items[0]["dataset_dir"] if items else "<data set>"
        print(f"ERROR: {where}: no usable series to train on (see the warnings above)", file=sys.stderr, flush=True)
        raise SystemExit(EXIT_NO_INPUT)
    return usable
