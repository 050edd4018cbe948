"""Run under torchrun by tests/test_train.py: trains with the given flags and saves this rank's final weights and
loss history to OUTDIR/rank{R}.pt, so the test can compare ranks with each other and with one process."""
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import train  # noqa: E402

if __name__ == "__main__":
    *flags, outdir = sys.argv[1:]
    cfg = train.parse_args(flags)
    d = train.setup_dist()
    result = train.train(cfg, d)
    torch.save({"model": result.model.state_dict(), "history": result.history}, Path(outdir) / f"rank{d.rank}.pt")
    if torch.distributed.is_initialized():  # also run without torchrun: one process
        torch.distributed.destroy_process_group()
