"""TrainState: the one owner of iteration, consumed samples/tokens and the batch shape; and
the checkpoint format around it (version 1 checkpoints are upgraded, unknown ones refused)."""

import pytest

from megatron_ext.training.state import BatchSplitError, TrainState


def test_advance_counts_samples_and_tokens_at_the_current_batch():
    s = TrainState(seq_length=16, global_batch_size=8, micro_batch_size=2, data_parallel_size=2)
    assert s.num_microbatches == 2 and s.tokens_per_step == 128
    s.advance()
    assert s.set_batch(16, 4) and not s.set_batch(16, 4)
    s.advance()
    assert (s.iteration, s.consumed_samples, s.consumed_tokens) == (2, 24, 24 * 16)
    assert s.num_microbatches == 2


@pytest.mark.parametrize("gbs,mbs", [(6, 2), (0, 1), (8, 0)])
def test_unsplittable_batches_are_refused(gbs, mbs):
    s = TrainState(seq_length=16, global_batch_size=8, micro_batch_size=2, data_parallel_size=2)
    with pytest.raises(BatchSplitError, match="cannot be split"):
        s.set_batch(gbs, mbs)


def test_state_dict_round_trip_and_keep_batch():
    a = TrainState(16, 8, 2, 2)
    a.advance()
    a.set_batch(16, 2)
    a.advance()
    b = TrainState(16, 8, 2, 2)
    b.load_state_dict(a.state_dict())
    assert b == a
    c = TrainState(16, 4, 1, 2)  # a fixed-batch run resumed with other batch flags
    c.load_state_dict(a.state_dict(), keep_batch=True)
    assert (c.global_batch_size, c.consumed_samples, c.iteration) == (4, 24, 2)


def test_resume_under_another_dp_size_keeps_the_counts():
    a = TrainState(16, 8, 2, 2)
    a.advance()
    b = TrainState(16, 8, 1, 8)  # 8 ranks: the saved micro-batch 2 does not split 8
    with pytest.raises(BatchSplitError):
        b.load_state_dict(a.state_dict())


def test_version_1_loop_state_is_upgraded():
    from megatron_ext.training.checkpointing import FORMAT_VERSION, upgrade_loop_state

    v1 = {"iteration": 5,
          "data": {"sampler": {"consumed_samples": 40, "total_samples": 999, "steps": 5},
                   "consumed_samples": 40},
          "extensions": {"current_batch": 8, "current_micro": 2,
                         "lr_scaler": {"rule": "sqrt", "base_global_batch": 4,
                                       "last_b_simple": None},
                         "gns": {"version": 1, "estimator": {}, "history": []},
                         "controller": {"rule": "ramp"}},
          "parallel_layout": {"tp": 1, "pp": 1, "dp": 2, "cp": 1}, "model": {"num_layers": 2}}
    v2 = upgrade_loop_state(v1, "ckpt")
    assert v2["format_version"] == FORMAT_VERSION
    assert v2["train_state"] == {"iteration": 5, "consumed_samples": 40,
                                 "global_batch_size": 8, "micro_batch_size": 2}
    assert v2["data"] == {"total_samples": 999}
    assert v2["components"]["gns"] == v1["extensions"]["gns"]
    assert v2["components"]["batch_growth"]["controller"] == {"rule": "ramp"}
    assert upgrade_loop_state(v2, "ckpt") is v2
    s = TrainState(16, 4, 2, 2)
    s.load_state_dict(v2["train_state"])
    assert (s.consumed_tokens, s.global_batch_size) == (40 * 16, 8)


def test_unknown_format_version_is_one_line():
    from megatron_ext.training.checkpointing import CheckpointMismatch, upgrade_loop_state

    with pytest.raises(CheckpointMismatch, match="format version 7"):
        upgrade_loop_state({"format_version": 7}, "ckpt/iter_0000010")
