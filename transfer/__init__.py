"""The transfer stage, `evoprune prune`: TPP regularization, Torch-Pruning surgery and retraining;
this folder installs as `evoprune.transfer`."""
