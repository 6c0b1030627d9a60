"""Making models: `verispec train` (a small model from a corpus), `verispec distill` (a draft taught by its
verifier), and what they share: the training corpus, the optimisation loop and the run settings."""
