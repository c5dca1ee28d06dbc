"""Named workloads shared by benchmarks, examples and tests: name -> shapes and dtype.

Layout [batch, seq, heads, head_dim]; Hkv < H means GQA.
"""

import dataclasses


@dataclasses.dataclass(frozen=True)
class Workload:
    B: int
    T: int
    H: int
    Hkv: int
    D: int
    dtype: str = "bfloat16"

    def bytes_qkvo(self) -> int:
        """Fewest bytes a forward pass moves: q, k, v read once, o written once."""
        itemsize = {"bfloat16": 2, "float16": 2, "float32": 4}[self.dtype]
        return itemsize * self.B * self.T * self.D * (2 * self.H + 2 * self.Hkv)


WORKLOADS = {
    "b4-t8k-h16-d128": Workload(4, 8192, 16, 16, 128),
    "b1-t32k-h16-d128": Workload(1, 32768, 16, 16, 128),
    "b8-t4k-h32-d64": Workload(8, 4096, 32, 32, 64),
    "b2-t16k-h64-d128": Workload(2, 16384, 64, 64, 128),
    # CPU smoke run of the benchmark itself
    "tiny": Workload(1, 256, 4, 2, 32, "float32"),
}

GPU_WORKLOADS = ("b4-t8k-h16-d128", "b1-t32k-h16-d128", "b8-t4k-h32-d64", "b2-t16k-h64-d128")
