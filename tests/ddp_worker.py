"""Run under torchrun by tests/test_train.py: trains once for each flag set (flag sets separated by `--then`,
all in one process group, so the launch and imports are paid once) and saves this rank's final weights and
loss history of run k to OUTDIR/run{k}.rank{R}.pt, so the test can compare ranks with each other and with one
process."""
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import train  # noqa: E402

if __name__ == "__main__":
    *flags, outdir = sys.argv[1:]
    runs: list[list[str]] = [[]]
    for f in flags:
        if f == "--then":
            runs.append([])
        else:
            runs[-1].append(f)
    d = train.setup_dist()
    for k, run in enumerate(runs):
        result = train.train(train.parse_args(run), d)
        torch.save({"model": result.model.state_dict(), "history": result.history},
                   Path(outdir) / f"run{k}.rank{d.rank}.pt")
    if torch.distributed.is_initialized():  # also run without torchrun: one process
        torch.distributed.destroy_process_group()
