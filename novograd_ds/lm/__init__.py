"""Pieces of the main job (``python -m novograd_ds.train``): corpus, tokenizer, batches, model config."""
