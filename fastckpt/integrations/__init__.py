"""Integrations with other libraries; each module imports its library only when used:
``hf`` (Hugging Face transformers), ``lightning`` (PyTorch Lightning)."""
