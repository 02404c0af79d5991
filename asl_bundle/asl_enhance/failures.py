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
from pathlib import Path

from ignite.engine import Engine, Events

from .bids import ASLInputError, find_asl_series, load_asl_series
from .items import batch_items

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
    one left out is named in a warning, so one broken series never stops a training run."""
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
    if not usable:
        raise ASLInputError(items[0]["dataset_dir"] if items else "<data set>", "no usable series to train on")
    return usable
