"""The stage log that GPU-machine scripts leave behind: lines on disk as they happen, failed stages named, and a
watchdog that writes the stacks when nothing moves."""

from __future__ import annotations

import re
import time

import pytest

from euphonium_ray.stage_log import StageLog


def test_each_line_is_on_disk_before_the_next_and_stages_record_their_seconds_or_their_failure(tmp_path):
    log = StageLog(tmp_path / "run.log", echo=False)
    with log.stage("unpack"):
        time.sleep(0.05)
    assert (tmp_path / "run.log").read_text().count("\n") == 2  # read by another handle: already written
    with pytest.raises(ValueError), log.stage("ray.init"):
        raise ValueError("object store too big")
    log.close()
    lines = (tmp_path / "run.log").read_text().splitlines()
    assert re.fullmatch(r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d \+ +\d+\.\d\ds stage unpack: start", lines[0])
    assert lines[1].endswith(f"stage unpack: done in {log.stages['unpack']:.2f}s") and log.stages["unpack"] >= 0.05
    assert lines[3].endswith("stage ray.init: FAILED after 0.00s: ValueError: object store too big")
    assert "ray.init" not in log.stages


def test_the_watchdog_writes_every_threads_stack_once_per_quiet_spell_and_calls_the_diagnostic(tmp_path):
    log = StageLog(tmp_path / "run.log", echo=False)
    calls = []
    log.watch(stall_s=0.3, deadline_s=60, on_stall=lambda: calls.append(time.monotonic()))
    log("waiting for ray.get")
    time.sleep(1.6)  # one quiet spell: one report, however long it lasts
    log.close()
    text = (tmp_path / "run.log").read_text()
    assert text.count("watchdog: no progress for") == 1 and len(calls) == 1
    assert "test_the_watchdog_writes_every_threads_stack" in text  # this test's own frame, from the stack dump
