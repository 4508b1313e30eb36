"""Drop-in ports of bcc tools whose probes run inside the traced process (hybrid userspace probes)."""
