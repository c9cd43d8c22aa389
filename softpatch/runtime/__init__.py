"""Where and how work runs: devices, memory, chunking, progress."""
