"""B-cos networks (Böhle et al.) with the exact e2KD gradient semantics of the paper's code."""
