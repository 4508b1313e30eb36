"""``hybrid aot build``: one program of an eBPF object, its maps and helpers, as a native binary.

The object is loaded as ``hybrid.load(path, kernel=False)`` loads it (the
maps are created and filled: global data, map ``values``, prog arrays), then:

1. the program, and the programs its tail calls can reach, are lowered by the
   JIT's lowering (:mod:`hybrid.user.lower`) with every map address written as
   ``@hybrid_sa_region + offset``, a relocation, instead of the loading
   process's address; optimized and compiled by LLVM into one object file;
2. the maps' memory (one region, :mod:`hybrid.user.maps`) is copied: its
   non-zero pages go into the binary, the region itself is a page-aligned
   ``.bss`` array that a constructor fills from them (``standalone.c``);
3. ``cc`` links that with ``standalone.c`` and the helper runtime of
   ``hybrid/native`` (:data:`RUNTIME_SOURCES`: everything but the agent) into
   an executable (with ``main``) or a shared library (``--lib``: only the
   ``NAME_*`` functions of ``standalone.h`` exported, the header written
   next to it).  Nothing is needed at run time but libc.

Helpers that need a kernel or a traced process (:data:`NEEDS_PROCESS`) are
refused here, before anything is compiled.
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import re
import shutil
import subprocess
import tempfile
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping

from hybrid.errors import AotError, EngineError

HERE = Path(__file__).resolve().parent
NATIVE = HERE.parent / "native"

# The helper runtime compiled into every binary: hybrid/native without agent.c (probes, trampolines).
RUNTIME_SOURCES = ("runtime.c", "maps.c", "helpers.c", "ring.c", "stats.c")
GLUE = "standalone.c"
HEADER_TEMPLATE = "standalone.h"

REGION = "hybrid_sa_region"  # the maps' memory in the binary (image.c), what map addresses are relative to
ENTRY = "hybrid_sa_prog_%d"  # program n's entry point, uint64_t (void *ctx, uint64_t len)
PAGE = 4096
EXE_PREFIX = "hybrid_sa"  # the prefix of the C interface inside an executable (not exported)

# Helpers refused at build time: what they read or act on exists only in the kernel or in a traced process.
NEEDS_PROCESS = frozenset((
    # a traced process's memory
    "probe_read", "probe_read_str", "probe_read_user", "probe_read_user_str", "probe_read_kernel",
    "probe_read_kernel_str", "probe_write_user",
    # the current (traced) task
    "get_current_pid_tgid", "get_current_uid_gid", "get_current_comm", "get_current_task",
    "get_ns_current_pid_tgid", "send_signal", "send_signal_thread",
    # the probe that runs the program, its registers and stack
    "get_func_ip", "get_attach_cookie", "get_func_arg", "get_func_ret", "get_func_arg_cnt", "override_return",
    "get_stack", "get_stackid",
))

PathLike = str | os.PathLike


@dataclass(frozen=True)
class Built:
    """What :func:`build` wrote: the binary, the header of a library (else None), the IR file (else None)."""

    path: Path
    header: Path | None
    llvm_ir: Path | None
    programs: tuple[str, ...]  # the programs compiled in, the one run first


def build(obj_path: PathLike, out: PathLike, *, program: str | None = None, lib: bool = False,
          name: str | None = None, emit_llvm: PathLike | None = None, native: bool = False,
          values: Mapping[str, int | bytes] | None = None) -> Built:
    """Compile program ``program`` of the eBPF object ``obj_path`` into the executable (or, with ``lib``,
    the shared library and its header) ``out``.

    ``name`` is the prefix of the library's functions (default: from ``out``,
    ``libcount.so`` -> ``count``).  ``emit_llvm``: also write the optimized IR
    there.  ``native``: generate code for this machine's CPU (default: any
    x86-64).  ``values`` sets ``const volatile`` globals as ``hybrid.load``
    does.  Raises :class:`~hybrid.errors.HybridError` (``AotError``,
    ``ElfError``, ...) naming what is wrong.
    """
    from hybrid.user.object import load

    where = os.fspath(obj_path)
    out = Path(out)
    prefix = library_prefix(out, name) if lib else EXE_PREFIX
    with load(obj_path, kernel=False, values=values) as obj:
        main = choose_program(obj, program, where)
        progs = reachable_programs(obj, main)
        check_helpers(progs, where)
        region = obj.region
        if region is None:  # pragma: no cover - every object with a program has one (its run counts)
            raise AotError("%s: the object has no maps region" % where)
        image = ctypes.string_at(region.base, region.size)
        mod = compile_module([lp.program for lp in progs], region.base, region.size, native)
        programs = tuple((lp.name, lp.id) for lp in progs)
        others = tuple((lp.name, lp.id) for lp in obj.programs.values() if lp not in progs)
    ir_path = None
    if emit_llvm is not None:
        ir_path = Path(emit_llvm)
        ir_path.write_text(str(mod))
    tmp = Path(tempfile.mkdtemp(prefix="hybrid-aot-build-"))
    try:
        prog_o = tmp / "prog.o"
        try:
            prog_o.write_bytes(mod_object(mod, native))
        except RuntimeError as e:
            raise AotError("%s: LLVM code generation failed: %s" % (where, e)) from None
        image_c = write_image(tmp, image, programs, others, os.path.basename(where))
        link(tmp, out, [prog_o], image_c, prefix, lib)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    header = None
    if lib:
        header = out.with_name(_stem(out) + ".h")
        header.write_text(library_header(prefix, out, header, programs[0][0], os.path.basename(where)))
    return Built(out, header, ir_path, tuple(n for n, _ in programs))


# --- what goes in ----------------------------------------------------------------------------


def choose_program(obj, name: str | None, where: str):
    """The program to build: ``name``, or the object's only program."""
    names = sorted(obj.programs)
    if name is None:
        if len(names) == 1:
            return obj.programs[names[0]]
        raise AotError("%s: %s: choose one with -p" % (
            where, "%d programs (%s)" % (len(names), ", ".join(names)) if names else "no programs"))
    if name not in obj.programs:
        raise AotError("%s: no program %r (programs: %s)" % (where, name, ", ".join(names) or "none"))
    return obj.programs[name]


