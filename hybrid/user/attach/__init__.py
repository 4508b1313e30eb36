"""Userspace probes: eBPF programs running inside a traced process.

- ``agent.py``: planning and placing (``BpfObject.attach``, ``launch``, detach);
- ``x86.py``: decoding and checking the patch windows (capstone);
- ``symbols.py``: libraries, symbols, IFUNCs, process memory;
- ``usdt.py``: ``.note.stapsdt`` probes and libbpf's USDT argument specs;
- ``syscalls.py``: syscall numbers and the syscall tracepoints' formats;
- ``inject.py``: loading the agent into a running process through ptrace;
- ``report.py``: printing maps.

The native side (trampolines, safe patching, dispatch) is
``hybrid/native/agent.c``.  Nothing heavy is imported here.
"""
