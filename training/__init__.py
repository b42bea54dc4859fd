"""Training tools for the pneumothorax triage models: synthetic data now; train/evaluate/export later."""
