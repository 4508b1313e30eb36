"""hybrid: a kernel-cooperative eBPF runtime.

Userspace eBPF (``hybrid.user``) side by side with kernel eBPF
(``hybrid.kernel``), sharing maps through ``hybrid.bridge``.  Importing
this package is cheap: LLVM, bcc and the native runtime load on first use.
"""

__version__ = "0.1.0"
