"""Each process of a torchrun launch calls ftkit.model.load.load_in_turns with a stand-in load that records when it ran.

usage: torchrun --nproc_per_node N tests/helpers/load_turns.py OUT_DIR
Writes OUT_DIR/rank{R}.json: {"rank", "local_rank", "start", "end", "returned"} (wall-clock seconds).
"""

import json
import os
import sys
import time
from pathlib import Path

import torch.distributed as dist

from ftkit.model.load import load_in_turns


def main(out: Path) -> None:
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    span = {}

    def load():
        span["start"] = time.time()
        time.sleep(0.5)  # long enough that two loads running together would overlap
        span["end"] = time.time()
        return f"model of rank {rank}"

    returned = load_in_turns(load)
    record = {"rank": rank, "local_rank": int(os.environ["LOCAL_RANK"]), **span, "returned": returned}
    (out / f"rank{rank}.json").write_text(json.dumps(record))
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main(Path(sys.argv[1]))
