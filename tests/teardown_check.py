"""Run under torchrun: python -m torch.distributed.run --standalone --nproc_per_node=2 tests/teardown_check.py DIR MODULE ARGS...

Runs MODULE.main(ARGS) and writes, per rank, this process's OS threads before
main() and after it returned to DIR/threads.RANK as `BEFORE AFTER` (a file per
rank: two ranks printing to one pipe can interleave their lines). Gloo runs 3 threads per
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
    folder, name, args = sys.argv[1], sys.argv[2], sys.argv[3:]
    module = importlib.import_module(name)
    before = threads()
    module.main(args)
    with open(os.path.join(folder, f"threads.{os.environ['RANK']}"), "w") as f:
        f.write(f"{before} {threads()}\n")
