"""Applications of the library: the ``hzo-ext`` command (cli), training runs (train, data),
the depth benchmark (bench) and the cosine study. The library never imports this package."""
