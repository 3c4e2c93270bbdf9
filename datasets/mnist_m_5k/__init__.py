"""mnist_m_5k: mnist_5k digits blended over crops of real photos, like MNIST-M, as a TFDS builder."""
