"""Training tools for the pneumothorax triage models: synthetic data, training, evaluation, ONNX export."""
