"""The Hugging Face ``transformers`` form of a trained model: ``export.py`` folds the factors into
the weights and writes the directory; ``configuration_angpt.py`` and ``modeling_angpt.py`` are
the code shipped in it (they import only torch and transformers)."""
