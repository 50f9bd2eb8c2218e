"""Loaded by tests/training/test_sharded_checkpoint.py's killed launch (on PYTHONPATH there only): the sharded save
at step $FEWSTEP_TEST_HANG_SAVE_AT writes its shards, then hangs before the checkpoint is committed, so the test can
kill -9 every process in the middle of a save."""

import os

_AT = os.environ.get("FEWSTEP_TEST_HANG_SAVE_AT")

if _AT:
    import time

    from fewstep.training import sharded_checkpoint

    _original = sharded_checkpoint.save

    def _save(folder, state, background=False):
        written = _original(folder, state, background=background)
        if os.path.basename(str(folder)).startswith(f".tmp_step_{int(_AT):07d}_"):
            time.sleep(3600)
        return written

    sharded_checkpoint.save = _save
