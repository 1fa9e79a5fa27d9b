"""Synthetic copies of the SLAKE, MIMIC-CXR, CheXpert Plus and LLaVA-Med releases, in their own layouts (test fixtures)."""
