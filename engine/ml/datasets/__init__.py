"""``pgml.load_dataset``: built-in datasets, Hugging Face datasets, local files, and the table they become."""
