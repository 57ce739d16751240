"""Evaluation: fidelity (torch-fidelity, with the offline GlyphNet extractor), downstream
accuracy, real-data references, and sweep reports with plots. No DP computation lives here."""
