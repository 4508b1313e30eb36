"""The userspace eBPF VM: ISA tables, assembler, verifier and the three engines."""
