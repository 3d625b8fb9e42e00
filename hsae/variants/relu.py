"""`relu`: the plain ReLU SAE of the paper's section 3.1, the baseline every variant is compared to."""

from hsae.variants.base import SAE


class ReluSAE(SAE):
    name = "relu"
