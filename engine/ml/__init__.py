"""Classical models: ``pgml.train``, ``predict``, ``deploy``, ``snapshot``, ``load_dataset``, and what they use
(algorithms, preprocessing, metrics and search, artifacts and their signatures)."""
