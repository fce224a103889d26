"""Releasing a trained model: the hub-ready export and its card, GGUF for llama.cpp/Ollama, the GTO registry."""
