"""Offline evaluation: metrics (`metrics`), the evaluation stage and gate (`evaluate`), the paper's
claims re-run on the synthetic world (`experiments`) and their figures (`plots`)."""
