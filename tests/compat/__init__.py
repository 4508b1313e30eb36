"""Tests of hybrid.compat: other front ends' tools run unmodified, their probes in the traced process."""
