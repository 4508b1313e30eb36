"""Running other eBPF front ends' tools unmodified, with their probes in the traced process.

:mod:`hybrid.compat.bcc`: ``hybrid bcc -- TOOL ARGS`` runs a bcc Python tool
(Debian's ``*-bpfcc``) with its uprobes and uretprobes inside the process it
traces.
"""
