"""mSTAR training: synthetic cohorts, models, Stage 1/2 pretraining, downstream heads, evaluation, export.

Depends on `service` for slide I/O and the model-bundle contract; never the other way round.
"""