def reachable_programs(obj, main) -> list:
    """``main``, then, if it makes tail calls, every program the object's prog arrays hold (their ``values``)."""
    from hybrid.user.helpers import TAIL_CALL
    from hybrid.user.lower import helper_ids
    from hybrid.user.maps import MapType

    if TAIL_CALL not in helper_ids(main.program):
        return [main]
    targets = [n for m in obj.spec.maps if m.type == MapType.PROG_ARRAY for n in (m.values or ()) if n]
    out = [main]
    for n in targets:
        lp = obj.programs.get(n)
        if lp is not None and lp not in out:
            out.append(lp)
    return out


def check_helpers(progs: list, where: str) -> None:
    """Refuse programs calling helpers of :data:`NEEDS_PROCESS`, naming every one."""
    from hybrid.user.lower import helper_ids

    for lp in progs:
        helpers = lp.program.helpers
        bad = [helpers[h] for h in helper_ids(lp.program) if h in helpers and helpers[h].name in NEEDS_PROCESS]
        if bad:
            raise AotError("%s: program %r calls %s: %s a kernel or a traced process" % (
                where, lp.name, ", ".join("bpf_%s (%d)" % (h.name, h.id) for h in bad),
                "this needs" if len(bad) == 1 else "these need"))


# --- LLVM ------------------------------------------------------------------------------------


def target_machine(native: bool):
    from hybrid.user import codegen

    return codegen.target_machine(jit=False, cpu=None if native else "x86-64", features=None if native else "")


def region_resolver(program, base: int, size: int):
    """``lddw`` of a map or a map value -> ``ptrtoint(@hybrid_sa_region + offset)``, relocated by the linker."""
    from llvmlite import ir

    from hybrid.user.lower import I64, where

    def resolve(slot: int, insn):
        if insn.imm not in program.maps:
            raise EngineError("program %r: %s: no map %d" % (program.name, where(slot, insn), insn.imm))
        off = program.lddw_value(insn) - base
        if not 0 <= off <= size:
            raise AotError("program %r: %s: address %#x is outside the maps" % (
                program.name, where(slot, insn), program.lddw_value(insn)))
        return ir.FormattedConstant(I64, "ptrtoint (ptr getelementptr (i8, ptr @%s, i64 %d) to i64)" % (REGION, off))

    return resolve


