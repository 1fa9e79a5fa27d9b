"""Synthetic copies of the MIMIC-CXR, CheXpert Plus and LLaVA-Med releases, in their own layouts (test fixtures);
SLAKE and the other VQA benchmarks are in medlava.data.synthetic_benchmarks (the tiny suite generates them)."""
