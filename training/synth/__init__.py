"""Synthetic SIIM-style chest radiograph generator (DICOM + train-rle.csv) for tests and training."""
