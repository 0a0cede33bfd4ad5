"""Run under torchrun: python -m torch.distributed.run --standalone --nproc_per_node=2 tests/fault_dist_check.py FAULT MODULE ARGS...

Runs MODULE.main(ARGS) with one fault in rank 1 (FAULT; "none": no fault):
  fail-at-load   rank 1 cannot read its data (common.dataset ends in common.fail);
  fail-at-step   rank 1 ends in common.fail at the 2nd step it trains (a bad image, say);
  kill-at-step   rank 1 is killed (SIGKILL, as the out-of-memory killer does) at the 2nd step it trains.
The test reads each rank's stderr from torchrun's --log-dir."""
import functools
import importlib
import os
import signal
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import common  # noqa: E402


def at_step_2(end_step, act):
    steps = []

    @functools.wraps(end_step)
    def patched(self, loss, z):
        steps.append(1)
        if len(steps) == 2:
            act()
        return end_step(self, loss, z)
    return patched


if __name__ == "__main__":
    fault, name, args = sys.argv[1], sys.argv[2], sys.argv[3:]
    if os.environ["RANK"] == "1":
        if fault == "fail-at-load":
            common.dataset = lambda *a, **k: common.fail("rank one cannot read its data")
        elif fault == "fail-at-step":
            common.Run.end_step = at_step_2(common.Run.end_step, lambda: common.fail("rank one fails at step 2"))
        elif fault == "kill-at-step":
            common.Run.end_step = at_step_2(common.Run.end_step, lambda: os.kill(os.getpid(), signal.SIGKILL))
    importlib.import_module(name).main(args)
