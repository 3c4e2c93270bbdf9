"""kanji_glyphs: KanjiVG characters drawn Omniglot-style (20 drawings each, 28x28), as a TFDS builder."""
