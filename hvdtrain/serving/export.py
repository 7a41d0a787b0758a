"""``hvdtrain export``: a trained language model in the formats serving systems load.

- ``saved_model``: a TensorFlow SavedModel in a TensorFlow Serving model base path, ``OUT/VERSION/`` (``--version``,
  1 by default; TF Serving serves the highest number and picks up a new one as it appears; TF-Lite's converter and
  ``tf.saved_model.load`` read the version folder) with these signatures: ``serving_default`` (``tokens`` int32
  ``(batch, context)`` -> ``logits`` ``(batch, context, vocabulary)``); ``generate`` (``prompt`` int32
  ``(batch, length)`` right-padded, ``lengths`` int32 ``(batch,)``, ``max_new_tokens``, ``temperature`` (0: greedy),
  ``top_k`` (0: all), ``seed`` -> ``tokens`` int32 ``(batch, max_new_tokens)``): the cached decoder of
  :mod:`hvdtrain.serving.decoding` in one graph, sampling with stateless random ops; and ``generate_text``
  (``prompt`` string ``(batch,)`` and the same options -> ``text`` string ``(batch,)``: the new tokens' text), the
  run's tokenizer running inside the graph (:class:`hvdtrain.data.tokenizer.InGraph`). In the graph, generation
  stops at the context length (the new tokens are cut to ``context - max(lengths)``); the CLI's ``generate`` slides
  past it. A model with a BPE tokenizer gets its ``tokenizer.json`` in ``OUT`` (what serving stacks read).
- ``tflite`` and ``tflite-int8``: the logits model for TFLite, in float32 or with int8 weights (dynamic-range
  quantization: weights stored as int8, computed in float).
"""
from __future__ import annotations

from pathlib import Path

from hvdtrain.errors import UsageError

FORMATS = ("saved_model", "tflite", "tflite-int8", "huggingface")  # huggingface: hvdtrain.formats.huggingface


def generation_module(model, tokenizer=None):
    """A ``tf.Module`` with the serving signatures of ``model`` (a language model) and its tokenizer (bytes when
    None)."""
    import tensorflow as tf

    from hvdtrain.data.tokenizer import Bytes, InGraph
    from hvdtrain.serving.decoding import CachedDecoder
    from hvdtrain.serving.sampling import distribution

    decoder = CachedDecoder(model)
    context, vocab = decoder.context, decoder.vocab
    from hvdtrain.errors import DataError

    try:
        text = InGraph(tokenizer or Bytes())
    except DataError as exc:  # a user's tokenizer with a regex pre-split: no text signature, say why
        from hvdtrain import console

        console.say(f"note: no generate_text signature: {exc}")
        text = None

    def generate_ids(prompt, lengths, max_new_tokens, temperature, top_k, seed):
        batch = tf.shape(prompt)[0]
        steps = tf.maximum(0, tf.minimum(max_new_tokens, context - tf.reduce_max(lengths)))
        logits, cache = decoder.extend(prompt, tf.zeros([batch], tf.int32), decoder.empty_cache(batch))
        last = tf.gather(logits, lengths - 1, batch_dims=1)  # (batch, vocabulary)

        def pick(row_logits, step):
            def sampled():
                probs = distribution(row_logits, temperature, top_k, vocab)
                draw = tf.random.stateless_categorical(tf.math.log(probs + 1e-30), 1,
                                                       seed=tf.stack([seed, tf.cast(step, tf.int64)]))
                return tf.cast(draw[:, 0], tf.int32)

            return tf.cond(temperature > 0, sampled, lambda: tf.argmax(row_logits, -1, output_type=tf.int32))

        def body(step, last, cache, out):
            token = pick(last, step)
            out = out.write(step, token)
            logits, cache = decoder.extend(token[:, None], lengths + step, cache)
            return step + 1, logits[:, 0], cache, out

        out = tf.TensorArray(tf.int32, size=steps)
        _, _, _, out = tf.while_loop(lambda step, *_: step < steps, body, [tf.constant(0), last, cache, out])
        return tf.transpose(tf.reshape(out.stack(), [steps, batch]))

    options = [tf.TensorSpec([], tf.int32, name="max_new_tokens"), tf.TensorSpec([], tf.float32, name="temperature"),
               tf.TensorSpec([], tf.int32, name="top_k"), tf.TensorSpec([], tf.int64, name="seed")]

    class Generation(tf.Module):
        def __init__(self):
            super().__init__(name="generation")
            self.model = model  # tracked: its variables are saved once, shared by every signature
            self.text = text
            self.tables = text.tables() if text else []  # tracked: the tokenizer's tables are saved with it
            if text is not None:  # (a tokenizer that cannot run in the graph: no text signature to trace at all)
                self.generate_text = tf.function(
                    self._generate_text, input_signature=[tf.TensorSpec([None], tf.string, name="prompt"), *options])

        @tf.function(input_signature=[tf.TensorSpec([None, context], tf.int32, name="tokens")])
        def serve(self, tokens):
            return {"logits": tf.cast(self.model(tokens, training=False), tf.float32)}

        @tf.function(input_signature=[tf.TensorSpec([None, None], tf.int32, name="prompt"),
                                      tf.TensorSpec([None], tf.int32, name="lengths"), *options])
        def generate(self, prompt, lengths, max_new_tokens, temperature, top_k, seed):
            return {"tokens": generate_ids(prompt, lengths, max_new_tokens, temperature, top_k, seed)}

        def _generate_text(self, prompt, max_new_tokens, temperature, top_k, seed):
            # text in: each prompt encoded by the tokenizer in the graph (an empty prompt starts from a newline),
            # its last `context - 1` tokens kept; text out: the new tokens' text
            def encode(p):
                ids = self.text.encode(p)
                ids = tf.cond(tf.size(ids) > 0, lambda: ids, lambda: self.text.encode(tf.constant("\n")))
                return ids[-(context - 1):]

            rows = tf.map_fn(encode, prompt, fn_output_signature=tf.RaggedTensorSpec([None], tf.int32, 0))
            padded, lengths = rows.to_tensor(0), tf.cast(rows.row_lengths(), tf.int32)
            tokens = generate_ids(padded, lengths, max_new_tokens, temperature, top_k, seed)
            return {"text": tf.map_fn(self.text.decode, tokens, fn_output_signature=tf.string)}

    return Generation()


