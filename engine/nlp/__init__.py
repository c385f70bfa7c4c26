"""The text functions: ``pgml.embed``, ``chunk``, ``rank``, ``transform``, ``transform_stream``, and fine-tuning
(``engine.nlp.finetune``: ``pgml.tune``, ``pgml.generate``)."""
