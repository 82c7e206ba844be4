"""fedtrust.fairness: fairness metrics and methods, with explicit arguments and no experiment code.

`sensitivity` (accumulated prediction sensitivity, the counterfactual gap), `psm` (protected-status
models), `eec` / `bold` / `wordpairs` (vendored data and counterfactual swapping), `wordtokenizer`
and `distill` (counterfactual role-reversal distillation), `bias_demo` (the demo's data), `cohorts`
(per-cohort accuracy of a federated run). The experiments, their CLI and reports are in
`fedtrust.simulations` (`fairness_cli`, `fairness_runs`, `fairness_report`, `distill*`).
"""
