"""StopConditions without a launch: the --exit-duration-in-mins estimate."""
import time
from types import SimpleNamespace

import megatron_ext.training.stopping as stopping


def test_exit_duration_counts_steps_not_startup_or_saves(monkeypatch):
    """One more step is the longest *step*: a slow start-up (model build, checkpoint load)
    before the first step and a save between two steps do not count as steps."""
    monkeypatch.setattr(stopping.signal, "signal", lambda *a: None)
    stop = stopping.StopConditions(SimpleNamespace(exit_duration_in_mins=1.0), "cpu")
    stop.start = time.time() - 50  # 50 s of start-up already spent
    assert not stop._out_of_time(save_seconds=4.0, step_seconds=1.0)   # 50 + 1 + 4 < 60
    assert not stop._out_of_time(save_seconds=4.0, step_seconds=0.5)   # longest stays 1 s
    assert stop._out_of_time(save_seconds=4.0, step_seconds=6.5)       # 50 + 6.5 + 4 > 60
