"""Export: trained models -> ONNX -> a Triton model repository with the bundle manifest the service reads.

Imports go one way: `cli` -> `import_encoder` -> `bundle` (per-model exports, `build_bundle`, `export_run`) ->
`onnx` (export + parity gate), `triton` (repository configs), `wrappers` (the served graphs), `contract` (the
`export.pt` format). `triton_python_model.py` is not imported: it is copied into the repository as `model.py`.
"""
