"""Checkpoint I/O: HF directories, GGUF files, and the bundled SmolLM2 fetcher."""
