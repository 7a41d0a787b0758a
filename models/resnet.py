"""Residual networks: a CIFAR-sized ResNet (He et al., 2016, section 4.2) and the ImageNet-shaped ResNet-50."""
from __future__ import annotations

from collections.abc import Sequence

import tensorflow as tf

from models.registry import register

layers = tf.keras.layers


def _basic_block(x, filters: int, stride: int, weight_decay: float, name: str):
    reg = tf.keras.regularizers.l2(weight_decay) if weight_decay else None
    shortcut = x
    y = layers.Conv2D(filters, 3, stride, padding="same", use_bias=False, kernel_regularizer=reg,
                      name=f"{name}_conv1")(x)
    y = layers.BatchNormalization(name=f"{name}_bn1")(y)
    y = layers.ReLU(name=f"{name}_relu1")(y)
    y = layers.Conv2D(filters, 3, padding="same", use_bias=False, kernel_regularizer=reg, name=f"{name}_conv2")(y)
    y = layers.BatchNormalization(name=f"{name}_bn2")(y)
    if stride != 1 or shortcut.shape[-1] != filters:
        shortcut = layers.Conv2D(filters, 1, stride, use_bias=False, kernel_regularizer=reg,
                                 name=f"{name}_proj")(shortcut)
        shortcut = layers.BatchNormalization(name=f"{name}_proj_bn")(shortcut)
    y = layers.Add(name=f"{name}_add")([shortcut, y])
    return layers.ReLU(name=f"{name}_out")(y)


@register("resnet_small")
def resnet_small(
    *,
    input_shape: tuple[int, ...],
    num_classes: int,
    blocks_per_stage: int = 3,
    filters: Sequence[int] = (16, 32, 64),
    weight_decay: float = 1e-4,
) -> tf.keras.Model:
    """A CIFAR-style ResNet: a 3x3 stem, then stages of basic blocks, each stage after the first halving the size.

    ``blocks_per_stage=3`` is ResNet-20 (0.27 M parameters at 32x32x3, 10 classes).

    Args:
        input_shape: ``(height, width, channels)``.
        num_classes: number of output logits.
        blocks_per_stage: basic blocks in each stage.
        filters: channels of each stage.
        weight_decay: L2 penalty on convolution kernels.

    Returns:
        An uncompiled ``keras.Model`` returning float32 logits.
    """
    inputs = tf.keras.Input(shape=input_shape, name="inputs")
    x = layers.Conv2D(filters[0], 3, padding="same", use_bias=False, name="stem_conv")(inputs)
    x = layers.BatchNormalization(name="stem_bn")(x)
    x = layers.ReLU(name="stem_relu")(x)
    for s, f in enumerate(filters):
        for b in range(blocks_per_stage):
            stride = 2 if (s > 0 and b == 0) else 1
            x = _basic_block(x, int(f), stride, weight_decay, name=f"stage{s}_block{b}")
    x = layers.GlobalAveragePooling2D(name="pool")(x)
    outputs = layers.Dense(num_classes, dtype="float32", name="logits")(x)
    return tf.keras.Model(inputs, outputs, name="resnet_small")


@register("resnet50")
def resnet50(*, input_shape: tuple[int, ...], num_classes: int) -> tf.keras.Model:
    """ResNet-50 v1.5 as in ``keras.applications`` (25.6 M parameters at 224x224x3, 1000 classes), random init.

    Args:
        input_shape: ``(height, width, 3)``; at least 32x32.
        num_classes: number of output logits.

    Returns:
        An uncompiled ``keras.Model`` returning float32 logits.
    """
    base = tf.keras.applications.ResNet50(
        weights=None, input_shape=input_shape, classes=num_classes, classifier_activation=None
    )
    # Keep the logits float32 under mixed precision (the application's head follows the global policy).
    outputs = layers.Activation("linear", dtype="float32", name="logits")(base.output)
    return tf.keras.Model(base.input, outputs, name="resnet50")
