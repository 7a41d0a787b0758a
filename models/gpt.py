"""GPT-style language model (see the models issue)."""
