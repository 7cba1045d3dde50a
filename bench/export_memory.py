"""Host memory of `ftkit export`: peak anonymous RSS while exporting a random-init model much larger than one shard,
against the model's size, its largest tensor and the shard size; then the same bound at the 26B model's sizes.

    OMP_NUM_THREADS=1 python bench/export_memory.py [--layers 4] [--shard-mb 16]

Anonymous RSS (RssAnon) is sampled every 2 ms in a thread: it counts what the export allocates (tensors, shard
buffers), not the page cache of the memory-mapped base files, which the kernel can drop at will.
"""

from __future__ import annotations

import argparse
import copy
import json
import shutil
import tempfile
import threading
import time
from pathlib import Path

import torch


def rss_anon() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("RssAnon:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError("no RssAnon in /proc/self/status (Linux only)")


class PeakSampler:
    def __init__(self):
        self.peak, self.stop = 0, threading.Event()

    def __enter__(self):
        self.baseline = rss_anon()
        self.thread = threading.Thread(target=self.run, daemon=True)
        self.thread.start()
        return self

    def run(self):
        while not self.stop.is_set():
            self.peak = max(self.peak, rss_anon())
            time.sleep(0.002)

    def __exit__(self, *exc):
        self.stop.set()
        self.thread.join()


def make_run(root: Path, layers: int) -> Path:
    from ftkit.model.char_tokenizer import build_char_tokenizer
    from ftkit.model.load import build_tiny
    from ftkit.model.lora import attach_lora
    from ftkit.recipe import recipe_from_dict

    tiny = {
        "layers": layers,
        "hidden": 512,
        "heads": 4,
        "kv_heads": 2,
        "head_dim": 64,
        "global_head_dim": 64,
        "intermediate": 512,
        "experts": 32,
        "top_k": 2,
        "expert_intermediate": 512,
        "canvas_length": 32,
    }
    run = root / "run"
    run.mkdir(parents=True)
    recipe = recipe_from_dict(
        {
            "model": {"base": "tiny", "tiny": tiny},
            "task": {"name": "sudoku"},
            "lora": {"r": 8, "alpha": 16, "dense_mlp": True},
            "train": {"output_dir": str(run)},
        }
    )
    (run / "recipe.yaml").write_text(recipe.to_yaml())
    tok = build_char_tokenizer()
    tok.save_pretrained(run)
    base = build_tiny(recipe.model.tiny, tok).to(torch.bfloat16)  # the real base is bf16 on disk
    base.save_pretrained(run / "base")
    model = attach_lora(copy.deepcopy(base).float(), recipe.lora)
    model.save_pretrained(run)
    (run / "summary.json").write_text("{}")
    del base, model
    return run


def tensor_sizes(folder: Path) -> list[int]:
    from safetensors import safe_open

    sizes = []
    for path in folder.glob("model*.safetensors"):
        with safe_open(str(path), framework="pt") as f:
            for key in f.keys():
                view = f.get_slice(key)
                n = 1
                for d in view.get_shape():
                    n *= d
                sizes.append(n * 2)  # bf16
    return sizes


def bound(shard: int, largest: int, chunk: int) -> int:
    """What the export holds at most: the shard being filled (a tensor bigger than a shard gets one alone), the
    source tensor being converted, and one fp32 chunk of an expert update (factors included)."""
    return max(shard, largest) + largest + chunk


def real_model_bound(shard_bytes: int) -> dict[str, float]:
    """The largest tensors of google/diffusiongemma-26B-A4B-it and the export's bound at those sizes (GB)."""
    hidden, experts, expert_inter, vocab, r = 2816, 128, 704, 262144, 16
    gate_up = experts * 2 * expert_inter * hidden * 2  # bf16 bytes
    embed = vocab * hidden * 2
    largest = max(gate_up, embed)
    factors = (experts * r * hidden + 2 * expert_inter * r * experts) * 4  # gate_up's expert LoRA, fp32
    chunk = 4 * 2**20 * 4 + factors
    return {
        "largest tensor (embeddings)": largest / 1e9,
        "expert gate_up_proj of one layer": gate_up / 1e9,
        "shard": shard_bytes / 1e9,
        "bound": bound(shard_bytes, largest, chunk) / 1e9,
    }


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--shard-mb", type=int, default=16)
    parser.add_argument("--default-malloc", action="store_true", help="Leave glibc's dynamic mmap threshold on.")
    args = parser.parse_args()
    from ftkit.export import export_run
    from ftkit.export.shards import return_freed_memory_to_os

    if not args.default_malloc:
        return_freed_memory_to_os()  # as `ftkit export` does

    root = Path(tempfile.mkdtemp(prefix="ftkit-export-bench-"))
    try:
        run = make_run(root, args.layers)
        base_bytes = sum(p.stat().st_size for p in (run / "base").glob("*.safetensors"))
        with PeakSampler() as sampler:
            record = export_run(run, root / "out", max_shard_size=f"{args.shard_mb}MB")
        sizes = tensor_sizes(root / "out")
        out_bytes = sum(sizes)
        rows = [
            ("form", record["form"]),
            ("base checkpoint (bf16)", f"{base_bytes / 2**20:.1f} MiB"),
            ("export (bf16, untied)", f"{out_bytes / 2**20:.1f} MiB"),
            ("largest tensor", f"{max(sizes) / 2**20:.1f} MiB"),
            ("max shard size", f"{args.shard_mb} MiB"),
            ("peak anonymous RSS above baseline", f"{(sampler.peak - sampler.baseline) / 2**20:.1f} MiB"),
            (
                "bound: max(shard, largest) + largest + 16 MiB fp32 chunk",
                f"{bound(args.shard_mb * 2**20, max(sizes), 16 * 2**20) / 2**20:.1f} MiB",
            ),
        ]
        width = max(len(k) for k, _ in rows)
        print(f"ftkit export host memory, {args.layers}-layer random-init model")
        for key, value in rows:
            print(f"  {key:<{width}}  {value}")
        print("derived for google/diffusiongemma-26B-A4B-it (4 GB shards, the default):")
        for key, value in real_model_bound(4 * 10**9).items():
            print(f"  {key:<{width}}  {value:.2f} GB")
        print(json.dumps({"files": len(record["files"])}))
    finally:
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
