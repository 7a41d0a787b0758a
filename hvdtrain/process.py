"""How an hvdtrain process ends (the CLI's exit and the public :func:`hvdtrain.exit`)."""
from __future__ import annotations

import os
import sys


def exit_process(code: int) -> None:
    """End the process with ``code``.

    tensorflow-io 0.36 aborts at interpreter exit once it has used its file systems ("pure virtual method called",
    exit code 134; tensorflow/io #1912, #2039, seen with S3, fixed in no release), which would fail a finished job
    under horovodrun. After tensorflow-io was loaded (``hdfs://``, ``az://``; ``s3://`` is hvdtrain's own), the
    output is flushed, Horovod shut down, and the process ends without the interpreter's teardown.
    """
    from hvdtrain import storage

    if storage.used_object_storage():
        from hvdtrain import distributed

        sys.stdout.flush()
        sys.stderr.flush()
        distributed.shutdown()
        os._exit(code)
    sys.exit(code)
