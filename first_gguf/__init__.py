"""first-gguf: input-adaptive layer skipping (FiRST) for llama.cpp / GGUF models."""

__version__ = "0.1.0"
