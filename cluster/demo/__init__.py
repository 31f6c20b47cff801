"""The demo adapter zoo: SmolLM2-135M-Instruct and LoRA adapters trained on generated tasks."""
