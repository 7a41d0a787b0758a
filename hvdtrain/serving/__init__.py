"""Serving a trained model: everything after training that turns a model into answers.

- :mod:`~hvdtrain.serving.sampling`: the sampling rules (temperature, top-k, greedy) every path shares.
- :mod:`~hvdtrain.serving.decoding`: the key-value cache decoder, through the family's plan (``plan.decode``).
- :mod:`~hvdtrain.serving.speculative`: speculative decoding, a small draft proposing and the model checking.
- :mod:`~hvdtrain.serving.generate`: ``hvdtrain generate`` (cached, speculative, and the full-window reference).
- :mod:`~hvdtrain.serving.export`: ``hvdtrain export``, a SavedModel with its text-in text-out signature, TFLite.
- :mod:`~hvdtrain.serving.tflite`: the TFLite converter and interpreter (also used by post-training quantization).
"""
