"""Policy gate on verified text: the rules an operator writes (`rules.py`) and the per-request gate
that holds back what a rule could still claim before any of it reaches the client (`gate.py`)."""

from verispec.policy.gate import PolicyGate, PolicySet, Violation
from verispec.policy.rules import load_policy, parse_policy

__all__ = ["PolicyGate", "PolicySet", "Violation", "load_policy", "parse_policy"]
