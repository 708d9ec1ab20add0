"""Models: pure marginalization math, encoders, generator, decoding."""
