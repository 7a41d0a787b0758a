"""``hvdtrain serve``: a language model behind the OpenAI API, many clients at once.

One process: the model loaded whole, a :class:`~hvdtrain.serving.decoding.SlotCache` of ``--slots`` sequences, the
continuous-batching :class:`~hvdtrain.serving.engine.Engine` in a thread of its own, and the API
(:mod:`hvdtrain.serving.openai_api`) on uvicorn in the main thread. Under ``horovodrun -np N`` with
``--set parallel.tensor=N``: every rank builds only its slices of the model (read by their bytes from a checkpoint
or a Hugging Face directory) and caches only its key-value heads; rank 0 answers HTTP and runs the loop, and every
decoder call of the loop runs on every rank in the same order (:class:`~hvdtrain.serving.engine.Lockstep`).

Life cycle: the model (and draft) load, then the port is bound: a model that cannot be loaded or a port in use is
one line and a non-zero exit with nothing listening. On SIGTERM (or SIGINT) the server stops accepting
connections, lets the requests in flight finish (at most ``--shutdown-timeout`` seconds, after which the rest are
cancelled), stops the other ranks and exits 0.
"""
from __future__ import annotations

import signal
import socket
import threading
import time

from hvdtrain import console, distributed
from hvdtrain.errors import ConfigError, UsageError


def served_name(model_path: str) -> str:
    """The model's name in the API: its directory's name (a run's, or a Hugging Face directory's)."""
    from hvdtrain import storage

    path = str(model_path).rstrip("/")
    if path.endswith(".keras"):
        path = storage.parent(path) or path
    return storage.basename(path) or path


def tensor_size(sets: list[str]) -> int:
    """``parallel.tensor`` from ``--set`` (the only setting serving reads), checked as the config checks it."""
    from hvdtrain import config

    for item in sets:
        key = ".".join(config.parse_override(item)[0])
        if key not in ("parallel.tensor", "parallel.pipeline"):
            raise ConfigError(f"hvdtrain serve reads parallel.tensor alone from --set, not '{key}'")
    cfg = config.load("llama-tiny", None, list(sets))  # any language model recipe: only parallel.* is read
    if cfg.parallel.pipeline != 1:
        raise ConfigError("hvdtrain serve splits a model over a tensor group (parallel.tensor); "
                          "parallel.pipeline must be 1")
    return cfg.parallel.tensor


def load(model_path: str, tensor: int, allow_unsafe: bool):
    """``(decoder, group)``: the whole model's cached decoder, or this rank's part of it across a tensor group."""
    from hvdtrain import formats
    from hvdtrain.serving.decoding import CachedDecoder

    if tensor == 1:
        model = formats.load_model(model_path, allow_unsafe=allow_unsafe)
        return CachedDecoder(model), None
    from hvdtrain.distributed.mesh import make_mesh
    from hvdtrain.distributed.sharded import ShardedModule

    plan, initial = formats.open_slices(model_path)
    for what, value in plan.divisors.items():
        if value % tensor:
            raise ConfigError(f"parallel.tensor={tensor} must divide {what}={value}")
    group = make_mesh(tensor, 1).tensor_group
    module = ShardedModule(plan, plan.units, group, seed=0, initial=initial)
    return CachedDecoder(shard=(plan, module.by_name, group)), group


def command(model_path: str, host: str = "127.0.0.1", port: int = 8000, draft_path: str | None = None,
            draft_tokens: int = 4, slots: int = 16, max_queue: int = 256, name: str | None = None,
            chat_template: str | None = None, sets: list[str] | None = None, shutdown_timeout: float = 30.0,
            allow_unsafe: bool = False) -> int:
    from hvdtrain import formats
    from hvdtrain.data import tokenizer as tokenizers
    from hvdtrain.serving import chat
    from hvdtrain.serving.decoding import CachedDecoder, SlotCache
    from hvdtrain.serving.engine import Lockstep

    if slots < 1 or max_queue < 0 or draft_tokens < 1 or shutdown_timeout < 0:
        raise UsageError("--slots and --draft-tokens must be at least 1, --max-queue and --shutdown-timeout at "
                         "least 0")
    tensor = tensor_size(sets or [])
    formats.resolve(model_path)  # a missing model: one line before TensorFlow and Horovod start
    ranks = tensor > 1 or distributed.launched()
    if ranks:
        distributed.init(threads_per_rank=0, dynamic_process_sets=tensor > 1)
    world, rank = (distributed.size(), distributed.rank()) if ranks else (1, 0)
    if world != tensor:
        raise ConfigError(f"hvdtrain serve runs one model over its ranks: --set parallel.tensor={world} for "
                          f"{world} ranks (this job has parallel.tensor={tensor})")
    decoder, group = load(model_path, tensor, allow_unsafe)
    tok = tokenizers.load_beside(model_path)
    tokenizers.check_vocabulary(tok, decoder.vocab, f"--model {model_path}")
    template = chat.load(formats.run_dir_of(model_path), chat_template)
    cache = SlotCache(decoder, slots)
    calls = {"last": cache.last, "score": cache.score}
    local = {}
    if draft_path:
        draft = CachedDecoder(formats.load_model(draft_path, allow_unsafe=allow_unsafe))
        if draft.vocab != decoder.vocab:
            raise UsageError(f"--draft {draft_path} has {draft.vocab} outputs, the model {decoder.vocab}; they must "
                             "share the tokenizer (distill the draft from this model)")
        draft_cache = SlotCache(draft, slots)
        local = {"draft_last": draft_cache.last, "draft_propose": draft_cache.propose}
    lockstep = Lockstep(group, calls, local)
    if rank != 0:
        distributed.agree(None)  # rank 0's listening socket, or its error
        for sig in (signal.SIGTERM, signal.SIGINT):  # rank 0 drains its requests, then tells this rank to stop
            signal.signal(sig, signal.SIG_IGN)
        lockstep.follow()
        return 0
    listener, error = None, None
    try:
        listener = bind(host, port)
    except UsageError as exc:
        error = str(exc)
    if world > 1:
        distributed.agree(error)
    elif error:
        raise UsageError(error)
    return serve(listener, lockstep, cache, tok, template, name or served_name(model_path), max_queue,
                 draft_tokens if draft_path else 0, shutdown_timeout, tensor)


