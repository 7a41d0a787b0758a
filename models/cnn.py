"""A small convolutional network, sized for 8x8 digits and other small images."""
from __future__ import annotations

from collections.abc import Sequence

import tensorflow as tf

from models.registry import register


@register("cnn")
def cnn(
    *,
    input_shape: tuple[int, ...],
    num_classes: int,
    filters: Sequence[int] = (32, 64),
    kernel_size: int = 3,
    dense_units: int = 128,
    dropout: float = 0.25,
) -> tf.keras.Model:
    """Convolutions, one max-pool, then a dense head.

    Args:
        input_shape: ``(height, width, channels)``.
        num_classes: number of output logits.
        filters: channels of each 'same'-padded convolution.
        kernel_size: square kernel size of the convolutions.
        dense_units: width of the dense layer before the logits.
        dropout: dropout rate before the dense layers.

    Returns:
        An uncompiled ``keras.Model`` returning float32 logits.
    """
    inputs = tf.keras.Input(shape=input_shape, name="inputs")
    x = inputs
    for i, f in enumerate(filters):
        x = tf.keras.layers.Conv2D(int(f), kernel_size, padding="same", activation="relu", name=f"conv_{i}")(x)
    x = tf.keras.layers.MaxPooling2D(2, name="pool")(x)
    if dropout:
        x = tf.keras.layers.Dropout(dropout, name="dropout_conv")(x)
    x = tf.keras.layers.Flatten(name="flatten")(x)
    x = tf.keras.layers.Dense(dense_units, activation="relu", name="dense")(x)
    if dropout:
        x = tf.keras.layers.Dropout(dropout, name="dropout_dense")(x)
    outputs = tf.keras.layers.Dense(num_classes, dtype="float32", name="logits")(x)
    return tf.keras.Model(inputs, outputs, name="cnn")
