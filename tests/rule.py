"""The float64 rule, the tests' oracle: one copy, in novograd_ds/testing/rule.py (``env --check`` uses it too)."""

from novograd_ds.testing.rule import RuleOptimizer, rule_step

__all__ = ["RuleOptimizer", "rule_step"]
