"""Fine-tuning with ``pgml.tune``, and the tuned models in use (``pgml.generate``, ``predict``, ``transform``)."""
