"""Apply a recipe's engine section to the kernel dispatch (the only link between recipes and kernels/)."""

from __future__ import annotations

from trainer.recipe import EngineSection


def configure_kernels(engine: EngineSection) -> None:
    from kernels import dispatch

    dispatch.configure(use_triton=engine.kernels, compile_reference=engine.compile_reference)
