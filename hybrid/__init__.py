"""hybrid: a kernel-cooperative eBPF runtime.

Userspace eBPF (``hybrid.user``) side by side with kernel eBPF
(``hybrid.kernel``), sharing maps through ``hybrid.bridge``.  Importing
this package is cheap: LLVM, bcc and the native runtime load on first use.
"""

__version__ = "0.1.0"


def load(path, **options):
    """Load a clang-compiled eBPF object into the userspace VM: see :func:`hybrid.user.object.load`."""
    from hybrid.user.object import load as _load

    return _load(path, **options)
