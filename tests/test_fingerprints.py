"""What a resume and the eval base-answer cache must match: the fingerprints."""

from __future__ import annotations

import pytest

from kolora import checkpoint as ckpt
from kolora.errors import KoloraError


def fingerprints(**changes) -> dict:
    fp = {"model": "m", "model_name": "tiny", "lora": {"r": 4}, "data": "d", "data_path": "x.csv", "train_rows": 10,
          "batching": [4, 2, 2], "seed": 42}
    fp.update(changes)
    return fp


@pytest.mark.parametrize("changes,expected", [
    ({"batching": [4, 2, 1]}, "2 processes then, 1 now"),
    ({"batching": [2, 2, 2]}, "train.batch_size: 4 then, 2 now"),
    ({"batching": [4, 4, 2]}, "train.grad_accum: 2 then, 4 now"),
    ({"seed": 7}, "train.seed: 42 then, 7 now"),
])
def test_resume_compares_batching_and_seed(changes, expected, tmp_path):
    with pytest.raises(KoloraError) as e:
        ckpt.compare_fingerprints(fingerprints(), fingerprints(**changes), tmp_path)
    line = e.value.one_line()
    assert "cannot resume" in line and expected in line and "\n" not in line


def test_a_checkpoint_from_before_the_seed_was_kept_still_resumes(tmp_path):
    old = fingerprints()
    del old["seed"]
    ckpt.compare_fingerprints(old, fingerprints(seed=7), tmp_path)
    ckpt.compare_fingerprints(fingerprints(), fingerprints(), tmp_path)