def export(model, output: str, fmt: str, run_dir=None, tokenizer=None, version: int = 1) -> list[str]:
    """Write ``model`` in ``fmt`` under ``output`` (with ``tokenizer.json`` beside it when the model has a BPE
    tokenizer; a SavedModel in ``output/version``); returns the paths written."""
    import tensorflow as tf

    from hvdtrain import storage
    from hvdtrain.serving import decoding

    if fmt not in FORMATS:
        from hvdtrain.errors import closest

        raise UsageError(f"unknown --format '{fmt}'{closest(fmt, FORMATS)}; formats: {', '.join(FORMATS)}")
    if fmt == "huggingface":
        raise UsageError("--format huggingface is written by hvdtrain.formats.huggingface.export")
    decoding.check_model(model)
    written = []
    if tokenizer is not None and tokenizer.to_json() is not None:
        from hvdtrain.data.tokenizer import FILE

        storage.write_text(storage.join(output, FILE), tokenizer.to_json())
        written.append(storage.join(output, FILE))
    if fmt == "saved_model":
        module = generation_module(model, tokenizer)
        target = storage.join(output, str(version))
        with storage.staged(target) as tmp:
            tf.saved_model.save(module, str(tmp), signatures={
                "serving_default": module.serve, "generate": module.generate.get_concrete_function(),
                **({"generate_text": module.generate_text.get_concrete_function()} if module.text else {})})
        return [target, *written]
    from hvdtrain.serving.tflite import to_tflite

    name = "model-int8.tflite" if fmt == "tflite-int8" else "model.tflite"
    local = run_dir.local(name)
    to_tflite(model, Path(local), "dynamic" if fmt == "tflite-int8" else "float32")
    run_dir.publish()
    return [run_dir.path(name), *written]


def command(model_path: str, output: str, fmt: str, allow_unsafe: bool = False, version: int = 1) -> list[str]:
    """``hvdtrain export``: the model file at ``model_path`` (and its run's tokenizer) in ``fmt`` under ``output``;
    everything is checked before anything is written. Returns the paths written."""
    from hvdtrain import formats, rundir
    from hvdtrain.serving import decoding

    if fmt not in FORMATS:  # (before anything imports TensorFlow: a wrong flag fails in a fraction of a second)
        from hvdtrain.errors import closest

        raise UsageError(f"unknown --format '{fmt}'{closest(fmt, FORMATS)}; formats: {', '.join(FORMATS)}")
    if fmt == "saved_model":
        from hvdtrain import storage

        if version < 1:
            raise UsageError(f"--version {version}: TensorFlow Serving's versions are positive integers")
        if storage.exists(storage.join(output, str(version))):
            raise UsageError(f"{storage.join(output, str(version))} exists: give another --version (TensorFlow "
                             "Serving serves the highest) or another --output")
    model = formats.load_model(model_path, allow_unsafe=allow_unsafe)
    from hvdtrain.data import tokenizer as tokenizers

    _, vocab = decoding.check_model(model, f"--model {model_path}")
    tok = tokenizers.load_beside(model_path)
    tokenizers.check_vocabulary(tok, vocab, f"--model {model_path}")
    return export(model, output, fmt, rundir.for_command(output), tok, version)