def compile_module(programs: list, base: int, size: int, native: bool):
    """One optimized LLVM module with the entry point ``hybrid_sa_prog_<n>`` of each program."""
    from hybrid.user import codegen
    from hybrid.user.lower import lower

    tm = target_machine(native)
    linked = None
    for n, program in enumerate(programs):
        text = str(lower(program, ENTRY % n, region_resolver(program, base, size)))
        text += "\n@%s = external hidden global [0 x i8], align %d\n" % (REGION, PAGE)
        mod = codegen.parse(text, program, tm)
        codegen.optimize(mod, tm)
        if linked is None:
            linked = mod
        else:
            linked.link_in(mod)  # the subprograms are internal: clashing names are renamed
    return linked


def mod_object(mod, native: bool) -> bytes:
    return target_machine(native).emit_object(mod)


# --- C ---------------------------------------------------------------------------------------


def write_image(tmp: Path, image: bytes, programs: tuple[tuple[str, int], ...], others: tuple[tuple[str, int], ...],
                object_name: str) -> Path:
    """``image.c``: the region (.bss), its non-zero pages (.rodata, by .incbin) and the program table:
    ``programs`` (name, id) compiled in (``hybrid_sa_prog_<n>``), then ``others`` (only named)."""
    pages = [i for i in range(len(image) // PAGE) if image[i * PAGE:(i + 1) * PAGE].count(0) != PAGE]
    blob = tmp / "image.bin"
    blob.write_bytes(b"".join(image[i * PAGE:(i + 1) * PAGE] for i in pages))
    lines = [
        "#include <stdint.h>",
        "#define HIDDEN __attribute__((visibility(\"hidden\")))",
        "struct hybrid_sa_prog { const char *name; uint32_t id; uint64_t (*entry)(void *ctx, uint64_t len); };",
        "HIDDEN unsigned char %s[%d] __attribute__((aligned(%d)));" % (REGION, len(image), PAGE),
        "HIDDEN const uint64_t hybrid_sa_region_size = %d;" % len(image),
        "HIDDEN const uint32_t hybrid_sa_npages = %d;" % len(pages),
        "HIDDEN const uint32_t hybrid_sa_pages[] = {%s};" % (", ".join(map(str, pages)) or "0"),
        "__asm__(\".section .rodata\\n.balign %d\\n.globl hybrid_sa_image\\n.hidden hybrid_sa_image\\n"
        "hybrid_sa_image:\\n.incbin %s\\n.byte 0\\n.previous\\n\");" % (PAGE, _incbin_operand(str(blob))),
    ]
    lines += ["uint64_t %s(void *ctx, uint64_t len);" % (ENTRY % n) for n in range(len(programs))]
    table = [(name, pid, ENTRY % n) for n, (name, pid) in enumerate(programs)]
    table += [(name, pid, "0") for name, pid in others]
    lines.append("HIDDEN const struct hybrid_sa_prog hybrid_sa_progs[] = {%s};" % ", ".join(
        "{%s, %d, %s}" % (_c_string(name), pid, entry) for name, pid, entry in table))
    lines.append("HIDDEN const uint32_t hybrid_sa_nprogs = %d;" % len(table))
    lines.append("HIDDEN const char hybrid_sa_object[] = %s;" % _c_string(object_name))
    path = tmp / "image.c"
    path.write_text("\n".join(lines) + "\n")
    return path


def _incbin_operand(path: str) -> str:
    """``"path"`` for ``.incbin``: escaped for the assembler, then for the C string of ``__asm__``."""
    asm = '"%s"' % path.replace("\\", "\\\\").replace('"', '\\"')
    return asm.replace("\\", "\\\\").replace('"', '\\"')


def _c_string(s: str) -> str:
    return '"%s"' % "".join(c if c.isascii() and c.isprintable() and c not in '"\\' else "\\%03o" % ord(c)
                            for c in s)


def compiler() -> str:
    return os.environ.get("CC", "cc")


def _run(cmd: list[str], what: str) -> None:
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True)
    except OSError as e:
        raise AotError("cannot run the C compiler %r: %s" % (cmd[0], e.strerror)) from None
    if proc.returncode != 0:
        raise AotError("%s: %s failed (exit %d):\n%s" % (what, " ".join(cmd), proc.returncode, proc.stderr.strip()))


def cache_dir() -> Path | None:
    """Where compiled runtime objects are kept between builds: ``$XDG_CACHE_HOME/hybrid/aot``
    (``~/.cache/hybrid/aot``); None if it cannot be created."""
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    path = Path(base) / "hybrid" / "aot"
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError:
        return None
    return path if os.access(path, os.W_OK) else None


def compile_runtime(cc: str, flags: list[str], src: Path, tmp: Path) -> Path:
    """``src`` of hybrid/native compiled with ``flags``: from the cache when the compiler, the flags,
    the source and the headers are the same, else compiled (and cached)."""
    key = hashlib.sha256(repr((shutil.which(cc) or cc, flags)).encode())
    for f in [src] + sorted(NATIVE.glob("*.h")):
        key.update(f.name.encode() + b"\0" + f.read_bytes())
    cache = cache_dir()
    obj = (cache or tmp) / ("%s-%s.o" % (src.stem, key.hexdigest()[:24]))
    if cache is None or not obj.exists():
        part = obj.with_name("%s.%d.tmp" % (obj.name, os.getpid()))
        _run([cc, *flags, "-c", str(src), "-o", str(part)], "compiling %s" % src.name)
        os.replace(part, obj)  # atomic: a concurrent build sees the whole object or none
    return obj


def link(tmp: Path, out: Path, objects: list[Path], image_c: Path, prefix: str, lib: bool) -> None:
    """Compile the glue and the runtime (in parallel; the runtime once per compiler and flags, see
    :func:`compile_runtime`) and link everything into ``out``."""
    cc = compiler()
    base = ["-O2", "-I", str(NATIVE), "-fPIC" if lib else "-fPIE"]  # -fPIE: thread-locals without __tls_get_addr
    glue = base + ["-DHYBRID_SA_PREFIX=%s" % prefix] + ([] if lib else ["-DHYBRID_SA_MAIN=1"])

    def compile_glue(src: Path) -> Path:
        obj = tmp / (src.stem + ".o")
        _run([cc, *glue, "-c", str(src), "-o", str(obj)], "compiling %s" % src.name)
        return obj

    with ThreadPoolExecutor(max_workers=min(len(RUNTIME_SOURCES) + 2, os.cpu_count() or 1)) as pool:
        futures = [pool.submit(compile_glue, src) for src in (HERE / GLUE, image_c)]
        futures += [pool.submit(compile_runtime, cc, base, NATIVE / s, tmp) for s in RUNTIME_SOURCES]
        compiled = [f.result() for f in futures]
    cmd = [cc, "-o", str(out)]
    if lib:
        script = tmp / "exports.map"
        script.write_text("{\n  global: %s_*;\n  local: *;\n};\n" % prefix)
        cmd += ["-shared", "-Wl,--version-script=%s" % script, "-Wl,-soname,%s" % out.name]
    cmd += [str(o) for o in compiled] + [str(o) for o in objects] + ["-lpthread"]
    _run(cmd, "linking %s" % out)


# --- the library's name and header -------------------------------------------------------------


def _stem(out: Path) -> str:
    """``libcount.so`` -> ``libcount``, ``libcount.so.1`` -> ``libcount``."""
    n = out.name
    i = n.find(".so")
    return n[:i] if i > 0 else out.stem


def library_prefix(out: Path, name: str | None) -> str:
    """The prefix of the library's functions: ``name``, else the file name without ``lib`` and ``.so``."""
    if name is not None:
        if not re.fullmatch(r"[A-Za-z_]\w*", name):
            raise AotError("--name %r is no C identifier" % name)
        return name
    stem = _stem(out)
    stem = stem[3:] if stem.startswith("lib") and len(stem) > 3 else stem
    prefix = re.sub(r"\W", "_", stem)
    return "_" + prefix if prefix[:1].isdigit() else prefix


def library_header(prefix: str, lib_path: Path, header: Path, program: str, object_name: str) -> str:
    stem = _stem(lib_path)
    subst = {
        "HEADER": header.name, "LIBRARY": lib_path.name, "PROGRAM": program, "OBJECT": object_name,
        "LINKNAME": stem[3:] if stem.startswith("lib") else stem, "PREFIX": prefix,
        "GUARD": re.sub(r"\W", "_", header.name).upper(),
    }
    text = (HERE / HEADER_TEMPLATE).read_text()
    return re.sub(r"@([A-Z]+)@", lambda m: subst[m.group(1)], text)
