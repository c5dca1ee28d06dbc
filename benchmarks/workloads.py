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
    "b1-t128k-h16-d128": Workload(1, 131072, 16, 16, 128),  # one long sequence (issue 17's fourth workload)
    # CPU smoke run of the benchmark itself
    "tiny": Workload(1, 256, 4, 2, 32, "float32"),
}

GPU_WORKLOADS = ("b4-t8k-h16-d128", "b1-t32k-h16-d128", "b8-t4k-h32-d64", "b2-t16k-h64-d128")


@dataclasses.dataclass(frozen=True)
class AttentionWorkload:
    """A softmax attention call: q [B, T, H, D], k and v [B, T, Hkv, D], with its mask options."""

    B: int
    T: int
    H: int
    Hkv: int
    D: int
    dtype: str = "bfloat16"
    causal: bool = True
    window: int | None = None  # sliding_window (left; causal cuts the right side)
    soft_cap: float | None = None

    def allowed_pairs(self) -> int:
        """(query, key) pairs the mask allows, per batch row and head."""
        T = self.T
        if not self.causal:
            if self.window is None:
                return T * T
            w = self.window
            return sum(min(i + w, T - 1) - max(i - w, 0) + 1 for i in range(T))
        if self.window is None:
            return T * (T + 1) // 2
        w = min(self.window, T - 1)
        return (w + 1) * T - w * (w + 1) // 2  # query i sees min(i, w) + 1 keys

    def flops_fwd(self) -> int:
        """Matmul FLOPs of the forward pass over the allowed pairs: q.k and p.v."""
        return 4 * self.B * self.H * self.D * self.allowed_pairs()

    def bytes_qkvo(self) -> int:
        itemsize = {"bfloat16": 2, "float16": 2, "float32": 4}[self.dtype]
        return itemsize * self.B * self.T * self.D * (2 * self.H + 2 * self.Hkv)


ATTENTION_WORKLOADS = {
    "causal-b4-t8k-h16-d128": AttentionWorkload(4, 8192, 16, 16, 128),
    "causal-b1-t32k-h16-d128": AttentionWorkload(1, 32768, 16, 16, 128),
    "gqa32/8-b1-t32k-d128": AttentionWorkload(1, 32768, 32, 8, 128),
    "window4096-b1-t32k-h16-d128": AttentionWorkload(1, 32768, 16, 16, 128, window=4096),
    "softcap50-b4-t8k-h16-d128": AttentionWorkload(4, 8192, 16, 16, 128, soft_cap=50.0),
}