def bind(host: str, port: int) -> socket.socket:
    try:
        listener = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM)
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listener.bind((host, port))
        listener.listen(2048)
    except OSError as exc:
        raise UsageError(f"cannot listen on {host}:{port} ({exc.strerror or exc}); choose another --port or "
                         "--host") from None
    listener.set_inheritable(True)
    return listener


def serve(listener, lockstep, cache, tok, template, name: str, max_queue: int, draft_tokens: int,
          shutdown_timeout: float, tensor: int) -> int:
    """Rank 0: the engine's thread, the API on uvicorn until a signal, then the drain."""
    import uvicorn

    from hvdtrain.serving.engine import Engine
    from hvdtrain.serving.metrics import Metrics
    from hvdtrain.serving.openai_api import Served, create_app

    decoder, slots = cache.decoder, cache.slots
    metrics = Metrics(slots)
    engine = Engine(lockstep, decoder.context, slots, tuple(tok.eos), max_queue, draft_tokens, metrics=metrics)
    served = Served(engine, name, decoder.context, decoder.vocab, tok, template, metrics, max_n=slots)
    app = create_app(served)
    config = uvicorn.Config(app, log_level="warning", access_log=False, lifespan="off",
                            timeout_graceful_shutdown=shutdown_timeout, timeout_keep_alive=30)
    server = uvicorn.Server(config)
    for sig in (signal.SIGTERM, signal.SIGINT):  # uvicorn raises the signal again once it has drained: a no-op
        signal.signal(sig, lambda *_: None)
    engine.start()
    host, port = listener.getsockname()[:2]
    url_host = f"[{host}]" if ":" in host else host
    extra = (f", draft proposing {draft_tokens} tokens" if draft_tokens else "") + (
        f", tensor={tensor}" if tensor > 1 else "")
    from hvdtrain import memory

    weights = sum(int(v.shape.num_elements()) * v.dtype.size for v in decoder.params.values())
    kv = int(cache.pool.shape.num_elements()) * cache.pool.dtype.size
    console.say(f"[hvdtrain] serving '{name}' at http://{url_host}:{port}/v1 ({decoder.plan.family}, context "
                f"{decoder.context} tokens, {slots} slots{extra}); this rank holds {weights / 2**20:.1f} MB of "
                f"weights and {kv / 2**20:.1f} MB of key-value cache, peak resident "
                f"{memory.peak_bytes() / 2**20:.0f} MB; SIGTERM or Ctrl-C stops it")
    reporter = threading.Thread(target=report, args=(engine, server), daemon=True)
    reporter.start()
    try:
        server.run(sockets=[listener])
    finally:
        engine.stop(shutdown_timeout + 10)
        lockstep.stop()
    if engine.error is not None:
        raise engine.error
    s = engine.stats
    console.say(f"[hvdtrain] stopped: {sum(s.finished.values())} sequences ({dict(s.finished)}), {s.generated} "
                f"tokens generated in {s.steps} steps")
    return 0


def report(engine, server, every: float = 10.0) -> None:
    """A line every ``every`` seconds while there is work: running and waiting sequences, tokens per second."""
    last, then = 0, time.perf_counter()
    while not server.should_exit and engine.alive:
        time.sleep(every)
        now, done = time.perf_counter(), engine.stats.generated
        if done != last or engine.running:
            console.say(f"[hvdtrain] {len(engine.running)} running, {len(engine.waiting)} waiting; "
                        f"{(done - last) / (now - then):.1f} tokens/s generated")
        last, then = done, now


def main_args(args) -> int:
    """The CLI's handler."""
    return command(args.model, args.host, args.port, args.draft, args.draft_tokens, args.slots, args.max_queue,
                   args.served_model_name, args.chat_template, args.set, args.shutdown_timeout, args.allow_unsafe)

