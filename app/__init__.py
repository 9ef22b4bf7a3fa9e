"""UniCoRn serving package: context, features, retrieval and the HTTP service.

Pure numpy + onnxruntime: nothing here imports torch or ``model_export``.
"""
