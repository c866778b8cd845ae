"""The float64 rule, the tests' oracle: one copy, in novograd_ds/testing/rule.py (``env --check`` uses it too).

Its 8-bit form (NOTE: [8-bit moment]): ``rule_step_8bit``, ``RuleOptimizer(state_bits=8, q8=...)``."""

from novograd_ds.testing.rule import RuleOptimizer, rule_step, rule_step_8bit, rule_uniform

__all__ = ["RuleOptimizer", "rule_step", "rule_step_8bit", "rule_uniform"]
