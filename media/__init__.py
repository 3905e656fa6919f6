"""Pure, clock-free media logic: frames, resampling, codecs, quality.

Nothing in this package opens a socket, starts a thread or reads the clock:
callers pass ``now`` in. That keeps it testable with made-up timestamps.
"""
