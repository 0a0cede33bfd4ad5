"""Run under torchrun: python -m torch.distributed.run --standalone --nproc_per_node=2 tests/teardown_check.py MODULE ARGS...

Runs MODULE.main(ARGS) and prints, per rank, this process's OS threads before
main() and after it returned: `threads R BEFORE AFTER`. Gloo runs 3 threads per
process group for as long as anything references the group; any reference that
outlives main() keeps them running into the interpreter's exit, where a thread
that still holds a tensor can abort the process ("terminate called without an
active exception"). After main() the count must be back to where it started."""
import importlib
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def threads():
    return len(os.listdir("/proc/self/task"))


if __name__ == "__main__":
    module = importlib.import_module(sys.argv[1])
    before = threads()
    module.main(sys.argv[2:])
    print(f"threads {os.environ['RANK']} {before} {threads()}", flush=True)
