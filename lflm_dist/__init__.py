"""lflm_dist: distributed pretraining of continuous-latent language models."""
__version__ = "0.1.0"
