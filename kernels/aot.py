"""Ahead-of-time compilation of every Triton kernel configuration for NVIDIA GPUs, without a GPU.

Uses Triton's own pipeline (``triton.compile(ASTSource(...), target=GPUTarget("cuda", cc, 32))``)
down to a cubin for each entry of ``kernels.triton_configs.TABLE`` and each target architecture,
and reads registers / shared memory / local memory (spills) with the ``cuobjdump`` shipped in the
Triton wheel.  That proves every configuration the dispatch can pick compiles for sm_80 / sm_90.

Pointer arguments are compiled as 16-byte aligned (torch allocations are; it is also what the JIT
specialises on); integer arguments are left unspecialised, so the JIT may build variants that
differ slightly (e.g. ``n_cols`` divisible by 16) at run time.
"""

from __future__ import annotations

import re
import subprocess
import tempfile
import time
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from triton.runtime.jit import JITFunction

from kernels import triton_bias_gelu, triton_cross_entropy, triton_distillation, triton_layer_norm
from kernels.triton_configs import LaunchConfig, all_configs

#: Target compute capabilities: A100 (sm_80) and H100 (sm_90).
ARCHS: tuple[int, ...] = (80, 90)

_MODULES = (triton_layer_norm, triton_bias_gelu, triton_cross_entropy, triton_distillation)


@dataclass
class CompiledVariant:
    """One configuration compiled for one architecture, with its resource usage."""

    kernel: str
    dtype: str
    constexprs: dict[str, int]
    num_warps: int
    arch: int
    registers: int
    static_shared_bytes: int
    dynamic_shared_bytes: int
    local_bytes: int
    stack_bytes: int
    compile_seconds: float
    cubin_bytes: int = field(default=0)

    def as_dict(self) -> dict[str, object]:
        return asdict(self)


def _registry() -> dict[str, tuple[object, object]]:
    """kernel name -> (kernel object, its module's ``aot_signature``)."""
    return {name: (kernel, mod.aot_signature) for mod in _MODULES for name, kernel in mod.KERNELS.items()}


def _as_jit(kernel: object) -> JITFunction:
    """A compilable JITFunction even when the modules were imported under TRITON_INTERPRET=1."""
    if isinstance(kernel, JITFunction):
        return kernel
    return JITFunction(kernel.fn)  # an InterpretedFunction keeps the plain Python function in .fn


def source_for(cfg: LaunchConfig) -> ASTSource:
    kernel, signature_of = _registry()[cfg.kernel]
    fn = _as_jit(kernel)
    signature = signature_of(cfg.kernel, cfg.dtype)
    missing = set(fn.arg_names) ^ set(signature)
    if missing:
        raise ValueError(f"{cfg.kernel}: AOT signature out of sync with the kernel arguments: {sorted(missing)}")
    aligned = [["tt.divisibility", 16]]
    attrs = {(i,): aligned for i, name in enumerate(fn.arg_names) if signature[name].startswith("*")}
    return ASTSource(fn=fn, signature=signature, constexprs=cfg.constants, attrs=attrs)


def cuobjdump_path() -> str:
    return triton.knobs.nvidia.cuobjdump.path


def resource_usage(cubin: bytes) -> dict[str, int]:
    """REG / SHARED / LOCAL / STACK of the (single) kernel in ``cubin``, from ``cuobjdump``."""
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        out = subprocess.run(
            [cuobjdump_path(), "--dump-resource-usage", f.name], check=True, capture_output=True, text=True
        ).stdout
    _, found, after = out.partition("Function ")
    fields = dict(re.findall(r"\b(REG|SHARED|LOCAL|STACK):(\d+)", after))
    if not found or "REG" not in fields:
        raise RuntimeError(f"no resource usage in cuobjdump output:\n{out}")
    return {key: int(fields.get(key, 0)) for key in ("REG", "SHARED", "LOCAL", "STACK")}


def compile_config(cfg: LaunchConfig, arch: int) -> CompiledVariant:
    """Compile one configuration to a cubin for ``sm_<arch>``; raises if Triton cannot compile it."""
    start = time.perf_counter()
    compiled = triton.compile(source_for(cfg), target=GPUTarget("cuda", arch, 32), options=cfg.launch_options)
    seconds = time.perf_counter() - start
    cubin = compiled.asm["cubin"]
    usage = resource_usage(cubin)
    return CompiledVariant(
        kernel=cfg.kernel,
        dtype=cfg.dtype,
        constexprs=cfg.constants,
        num_warps=cfg.num_warps,
        arch=arch,
        registers=usage["REG"],
        static_shared_bytes=usage["SHARED"],
        dynamic_shared_bytes=int(compiled.metadata.shared),
        local_bytes=usage["LOCAL"],
        stack_bytes=usage["STACK"],
        compile_seconds=round(seconds, 3),
        cubin_bytes=len(cubin),
    )


def compile_all(archs: Iterable[int] = ARCHS, configs: Iterable[LaunchConfig] | None = None) -> list[CompiledVariant]:
    """Every configuration x every architecture (what the dispatch can launch on an A100/H100)."""
    chosen = list(configs) if configs is not None else all_configs()
    return [compile_config(cfg, arch) for arch in archs for cfg in chosen]
