"""Downstream tasks on patch features: MIL classification and survival heads, report generation, and the
evaluation-only tasks (zero-shot, few-shot, retrieval) that read a Stage-1 checkpoint.

Imports go one way: `cli` (dispatch, commands) -> the tasks (`fewshot`, `survival`, `report`, `retrieval` above
`zeroshot`, `mil`) -> `common` -> `config`; `synth` (a synthetic feature cohort for tests) stands alone.
"""
