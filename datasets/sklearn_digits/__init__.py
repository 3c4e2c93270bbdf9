"""sklearn_digits: scikit-learn's 1,797 handwritten 8x8 digits, as a TFDS builder."""
