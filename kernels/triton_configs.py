"""The explicit, enumerable table of Triton launch configurations.

Both ``kernels.dispatch`` (which picks one per call) and ``kernels.aot`` (which compiles every
one of them for sm_80 and sm_90) read this table, so a configuration the dispatch can choose is
by construction one that was compiled ahead of time.  Pure Python: importing it never imports
torch or triton.
"""

from __future__ import annotations

from dataclasses import dataclass

#: Element types of the activation tensors a kernel can be launched with (Triton spelling).
DTYPES: tuple[str, ...] = ("fp32", "fp16", "bf16")

#: LayerNorm keeps one row in registers: the block is the smallest power of two >= hidden size.
LAYER_NORM_BLOCKS: tuple[int, ...] = (128, 256, 512, 1024, 2048, 4096)

#: Vocabulary-sized row kernels loop over the vocabulary in blocks of this many columns.
SMALL_VOCAB_BLOCK = 1024
LARGE_VOCAB_BLOCK = 4096
VOCAB_BLOCKS: tuple[int, ...] = (SMALL_VOCAB_BLOCK, LARGE_VOCAB_BLOCK)

#: Sparse (top-k) distillation holds the k teacher entries of a row in one block.
TOPK_BLOCKS: tuple[int, ...] = (16, 64, 256)

#: Elementwise bias + GELU works on flat blocks of this many elements.
GELU_BLOCK = 1024

#: FMA contraction is requested explicitly so the JIT launch and the AOT compile agree.
ENABLE_FP_FUSION = True


@dataclass(frozen=True)
class LaunchConfig:
    """One compiled variant of one kernel: its constexpr block sizes, dtype and launch options."""

    kernel: str
    dtype: str
    constexprs: tuple[tuple[str, int], ...]
    num_warps: int
    num_stages: int = 1

    @property
    def constants(self) -> dict[str, int]:
        return dict(self.constexprs)

    @property
    def launch_options(self) -> dict[str, object]:
        return {
            "num_warps": self.num_warps,
            "num_stages": self.num_stages,
            "enable_fp_fusion": ENABLE_FP_FUSION,
        }

    @property
    def name(self) -> str:
        blocks = ",".join(f"{k}={v}" for k, v in self.constexprs)
        return f"{self.kernel}[{self.dtype};{blocks};w{self.num_warps}]"


def _layer_norm_warps(block: int) -> int:
    return min(max(block // 256, 1), 16)


def _vocab_warps(block: int) -> int:
    return 4 if block <= SMALL_VOCAB_BLOCK else 8


def _build_table() -> dict[tuple[str, str, int | tuple[int, ...]], LaunchConfig]:
    table: dict[tuple[str, str, int | tuple[int, ...]], LaunchConfig] = {}
    for dtype in DTYPES:
        for block in LAYER_NORM_BLOCKS:
            for kernel in ("layer_norm_fwd_kernel", "layer_norm_bwd_kernel"):
                table[(kernel, dtype, block)] = LaunchConfig(
                    kernel, dtype, (("BLOCK_N", block),), _layer_norm_warps(block)
                )
        for kernel in ("bias_gelu_fwd_kernel", "bias_gelu_bwd_kernel"):
            table[(kernel, dtype, GELU_BLOCK)] = LaunchConfig(kernel, dtype, (("BLOCK", GELU_BLOCK),), 4)
        for vblock in VOCAB_BLOCKS:
            for kernel in ("cross_entropy_fwd_grad_kernel", "kd_dense_fwd_grad_kernel"):
                table[(kernel, dtype, vblock)] = LaunchConfig(
                    kernel, dtype, (("BLOCK_V", vblock),), _vocab_warps(vblock)
                )
            for kblock in TOPK_BLOCKS:
                table[("kd_sparse_fwd_grad_kernel", dtype, (vblock, kblock))] = LaunchConfig(
                    "kd_sparse_fwd_grad_kernel",
                    dtype,
                    (("BLOCK_V", vblock), ("BLOCK_K", kblock)),
                    _vocab_warps(vblock),
                )
    return table


TABLE = _build_table()


def all_configs() -> list[LaunchConfig]:
    """Every configuration the dispatch can ever choose (what AOT compiles)."""
    return list(TABLE.values())


def _smallest_at_least(options: tuple[int, ...], n: int) -> int | None:
    return next((b for b in options if b >= n), None)


def vocab_block(n_cols: int) -> int:
    return SMALL_VOCAB_BLOCK if n_cols <= SMALL_VOCAB_BLOCK else LARGE_VOCAB_BLOCK


def select_layer_norm(dtype: str, n_cols: int) -> tuple[LaunchConfig, LaunchConfig] | None:
    """(forward, backward) configs, or None when the row does not fit a block (reference path)."""
    block = _smallest_at_least(LAYER_NORM_BLOCKS, n_cols)
    if block is None or dtype not in DTYPES:
        return None
    return TABLE[("layer_norm_fwd_kernel", dtype, block)], TABLE[("layer_norm_bwd_kernel", dtype, block)]


def select_bias_gelu(dtype: str) -> tuple[LaunchConfig, LaunchConfig] | None:
    if dtype not in DTYPES:
        return None
    fwd = TABLE[("bias_gelu_fwd_kernel", dtype, GELU_BLOCK)]
    return fwd, TABLE[("bias_gelu_bwd_kernel", dtype, GELU_BLOCK)]


def select_cross_entropy(dtype: str, n_cols: int) -> LaunchConfig | None:
    if dtype not in DTYPES:
        return None
    return TABLE[("cross_entropy_fwd_grad_kernel", dtype, vocab_block(n_cols))]


def select_kd_dense(dtype: str, n_cols: int) -> LaunchConfig | None:
    if dtype not in DTYPES:
        return None
    return TABLE[("kd_dense_fwd_grad_kernel", dtype, vocab_block(n_cols))]


def select_kd_sparse(dtype: str, n_cols: int, k: int) -> LaunchConfig | None:
    """None when k exceeds the largest top-k block (the reference handles that)."""
    kblock = _smallest_at_least(TOPK_BLOCKS, k)
    if kblock is None or dtype not in DTYPES:
        return None
    return TABLE[("kd_sparse_fwd_grad_kernel", dtype, (vocab_block(n_cols), kblock))]
