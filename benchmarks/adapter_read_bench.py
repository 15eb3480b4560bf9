"""Reading an adapter's safetensors file: the library's parser (what blora uses) against alternatives.

Variants, alternated in one process (medians of ``--repeats``), hot (page cache) and cold (the file
evicted with ``posix_fadvise(DONTNEED)`` before each read):
- ``blora``: ``blora.lora.weights.read_safetensors`` (header checked first, then
  ``safetensors.torch.load`` on the bytes read in one call);
- ``zero_copy``: a hand-written reader making views of one buffer (what blora used before; it skipped
  checks the library makes, e.g. overlapping offsets);
- ``load_file``: ``safetensors.torch.load_file`` (mmap, one copy per tensor).

    python benchmarks/adapter_read_bench.py [--repeats 9]
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import tempfile
import time
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from blora.lora.weights import read_safetensors

DEMO = (
    Path(__file__).resolve().parents[1] / "blora" / "demo" / "adapters" / "json" / "adapter_model.safetensors"
)
_DTYPES = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16}


def zero_copy(path: Path) -> dict[str, torch.Tensor]:
    data = bytearray(path.stat().st_size)
    with open(path, "rb", buffering=0) as f:
        f.readinto(data)
    n = int.from_bytes(data[:8], "little")
    out = {}
    for key, info in json.loads(bytes(data[8 : 8 + n])).items():
        if key != "__metadata__":
            start, end = info["data_offsets"]
            dtype = _DTYPES[info["dtype"]]
            view = memoryview(data)[8 + n + start : 8 + n + end]
            out[key] = torch.frombuffer(view, dtype=dtype, count=math.prod(info["shape"])).view(info["shape"])
    return out


def blora(path: Path) -> dict[str, torch.Tensor]:
    with open(path, "rb", buffering=0) as f:
        return read_safetensors(f, path, "bench", lambda *_: None)


def library_load_file(path: Path) -> dict[str, torch.Tensor]:
    return load_file(str(path))


def evict(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    os.close(fd)


def synthetic(path: Path) -> Path:
    """30 layers x 7 modules at r=16 with SmolLM2-135M's shapes, float32 (~18 MiB)."""
    shapes = {"q": (576, 576), "k": (576, 192), "v": (576, 192), "o": (576, 576), "g": (576, 1536),
              "u": (576, 1536), "d": (1536, 576)}  # fmt: skip
    tensors = {}
    for layer in range(30):
        for m, (i, o) in shapes.items():
            tensors[f"base_model.model.model.layers.{layer}.{m}.lora_A.weight"] = torch.randn(16, i)
            tensors[f"base_model.model.model.layers.{layer}.{m}.lora_B.weight"] = torch.randn(o, 16)
    save_file(tensors, str(path))
    return path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=9)
    args = parser.parse_args()
    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as tmp:
        files = [DEMO, synthetic(Path(tmp) / "big.safetensors")]
        variants = [blora, zero_copy, library_load_file]
        for path in files:
            for cold in (False, True):
                times: dict[str, list[float]] = {v.__name__: [] for v in variants}
                for _ in range(args.repeats):
                    for variant in variants:
                        if cold:
                            evict(path)
                        t0 = time.perf_counter()
                        variant(path)
                        times[variant.__name__].append(time.perf_counter() - t0)
                ref = statistics.median(times["blora"])
                cells = ", ".join(
                    f"{k} {1000 * statistics.median(v):.1f} ms ({statistics.median(v) / ref:.2f}x)"
                    for k, v in times.items()
                )
                size = path.stat().st_size / 2**20
                print(f"{path.name} {size:.1f} MiB {'cold' if cold else 'hot '}: {cells}")


if __name__ == "__main__":
    main()
