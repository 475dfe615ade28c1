"""Synthetic cohorts (slides, reports, RNA-Seq, survival) and the datasets Stage 1 and Stage 2 train on."""
