"""Bridge between hybrid's userspace engines and kernel eBPF objects (maps, programs)."""
