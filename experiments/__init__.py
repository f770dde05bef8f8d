"""Experiment pipelines for GenLoRA: data, evaluation and training scripts."""
