"""The cached decoder runs every language-model family through its own plan: for each family and attention form,
cached greedy and seeded sampling equal the full-window reference, and speculative decoding the cached text."""
import pytest

FAMILIES = {
    "gpt": dict(num_layers=2, num_heads=4, width=32),
    "gpt tied": dict(num_layers=1, num_heads=2, width=32, tie_embeddings=True),
    "llama grouped-query": dict(num_layers=2, num_heads=4, kv_heads=2, width=32),
    "llama multi-query tied": dict(num_layers=1, num_heads=4, kv_heads=1, width=32, tie_embeddings=True),
}


@pytest.mark.parametrize("name", sorted(FAMILIES))
def test_cached_and_speculative_decoding_equal_the_full_window(name):
    import models
    from hvdtrain.serving import decoding, generate, speculative

    model = models.build(name.split()[0], input_shape=(16,), num_classes=300, dropout=0.0, **FAMILIES[name])
    decoder = decoding.CachedDecoder(model)
    prompts = [[5, 280, 17], [1, 2, 3, 4, 5, 6]]
    assert decoding.sample_cached(model, prompts[:1], 12, 0, decoder=decoder)[0] == generate.sample(
        model, prompts[0], 12, 0)
    assert decoding.sample_cached(model, prompts[1:], 10, 0.9, 20, 4, decoder=decoder)[0] == generate.sample(
        model, prompts[1], 10, 0.9, 20, 4)
    # past the context (16): rows slide, alike in both
    cached = decoding.sample_cached(model, prompts, 20, 0, decoder=decoder)
    assert speculative.sample_speculative(model, model, prompts, 20, 0, k=3, decoders=(decoder, decoder)) == cached
