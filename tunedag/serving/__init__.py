"""The model server (vLLM or the HF fallback), its checks, the chat CLI and the web page."""
