"""Sample-quality evaluation: metrics, feature nets, procedural checkers, per-modality evaluators and the in-loop callback."""
