"""Kernel side of hybrid: loading and attaching programs through the bpf() syscall."""
