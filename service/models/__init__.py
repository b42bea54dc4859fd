"""Models: manifests, the model set, backends (ONNX Runtime, PyTorch), the network definitions, the runner
that the model worker batches through, model health, and the edge's client of that worker.

Imports the foundation only; training imports the networks from here (serving never imports training).
"""
