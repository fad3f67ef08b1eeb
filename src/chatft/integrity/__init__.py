"""Whether files chatft writes and reads can be trusted: checksums and manifests
(:mod:`.manifest`), durable writes and disk space (:mod:`.disk`), and loading pickled
checkpoint files without running code (:mod:`.pickles`).

It sits below ``checkpoint``, ``export`` and ``train`` and knows nothing of engines."""
