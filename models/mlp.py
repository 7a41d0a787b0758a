"""A multi-layer perceptron."""
from __future__ import annotations

from collections.abc import Sequence

import tensorflow as tf

from models.registry import register


@register("mlp")
def mlp(
    *,
    input_shape: tuple[int, ...],
    num_classes: int,
    hidden_units: Sequence[int] = (128, 64),
    dropout: float = 0.1,
    activation: str = "relu",
) -> tf.keras.Model:
    """A fully connected classifier.

    Args:
        input_shape: shape of one example; flattened first.
        num_classes: number of output logits.
        hidden_units: width of each hidden layer.
        dropout: dropout rate after each hidden layer.
        activation: hidden activation.

    Returns:
        An uncompiled ``keras.Model`` returning float32 logits.
    """
    inputs = tf.keras.Input(shape=input_shape, name="inputs")
    x = tf.keras.layers.Flatten(name="flatten")(inputs)
    for i, units in enumerate(hidden_units):
        x = tf.keras.layers.Dense(int(units), activation=activation, name=f"dense_{i}")(x)
        if dropout:
            x = tf.keras.layers.Dropout(dropout, name=f"dropout_{i}")(x)
    # Logits stay float32 under mixed precision: softmax and the loss are numerically sensitive.
    outputs = tf.keras.layers.Dense(num_classes, dtype="float32", name="logits")(x)
    return tf.keras.Model(inputs, outputs, name="mlp")
