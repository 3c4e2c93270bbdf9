"""syn_digits: digits rendered from matplotlib's fonts, like SynDigits, as a TFDS builder."""
