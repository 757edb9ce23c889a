"""MoCo ablation harness: pretraining runs, probes, studies and reports."""
__version__ = "0.1.0"
