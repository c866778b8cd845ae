"""Integrations of NovoGrad with training frameworks (DeepSpeed)."""
