"""Making models: `verispec train` (a small model from a corpus), `verispec distill` (a draft taught by its
verifier), the training corpus and the optimisation loop they share."""
