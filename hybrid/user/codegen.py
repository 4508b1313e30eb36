"""LLVM plumbing shared by the JIT and the AOT engine.

Initialization of the native target (once, on first use), target machines
for the host, and :func:`optimized_module`: lower a program, parse the IR
into LLVM and run the ``-O3`` pipeline of the new pass manager.  Errors
from LLVM (which llvmlite reports as ``RuntimeError``) become
:class:`~hybrid.errors.EngineError` naming the program.
"""

from __future__ import annotations

import functools

import llvmlite.binding as llvm

from hybrid.errors import EngineError
from hybrid.user.lower import ENTRY, LddwResolver, lower
from hybrid.user.program import Program

OPT_LEVEL = 3


@functools.cache
def init_llvm() -> None:
    """Register the host target and its assembly printer with LLVM, once."""
    llvm.initialize_native_target()
    llvm.initialize_native_asmprinter()


@functools.cache
def host_cpu() -> tuple[str, str]:
    """The host's CPU name and feature string, as ``-march=native`` would use."""
    init_llvm()
    return llvm.get_host_cpu_name(), llvm.get_host_cpu_features().flatten()


def target_machine(*, jit: bool, cpu: str | None = None, features: str | None = None) -> llvm.TargetMachine:
    """A fresh ``-O3`` target machine for the host.

    ``jit=True``: for MCJIT (the execution engine takes ownership of it).
    ``jit=False``: position-independent code for a shared object.  ``cpu``
    and ``features`` default to the host's (the code runs where it is built).
    """
    init_llvm()
    name, feats = host_cpu()
    target = llvm.Target.from_triple(llvm.get_process_triple())
    return target.create_target_machine(
        cpu=name if cpu is None else cpu,
        features=feats if features is None else features,
        opt=OPT_LEVEL,
        reloc="default" if jit else "pic",
        codemodel="jitdefault" if jit else "default",
        jit=jit,
    )


def parse(ir_text: str, program: Program, tm: llvm.TargetMachine) -> llvm.ModuleRef:
    """Parse and verify lowered IR, with the triple and data layout of ``tm``."""
    try:
        mod = llvm.parse_assembly(ir_text)
        mod.verify()
    except RuntimeError as e:
        raise EngineError("program %r: LLVM rejected the lowered IR: %s" % (program.name, e)) from None
    mod.name = program.name
    mod.triple = tm.triple
    mod.data_layout = str(tm.target_data)
    return mod


def optimize(mod: llvm.ModuleRef, tm: llvm.TargetMachine, level: int = OPT_LEVEL) -> None:
    """Run the default ``-O<level>`` module pipeline (new pass manager) in place."""
    pto = llvm.create_pipeline_tuning_options(speed_level=level)
    pto.loop_vectorization = level >= 2
    pto.slp_vectorization = level >= 2
    pto.loop_unrolling = True
    pb = llvm.create_pass_builder(tm, pto)
    pb.getModulePassManager().run(mod, pb)


def optimized_module(program: Program, tm: llvm.TargetMachine, *, entry: str = ENTRY,
                     resolve_lddw: LddwResolver | None = None, level: int = OPT_LEVEL) -> llvm.ModuleRef:
    """Lower ``program``, parse it into LLVM and optimize it for ``tm``."""
    mod = parse(str(lower(program, entry, resolve_lddw)), program, tm)
    optimize(mod, tm, level)
    return mod


def assembly(ir_text: str, program: Program) -> str:
    """Native assembly of (already optimized) IR, for debugging."""
    tm = target_machine(jit=False)
    return tm.emit_assembly(parse(ir_text, program, tm))
